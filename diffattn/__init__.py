"""diffattn: attention methods for Hugging Face Diffusers, one line to apply.

    import diffattn
    diffattn.apply(pipe, "dense")
    diffattn.remove(pipe)
"""

from __future__ import annotations

import logging

from .api import apply, remove
from .registry import available_methods

__version__ = "0.1.0.dev0"

logging.getLogger("diffattn").addHandler(logging.NullHandler())

__all__ = ["apply", "remove", "available_methods", "__version__"]
