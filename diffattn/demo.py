"""The bundled demo models: where they live and what to ask them.

Two small models trained by this project (`python -m diffattn.pipelines.demo_train`) on procedurally drawn shapes
and shipped in the repository's `assets/` folder, so that `diffattn generate` and the app show real output on a
machine without a model hub. Each folder is an ordinary Diffusers pipeline folder (`from_pretrained` works).
"""

from __future__ import annotations

from pathlib import Path

DEMO_MODELS = {"video": "demo-video", "image": "demo-image", "unet": "demo-unet"}

DEMO_PROMPTS = {
    "video": "a red circle moving right on a blue background",
    "image": "a yellow square on the left on a green background",
    "unet": "a red circle on the left and a yellow square at the top right on a blue background",
}


def assets_dir() -> Path:
    """`assets/` of the source tree (editable install) or the installed `diffattn/assets` package data."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "assets", here / "assets"):
        if candidate.is_dir():
            return candidate
    return here.parent / "assets"


def demo_model_path(kind: str = "video") -> str:
    """Folder of the demo model of `kind` ("video", "image" or "unet"); a clear error when the weights are not
    there."""
    if kind not in DEMO_MODELS:
        raise ValueError(f"demo model kind must be one of {', '.join(DEMO_MODELS)}, got {kind!r}")
    path = assets_dir() / DEMO_MODELS[kind]
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the bundled {kind} demo model is missing at {path}; train it with "
            f"`python -m diffattn.pipelines.demo_train --kind {kind}` or pass --model FOLDER_OR_HUB_ID"
        )
    return str(path)
