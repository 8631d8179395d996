"""Layout-to-image generation with FICGen: `LayoutPipeline(pipe)(prompt, layout)` for SD1.5/SDXL pipelines.

Each call installs `ficgen` on the pipeline's UNet (training-free, or the trained modules with `weights=`), encodes
the layout's phrases with the pipeline's own `encode_prompt`, hands them to the UNet per call through
`cross_attention_kwargs={"ficgen": FICGenInputs(...)}`, and removes the method again, so `pipe` stays stock.

Reference images for the trained modules (FICGen retrieves an instance crop per box and a background exemplar):
`ShapesReferenceBank` does this for the drawn-shapes demo data -- crops of training-style scenes indexed by colour and
shape, the one with the closest aspect ratio per box, and a scene with the named background. Without a bank the
modules get zero images (they are trained with references dropped, so they work without, less well).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
import torch.nn.functional as F

from ..api import apply, remove
from ..layout import Layout
from ..methods.ficgen import FICGenInputs, encode_phrases, pooled

logger = logging.getLogger("diffattn")


class ShapesReferenceBank:
    """Reference crops of the drawn-shapes data (`demo_data.sample_scenes`), retrieved by colour and shape words."""

    def __init__(self, size: int = 64, scenes: int = 192, seed: int = 12345, image_size: int = 128) -> None:
        from .demo_data import BACKGROUNDS, SHAPE_COLORS, SHAPES, sample_scenes

        self.size = size
        self.colors, self.shapes, self.backgrounds = list(SHAPE_COLORS), list(SHAPES), list(BACKGROUNDS)
        pixels, prompts, boxes = sample_scenes(scenes, size=image_size, seed=seed)
        self.crops: dict[tuple[str, str], list[tuple[float, torch.Tensor]]] = {}
        self.scenes: dict[str, torch.Tensor] = {}
        for img, prompt, scene in zip(pixels, prompts, boxes):
            m = re.search(r"on an? (\w+) background", prompt)
            if m and m.group(1) not in self.scenes:
                self.scenes[m.group(1)] = self._resize(img)
            for sb in scene:
                x0, y0, x1, y1 = (int(round(v * image_size)) for v in sb.box)
                crop = img[:, y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]
                ratio = (x1 - x0) / max(y1 - y0, 1)
                self.crops.setdefault((sb.color, sb.shape), []).append((ratio, self._resize(crop)))

    def _resize(self, img: torch.Tensor) -> torch.Tensor:
        return F.interpolate(img[None].float(), size=(self.size, self.size), mode="bilinear", antialias=True,
                             align_corners=False)[0]

    def _word(self, text: str, words: list[str]) -> str | None:
        found = [w for w in words if re.search(rf"\b{w}\b", text.lower())]
        return found[0] if found else None

    def patch(self, phrase: str, box: tuple[float, float, float, float]) -> torch.Tensor | None:
        """The crop whose class (colour, shape) the phrase names, with the box's aspect ratio; None if unknown."""
        color, shape = self._word(phrase, self.colors), self._word(phrase, self.shapes)
        options = self.crops.get((color, shape)) if color and shape else None
        if not options:
            return None
        ratio = (box[2] - box[0]) / max(box[3] - box[1], 1e-6)
        return min(options, key=lambda item: abs(item[0] - ratio))[1]

    def exemplar(self, prompt: str) -> torch.Tensor | None:
        m = re.search(r"on an? (\w+) background", prompt.lower())
        return self.scenes.get(m.group(1)) if m else None

    def references(self, layouts: list[Layout], prompts: list[str], drop: float = 0.0,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """patches `[b, n, 3, r, r]` and exemplars `[b, 3, r, r]` (zeros where unknown or dropped)."""
        n = max(len(lay.instances) for lay in layouts)
        r = self.size
        patches = torch.zeros(len(layouts), n, 3, r, r)
        exemplar = torch.zeros(len(layouts), 3, r, r)
        for j, (lay, prompt) in enumerate(zip(layouts, prompts)):
            for i, inst in enumerate(lay.instances):
                p = self.patch(inst.phrase, inst.bbox())
                if p is not None and not _dropped(drop, generator):
                    patches[j, i] = p
            e = self.exemplar(prompt if lay.background is None else f"on {lay.background}")
            if e is not None and not _dropped(drop, generator):
                exemplar[j] = e
        return patches, exemplar


def _dropped(drop: float, generator: torch.Generator | None) -> bool:
    return drop > 0 and float(torch.rand((), generator=generator)) < drop


def build_inputs(pipe: Any, layouts: list[Layout], prompts: list[str] | None = None, *,
                 references: ShapesReferenceBank | None = None, drop: float = 0.0,
                 generator: torch.Generator | None = None, device: Any = None,
                 cond_rows: slice | None = None,
                 reference_images: tuple[torch.Tensor | None, torch.Tensor | None] | None = None) -> FICGenInputs:
    """`FICGenInputs` for `layouts` (one per conditional row, or one for all): phrases encoded with the pipeline's
    `encode_prompt` in one batch, pooled features, and reference images: drawn from a bank (`references`), or
    given as `reference_images=(patches, exemplar)` (already drawn, as the training data workers do)."""
    phrases = [p for lay in layouts for p in lay.phrases]
    embeds = encode_phrases(pipe, phrases, device)
    per_layout, start = [], 0
    for lay in layouts:
        per_layout.append(embeds[start : start + len(lay.instances)])
        start += len(lay.instances)
    patches = exemplar = None
    if reference_images is not None:
        if references is not None:
            raise ValueError("build_inputs: give references (a bank) or reference_images, not both")
        patches, exemplar = reference_images
    elif references is not None:
        patches, exemplar = references.references(layouts, prompts or [""] * len(layouts), drop, generator)
    inputs = FICGenInputs.from_layouts(layouts, per_layout, patches=patches, exemplar=exemplar, cond_rows=cond_rows)
    inputs.phrase_pooled = pooled(inputs.phrase_embeds)
    return inputs


class LayoutPipeline:
    """Prompt + layout -> image on any SD1.5/SDXL-style Diffusers pipeline (`unet` + `encode_prompt`).

    `weights`: folder of trained FICGen modules (None: training-free). `references`: a `ShapesReferenceBank`,
    `"shapes"` for the demo bank, or None. Other keyword options go to `diffattn.apply(pipe, "ficgen", ...)`.
    """

    def __init__(self, pipe: Any, *, weights: str | None = None, references: Any = None, **options: Any) -> None:
        if not hasattr(pipe, "unet"):
            raise ValueError(f"LayoutPipeline needs a UNet pipeline (SD1.5/SDXL); {type(pipe).__name__} has no unet")
        self.pipe = pipe
        self.weights = weights
        self.options = options
        if references == "shapes":
            references = ShapesReferenceBank()
        self.references = references
        self._modules = None
        if weights is not None:
            from ..methods.ficgen_modules import load_modules

            self._modules = load_modules(weights)

    def __call__(self, prompt: str, layout: Any, **kwargs: Any) -> Any:
        layout = Layout.coerce(layout)
        device = getattr(self.pipe, "_execution_device", None) or self.pipe.device
        refs = self.references if self._modules is not None else None
        inputs = build_inputs(self.pipe, [layout], [prompt], references=refs, device=device)
        extra = dict(kwargs.pop("cross_attention_kwargs", None) or {})
        extra["ficgen"] = inputs
        apply(self.pipe, "ficgen", **self.options)
        try:
            if self._modules is not None:
                from ..api import installed

                installed(self.pipe.unet).runtime.attach_modules(self._modules)
            return self.pipe(prompt=prompt, cross_attention_kwargs=extra, **kwargs)
        finally:
            remove(self.pipe)
