"""The diffattn Gradio web app: Video, Image, Compare and Mask explorer tabs (`diffattn app`).

`build_app(...)` returns the `gradio.Blocks`; `main(argv)` is the command line. Needs the `app` extra (gradio).
"""

from .server import build_app, main

__all__ = ["build_app", "main"]
