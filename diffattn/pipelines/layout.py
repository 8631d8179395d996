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
        self.backdrops: dict[str, torch.Tensor] = {}
        for img, prompt, scene in zip(pixels, prompts, boxes):
            m = re.search(r"on an? (\w+) background", prompt)
            if m and m.group(1) not in self.scenes:
                self.scenes[m.group(1)] = self._resize(img)
                self.backdrops[m.group(1)] = self._resize(_backdrop(img, [sb.box for sb in scene]))
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

    def composite(self, layout: Layout, prompt: str, size: int) -> torch.Tensor:
        """An exemplar image `[3, size, size]` in [-1, 1] laid out like `layout` (the exemplar K/V path): the named
        background without shapes, each instance's retrieved crop resized into its box (unknown phrases: nothing)."""
        m = re.search(r"on an? (\w+) background", (prompt if layout.background is None else f"on {layout.background}").lower())
        back = self.backdrops.get(m.group(1)) if m else None
        if back is None:  # an unknown background: the mean of the known ones
            back = torch.stack(list(self.backdrops.values())).mean(0)
        image = F.interpolate(back[None], size=(size, size), mode="bilinear", align_corners=False)[0].clone()
        for inst in layout.instances:
            patch = self.patch(inst.phrase, inst.bbox())
            if patch is None:
                continue
            x0, y0, x1, y1 = (int(round(v * size)) for v in inst.bbox())
            if x1 - x0 < 1 or y1 - y0 < 1:
                continue
            image[:, y0:y1, x0:x1] = F.interpolate(patch[None], size=(y1 - y0, x1 - x0), mode="bilinear",
                                                   antialias=True, align_corners=False)[0]
        return image

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


def _backdrop(img: torch.Tensor, boxes: list[tuple[float, float, float, float]]) -> torch.Tensor:
    """A drawn-shapes scene `[3, H, W]` without its shapes: each row's mean colour outside the shapes' boxes (the
    backgrounds are vertical gradients)."""
    _, h, w = img.shape
    free = torch.ones(h, w, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes:
        free[int(y0 * h):int(round(y1 * h)) + 1, int(x0 * w):int(round(x1 * w)) + 1] = False
    count = free.sum(1)
    rows = (img * free).sum(-1) / count.clamp_min(1)  # [3, H]
    mean = (img * free).sum((-2, -1)) / free.sum().clamp_min(1)
    rows = torch.where(count > 0, rows, mean[:, None])
    return rows[:, :, None].expand(-1, -1, w).clone()


def _dropped(drop: float, generator: torch.Generator | None) -> bool:
    return drop > 0 and float(torch.rand((), generator=generator)) < drop


def build_inputs(pipe: Any, layouts: list[Layout], prompts: list[str] | None = None, *,
                 references: ShapesReferenceBank | None = None, drop: float = 0.0,
                 generator: torch.Generator | None = None, device: Any = None,
                 cond_rows: slice | None = None,
                 reference_images: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
                 exemplar: Any = None) -> FICGenInputs:
    """`FICGenInputs` for `layouts` (one per conditional row, or one for all): phrases encoded with the pipeline's
    `encode_prompt` in one batch, pooled features, and reference images: drawn from a bank (`references`), or
    given as `reference_images=(patches, exemplar)` (already drawn, as the training data workers do).

    `exemplar` turns on the exemplar K/V path: `"composite"` (the bank's `composite` per layout), an image (path,
    PIL or tensor `[3, H, W]` in [0, 1], one for all rows), or None (off)."""
    phrases = [p for lay in layouts for p in lay.phrases]
    embeds = encode_phrases(pipe, phrases, device)
    per_layout, start = [], 0
    for lay in layouts:
        per_layout.append(embeds[start : start + len(lay.instances)])
        start += len(lay.instances)
    patches = ref_exemplar = None
    if reference_images is not None:
        if references is not None:
            raise ValueError("build_inputs: give references (a bank) or reference_images, not both")
        patches, ref_exemplar = reference_images
    elif references is not None:
        patches, ref_exemplar = references.references(layouts, prompts or [""] * len(layouts), drop, generator)
    extra: dict[str, Any] = {}
    if exemplar is not None:
        extra = _exemplar_latents(pipe, exemplar, layouts, prompts, references, device)
    named = [lay.background for lay in layouts if lay.background is not None]
    if named:  # the background phrases, attended by the background cells (zeros where a layout names none)
        enc = encode_phrases(pipe, named, device)
        bg = enc.new_zeros(len(layouts), *enc.shape[1:])
        idx = [j for j, lay in enumerate(layouts) if lay.background is not None]
        bg[idx] = enc
        extra["background_embeds"] = bg
    inputs = FICGenInputs.from_layouts(layouts, per_layout, patches=patches, exemplar=ref_exemplar,
                                       cond_rows=cond_rows, **extra)
    inputs.phrase_pooled = pooled(inputs.phrase_embeds)
    return inputs


def _exemplar_latents(pipe: Any, exemplar: Any, layouts: list[Layout], prompts: list[str] | None,
                      references: Any, device: Any) -> dict[str, Any]:
    from ..methods.ficgen_exemplar import encode_exemplar, load_exemplar_image

    size = pipe.unet.config.sample_size * getattr(pipe, "vae_scale_factor", 8)
    if isinstance(exemplar, str) and exemplar == "composite":
        if not isinstance(references, ShapesReferenceBank):
            raise ValueError("build_inputs: exemplar='composite' needs references= (a ShapesReferenceBank)")
        prompts = prompts or [""] * len(layouts)
        pixels = torch.stack([references.composite(lay, p, size) for lay, p in zip(layouts, prompts)])
    else:
        pixels = load_exemplar_image(exemplar, size, size)
    return {"exemplar_latents": encode_exemplar(pipe, pixels, device), "alphas_cumprod": pipe.scheduler.alphas_cumprod}


class LayoutPipeline:
    """Prompt + layout -> image on any SD1.5/SDXL-style Diffusers pipeline (`unet` + `encode_prompt`).

    `weights`: folder of trained FICGen modules (None: training-free). `references`: a `ShapesReferenceBank`,
    `"shapes"` for the demo bank, or None. `exemplar`: the exemplar K/V path's image -- `"composite"` (composed from
    the bank per layout), an image path / PIL / tensor, or None (off). Other keyword options go to
    `diffattn.apply(pipe, "ficgen", ...)`.
    """

    def __init__(self, pipe: Any, *, weights: str | None = None, references: Any = None, exemplar: Any = None,
                 **options: Any) -> None:
        if not hasattr(pipe, "unet"):
            raise ValueError(f"LayoutPipeline needs a UNet pipeline (SD1.5/SDXL); {type(pipe).__name__} has no unet")
        self.pipe = pipe
        self.weights = weights
        self.options = options
        if references == "shapes":
            references = ShapesReferenceBank()
        self.references = references
        if exemplar == "composite" and not isinstance(references, ShapesReferenceBank):
            raise ValueError("LayoutPipeline: exemplar='composite' needs references='shapes' (or a ShapesReferenceBank)")
        self.exemplar = exemplar
        self._modules = None
        if weights is not None:
            from ..methods.ficgen_modules import load_modules

            self._modules = load_modules(weights)

    def __call__(self, prompt: str, layout: Any, **kwargs: Any) -> Any:
        layout = Layout.coerce(layout)
        device = getattr(self.pipe, "_execution_device", None) or self.pipe.device
        refs = self.references if self._modules is not None or self.exemplar == "composite" else None
        inputs = build_inputs(self.pipe, [layout], [prompt], references=refs, device=device, exemplar=self.exemplar)
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
