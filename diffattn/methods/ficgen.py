"""`ficgen`: frequency-aware regional (layout) attention for SD1.5/SDXL UNets (FICGen, Wang et al., ICCV 2025).

Training-free (facts file §3.4), at the chosen layers (default `mid,up1`, FICGen's own) and steps, on the
conditional rows only (the unconditional CFG rows run stock attention):

1. **attn2**: the frozen cross-attention runs once with the prompt (O_0) and once per layout phrase i (O_i, the
   same q with the phrase's keys/values through the same frozen projections).
2. Each output is split into bands on the layer's token grid (`diffattn.frequency.band_split`, FICGen's square FFT
   mask with `rho`, or a Gaussian one): `Y_i = (1 - alpha) LP(O_0) + alpha LP(O_i) + beta HP(O_i)` -- the low band
   (illumination, degradation, global colour) stays shared with the prompt as far as `alpha` says, the phrase adds
   its detail with gain `beta`. (The facts file writes `LP(O_0) + alpha LP(O_i)`; that doubles the low band at
   alpha = 1. The convex form used here gives `Y_i = O_i` at alpha = beta = 1, so one full-image instance whose
   phrase is the prompt reproduces stock attention exactly -- tested.)
3. Composite with RefinedShader-style overlap normalisation: `out = (O_0 + sum_i w M_i Y_i) / (1 + sum_i w M_i)`
   with M_i the soft occupancy map of instance i at the layer's resolution and `w = instance_weight` (10, as
   upstream): background cells get O_0, overlapping instances are averaged.
4. **attn1** (optional, `self_attention_bias=lambda`): the pretrained self-attention logits get `-lambda (1 - A)`
   with `A = clip(sum_m m m^T, 0, 1)` over the instance maps and the background map, so tokens attend mostly within
   their own instance or the background; `lambda=inf` masks pairs that share no region at all (FICGen's `la` mask).

Trained (`weights=PATH`): FICGen's modules (`diffattn.methods.ficgen_modules`) replace step 2-3 at their layers.

Where the layout comes from, per forward (no globals): `cross_attention_kwargs={"ficgen": FICGenInputs(...)}` on the
UNet call (the layout pipeline does this; the context hook takes it out before the UNet sees it), else the
`layout=` option, whose phrases are encoded once with the text encoder of the pipeline `diffattn.apply` was given.
"""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..call import AttentionCall
from ..config import MethodConfig, option
from ..call import ForwardContext
from ..frequency import BANDS, band_split
from ..layout import Layout, occupancy
from .base import AttentionMethod, require_grid
from .ficgen_parts import block_name, parse_layers, pooled, region_bias
from .spec import MethodSpec

logger = logging.getLogger("diffattn")

_STATE_KEY = "ficgen"


# ---- per-forward inputs -----------------------------------------------------------------------------------------
@dataclass
class FICGenInputs:
    """The layout of one forward's conditional rows, as tensors (build with `FICGenInputs.from_layouts`).

    `phrase_embeds` `[b, n, L, D]`: each phrase encoded like a prompt (padded to the most instances, `valid` `[b, n]`
    marks the real ones); `b` is 1 (all conditional rows share the layout) or the number of conditional rows.
    `phrase_pooled` `[b, n, D]` / `global_pooled` `[b, D]`, `patches` `[b, n, 3, r, r]` and `exemplar`
    `[b, 3, r, r]` feed the trained modules only. `cond_rows` says which batch rows are conditional (None: the CFG
    rule of the method). `background_embeds` `[b, L, D]`: the layouts' background phrases encoded like prompts
    (zeros where a layout has none; `Layout.background`), attended by the background cells instead of the prompt.
    The exemplar K/V path (`diffattn.methods.ficgen_exemplar`) needs `exemplar_latents`
    `[1 or b, C, h, w]` (the VAE's clean latents of an exemplar image laid out like the layout), `alphas_cumprod` of
    the sampler's training schedule and optionally `exemplar_noise` (else a fixed seeded noise).
    """

    layouts: list[Layout]
    phrase_embeds: torch.Tensor
    valid: torch.Tensor
    boxes: torch.Tensor
    phrase_pooled: torch.Tensor | None = None
    global_pooled: torch.Tensor | None = None
    patches: torch.Tensor | None = None
    exemplar: torch.Tensor | None = None
    cond_rows: slice | None = None
    background_embeds: torch.Tensor | None = None
    exemplar_latents: torch.Tensor | None = None
    alphas_cumprod: torch.Tensor | None = None
    exemplar_noise: torch.Tensor | None = None
    _maps: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)  # per-inputs results (trained modules' tokens)

    def __post_init__(self) -> None:
        b, n = len(self.layouts), max(len(lay.instances) for lay in self.layouts)
        if self.phrase_embeds.ndim != 4 or tuple(self.phrase_embeds.shape[:2]) != (b, n):
            raise ValueError(
                f"phrase_embeds must be [layouts={b}, instances={n}, L, D], got {tuple(self.phrase_embeds.shape)}"
            )
        if self.background_embeds is not None and (self.background_embeds.ndim != 3
                                                   or self.background_embeds.shape[0] != b):
            raise ValueError(f"background_embeds must be [layouts={b}, L, D], got {tuple(self.background_embeds.shape)}")
        if self.exemplar_latents is not None:
            e = self.exemplar_latents
            if e.ndim != 4 or e.shape[0] not in (1, b):
                raise ValueError(f"exemplar_latents must be [1 or layouts={b}, C, h, w], got {tuple(e.shape)}")
            if self.alphas_cumprod is None:
                raise ValueError("exemplar_latents need alphas_cumprod (the sampler's schedule) to be noised per step")
            if self.exemplar_noise is not None and self.exemplar_noise.shape != e.shape:
                raise ValueError(f"exemplar_noise must have the shape of exemplar_latents {tuple(e.shape)}, got "
                                 f"{tuple(self.exemplar_noise.shape)}")

    @classmethod
    def from_layouts(cls, layouts: list[Layout] | Layout, phrase_embeds: list[torch.Tensor] | torch.Tensor,
                     **kwargs: Any) -> FICGenInputs:
        """`phrase_embeds`: per layout `[n_j, L, D]` (a list) or one `[n, L, D]` for one layout; padded here."""
        if isinstance(layouts, Layout):
            layouts = [layouts]
        if isinstance(phrase_embeds, torch.Tensor):
            phrase_embeds = [phrase_embeds] if phrase_embeds.ndim == 3 else list(phrase_embeds)
        if len(phrase_embeds) != len(layouts):
            raise ValueError(f"{len(layouts)} layouts but {len(phrase_embeds)} phrase embedding sets")
        n = max(len(lay.instances) for lay in layouts)
        first = phrase_embeds[0]
        padded = first.new_zeros(len(layouts), n, *first.shape[1:])
        valid = torch.zeros(len(layouts), n, dtype=torch.bool, device=first.device)
        boxes = torch.zeros(len(layouts), n, 4, device=first.device)
        for j, (lay, emb) in enumerate(zip(layouts, phrase_embeds)):
            if emb.shape[0] != len(lay.instances):
                raise ValueError(f"layout {j} has {len(lay.instances)} instances but {emb.shape[0]} phrase embeddings")
            padded[j, : emb.shape[0]] = emb
            valid[j, : emb.shape[0]] = True
            boxes[j, : emb.shape[0]] = torch.tensor(lay.boxes, device=first.device)
        return cls(list(layouts), padded, valid, boxes, **kwargs)

    @property
    def has_background(self) -> torch.Tensor:
        """`[b]` bool: which layouts name a background phrase."""
        return torch.tensor([lay.background is not None for lay in self.layouts])

    @property
    def num_instances(self) -> int:
        return self.phrase_embeds.shape[1]

    def maps(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Soft occupancy `[b, n, height, width]` (padded instances are 0), cached per resolution."""
        key = (height, width)
        if key not in self._maps:
            n = self.num_instances
            out = torch.zeros(len(self.layouts), n, height, width)
            for j, lay in enumerate(self.layouts):
                out[j, : len(lay.instances)] = occupancy(lay, height, width)
            self._maps[key] = out
        return self._maps[key].to(device=device, dtype=dtype)


def encode_phrases(pipe: Any, phrases: list[str], device: torch.device | str | None = None) -> torch.Tensor:
    """Phrases encoded exactly as the pipeline encodes a prompt (`pipe.encode_prompt`): `[n, L, D]`."""
    if not hasattr(pipe, "encode_prompt"):
        raise ValueError(
            f"ficgen: {type(pipe).__name__} has no encode_prompt to encode the layout's phrases; pass "
            "cross_attention_kwargs={'ficgen': FICGenInputs(...)} to the UNet call instead"
        )
    device = device or getattr(pipe, "_execution_device", None) or pipe.device
    with torch.no_grad():
        out = pipe.encode_prompt(prompt=list(phrases), device=device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)
    return out[0]


# ---- the training-free composite (pure tensor functions) --------------------------------------------------------
def to_grid(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`[..., S, D]` -> `[..., D, H, W]` (S = H * W in raster order)."""
    return x.transpose(-1, -2).unflatten(-1, (height, width))


def from_grid(x: torch.Tensor) -> torch.Tensor:
    """`[..., D, H, W]` -> `[..., S, D]`."""
    return x.flatten(-2).transpose(-1, -2)


def frequency_composite(
    global_out: torch.Tensor, phrase_out: torch.Tensor, maps: torch.Tensor, grid: tuple[int, int], *,
    rho: float = 0.35, alpha: float = 0.5, beta: float = 1.0, band: str = "square", instance_weight: float = 10.0,
    background_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """FICGen's training-free composite of attention outputs.

    `global_out` `[b, H, S, D]` (prompt), `phrase_out` `[b, n, H, S, D]` (per phrase), `maps` `[b, n, S]` soft
    occupancy (0 for padded instances). Returns `[b, H, S, D]`:
    `(B + sum_i w M_i Y_i) / (1 + sum_i w M_i)`, `Y_i = (1 - alpha) LP(O_0) + alpha LP(O_i) + beta HP(O_i)`, with
    `B = O_0`, or with a background phrase's output `background_out` `[b, H, S, D]`:
    `B = M_bg O_bg + (1 - M_bg) O_0` (`M_bg = 1 - max_i M_i`), so background cells attend the background phrase
    instead of a prompt that names every instance.
    """
    h, w = grid
    g = to_grid(global_out.float(), h, w)
    p = to_grid(phrase_out.float(), h, w)
    low0, _ = band_split(g, rho, band)
    low_i, high_i = band_split(p, rho, band)
    y = (1 - alpha) * low0.unsqueeze(1) + alpha * low_i + beta * high_i  # [b, n, H, D, h, w]
    y = from_grid(y)  # [b, n, H, S, D]
    weight = instance_weight * maps.float()[:, :, None, :, None]  # [b, n, 1, S, 1]
    base = global_out.float()
    if background_out is not None:
        m_bg = (1.0 - maps.float().amax(dim=1)) if maps.shape[1] else maps.new_ones(maps.shape[0], maps.shape[2])
        m_bg = m_bg[:, None, :, None]
        base = m_bg * background_out.float() + (1 - m_bg) * base
    out = (base + (weight * y).sum(1)) / (1 + weight.sum(1))
    return out.to(global_out.dtype)


# ---- options ----------------------------------------------------------------------------------------------------
@dataclass
class FICGenConfig(MethodConfig):
    layout: Any = option(
        None,
        help="the layout: a diffattn.layout.Layout, its JSON dict/text or a path to layout.json (None: the layout "
        "comes per call through cross_attention_kwargs={'ficgen': FICGenInputs(...)}, as the layout pipeline does)",
    )
    rho: float = option(0.35, low=0.0, high=0.5, low_inclusive=False, help="low-band half width per axis (FICGen: 0.35)")
    alpha: float = option(0.5, low=0.0, high=1.0, help="share of the phrase's own low band (0: the prompt's low band)")
    beta: float = option(1.0, low=0.0, help="gain of the phrase's high band (facts: >= 1)")
    band: str = option("square", choices=BANDS, help="square FFT mask (FICGen) or Gaussian (no ringing at 8x8/16x16)")
    layers: Any = option("mid,up1", help="UNet blocks: 'mid,up1' (FICGen), mid, up0..up3, down0..down3, indices, 'all'")
    self_attention_bias: Any = option(
        None, help="attn1 logit bias -lambda (1 - A) keeping tokens in their region: a number >= 0, 'inf' (hard "
        "mask) or None (off)"
    )
    instance_weight: float = option(10.0, low=0.0, help="overlap normalisation weight of an instance (RefinedShader: 10)")
    start_step: int | float = option(0, low=0.0, help="first active step: an int step index or a float fraction")
    end_step: int | float = option(1.0, low=0.0, help="end (excluded) of the active steps: int index or float fraction")
    weights: str | None = option(None, help="folder of trained FICGen modules (diffattn.methods.ficgen_modules)")
    exemplar_image: Any = option(
        None, help="exemplar K/V path: an image (path, PIL, tensor [3, H, W] in [0, 1]) laid out like the layout, "
        "encoded with the pipeline's VAE (with layout=); per call: FICGenInputs.exemplar_latents"
    )
    exemplar_scale: float = option(
        1.0, low=0.0, help="weight of the exemplar's keys at the chosen attn1 layers (low band for background, high "
        "band for instance queries); 0 turns the exemplar path off"
    )
    cfg: bool | None = option(
        None, help="whether the UNet batch holds [uncond; cond] halves (None: ask the pipeline, else equal latent halves)"
    )

    def check(self) -> None:
        parse_layers(self.layers)
        bias = self.self_attention_bias
        if isinstance(bias, str) and bias.strip().lower() in ("inf", "hard"):
            bias = self.self_attention_bias = math.inf
        if bias is not None and (isinstance(bias, bool) or not isinstance(bias, (int, float)) or math.isnan(bias)
                                 or bias < 0):
            raise ValueError(
                f"option 'self_attention_bias' of method 'ficgen' got {bias!r}; expected None, a number >= 0 or 'inf'"
            )
        if self.layout is not None:
            self.layout = Layout.coerce(self.layout)
        image = self.exemplar_image
        if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
            import os

            if not os.path.isfile(image):
                raise ValueError(f"option 'exemplar_image' of method 'ficgen': no image file at {image!r}")
        elif image is not None and not (isinstance(image, torch.Tensor) or hasattr(image, "convert")):
            raise ValueError(
                f"option 'exemplar_image' of method 'ficgen' got {type(image).__name__}; expected an image path, a PIL "
                "image or a tensor [3, H, W] in [0, 1]"
            )
        for name in ("start_step", "end_step"):
            value = getattr(self, name)
            if isinstance(value, float) and value > 1.0:
                raise ValueError(f"option {name!r} of method 'ficgen': a float is a fraction in [0, 1], got {value}")
        if _as_fraction(self.start_step, 100) >= _as_fraction(self.end_step, 100) and type(self.start_step) is type(self.end_step):
            raise ValueError(
                f"options 'start_step' ({self.start_step}) and 'end_step' ({self.end_step}) of method 'ficgen': "
                "start must be before end"
            )


def _as_fraction(value: int | float, num_steps: int) -> float:
    return float(value) if isinstance(value, float) else value / max(num_steps, 1)


@dataclass
class _ForwardState:
    inputs: FICGenInputs | None
    rows: slice
    active: bool
    text_pooled: torch.Tensor | None = None  # pooled prompt of the conditional rows (trained modules)
    batch: int = 0  # the forward's own batch; rows from `batch` on are the exemplar's (exemplar K/V path)
    exemplar_rows: slice | None = None


class FICGenMethod(AttentionMethod):
    def __init__(self, config: FICGenConfig, modules: torch.nn.Module | None = None) -> None:
        super().__init__(config)
        self.layer_names, self.layer_indices, self.all_layers = parse_layers(config.layers)
        self._pipeline: Any = None
        self._encoded: tuple[Any, FICGenInputs] | None = None
        self.modules = modules
        if modules is None and config.weights is not None:
            from .ficgen_modules import load_modules

            self.modules = load_modules(config.weights)
        self._warned_no_steps = False

    def bind_pipeline(self, pipe: Any) -> None:
        """The pipeline whose text encoder encodes the `layout=` phrases and whose CFG flag is read (weakly held)."""
        self._pipeline = weakref.ref(pipe)

    def attach_modules(self, modules: torch.nn.Module | None) -> None:
        """Use trained (or training) FICGen modules at their layers instead of the training-free composite."""
        self.modules = modules

    def _pipe(self) -> Any:
        return self._pipeline() if self._pipeline is not None else None

    def chosen(self, path: str, index: int) -> bool:
        if self.all_layers or index in self.layer_indices:
            return True
        return block_name(path) in self.layer_names

    # ---- forward level ------------------------------------------------------------------------------------------
    def _active(self, ctx: ForwardContext) -> bool:
        cfg = self.config
        num = ctx.num_steps
        if num is None:
            if isinstance(cfg.start_step, int) and cfg.start_step == 0 and cfg.end_step in (1.0,):
                return True
            if not self._warned_no_steps:
                logger.warning("ficgen: the step count is unknown (a bare model call); the step window is ignored")
                self._warned_no_steps = True
            return True
        frac = ctx.step_index / num
        return _as_fraction(cfg.start_step, num) <= frac < _as_fraction(cfg.end_step, num)

    def _cond_rows(self, ctx: ForwardContext, args: dict[str, Any], inputs: FICGenInputs | None) -> slice:
        b = ctx.batch_size
        if inputs is not None and inputs.cond_rows is not None:
            return inputs.cond_rows
        if self.config.cfg is not None:
            cfg_batch = self.config.cfg and b % 2 == 0
        else:
            pipe = self._pipe()
            if pipe is not None and hasattr(pipe, "do_classifier_free_guidance"):
                cfg_batch = bool(pipe.do_classifier_free_guidance) and b % 2 == 0
            else:
                latent = args.get("sample")
                cfg_batch = (b % 2 == 0 and isinstance(latent, torch.Tensor)
                             and torch.equal(latent[: b // 2], latent[b // 2:]))
        return slice(b // 2, b) if cfg_batch else slice(0, b)

    def _layout_inputs(self, device: torch.device, dtype: torch.dtype) -> FICGenInputs:
        layout = self.config.layout
        pipe = self._pipe()
        if self._encoded is not None and self._encoded[0] == (layout, device, dtype):
            return self._encoded[1]
        if pipe is None:
            raise ValueError(
                "ficgen: layout= needs a pipeline to encode its phrases (diffattn.apply(pipe, 'ficgen', layout=...)); "
                "on a bare UNet pass cross_attention_kwargs={'ficgen': FICGenInputs(...)} instead"
            )
        embeds = encode_phrases(pipe, layout.phrases, device).to(dtype)
        extra: dict[str, Any] = {}
        if layout.background is not None:
            extra["background_embeds"] = encode_phrases(pipe, [layout.background], device).to(dtype)
        if self.config.exemplar_image is not None and self.config.exemplar_scale > 0:
            from .ficgen_exemplar import encode_exemplar, load_exemplar_image

            unet = pipe.unet
            size = unet.config.sample_size * getattr(pipe, "vae_scale_factor", 8)
            pixels = load_exemplar_image(self.config.exemplar_image, size, size)
            extra["exemplar_latents"] = encode_exemplar(pipe, pixels, device).to(dtype)
            extra["alphas_cumprod"] = pipe.scheduler.alphas_cumprod
        inputs = FICGenInputs.from_layouts(layout, embeds, phrase_pooled=pooled(embeds)[None], **extra)
        self._encoded = ((layout, device, dtype), inputs)
        return inputs

    def prepare_forward(self, ctx: ForwardContext, args: dict[str, Any]) -> dict[str, Any] | None:
        changed = None
        extra = args.get("cross_attention_kwargs")
        inputs = None
        if isinstance(extra, dict) and _STATE_KEY in extra:
            inputs = extra[_STATE_KEY]
            rest = {k: v for k, v in extra.items() if k != _STATE_KEY}
            changed = {"cross_attention_kwargs": rest or None}
            if inputs is not None and not isinstance(inputs, FICGenInputs):
                raise TypeError(f"cross_attention_kwargs['ficgen'] must be a FICGenInputs, got {type(inputs).__name__}")
        if inputs is None and self.config.layout is not None:
            text = args.get("encoder_hidden_states")
            inputs = self._layout_inputs(text.device, text.dtype)
        rows = self._cond_rows(ctx, args, inputs)
        text_pooled = None
        if inputs is not None and self.modules is not None:
            if inputs.global_pooled is not None:
                text_pooled = inputs.global_pooled
            else:
                text_pooled = pooled(args["encoder_hidden_states"][rows])
        state = _ForwardState(inputs, rows, self._active(ctx), text_pooled, batch=ctx.batch_size)
        ctx.extras[_STATE_KEY] = state
        if (state.active and inputs is not None and inputs.exemplar_latents is not None
                and self.config.exemplar_scale > 0 and rows.stop > rows.start):
            changed = {**(changed or {}), **self._exemplar_rows(ctx, args, state)}
        return changed

    def _exemplar_rows(self, ctx: ForwardContext, args: dict[str, Any], state: _ForwardState) -> dict[str, Any]:
        """The forward's arguments with the exemplar's rows appended: its latents noised to this timestep, every other
        batched argument (text, SDXL's added conditions) copied from the first conditional rows."""
        from .ficgen_exemplar import noised_exemplar
        from .toolkit import append_rows

        inputs, rows, b = state.inputs, state.rows, ctx.batch_size
        sample = args["sample"]
        latents = inputs.exemplar_latents.to(sample.device, sample.dtype)
        e = latents.shape[0]
        if e > rows.stop - rows.start:
            raise ValueError(f"ficgen: {e} exemplars for {rows.stop - rows.start} conditional rows")
        if latents.shape[-2:] != sample.shape[-2:]:
            latents = F.interpolate(latents.float(), size=sample.shape[-2:], mode="bilinear", align_corners=False,
                                    antialias=True).to(sample.dtype)
        noise = inputs.exemplar_noise
        key = ("exemplar_noise", tuple(latents.shape), sample.device)
        if noise is None or noise.shape != latents.shape:
            if key not in inputs.cache:  # one fixed noise per inputs (a generation), as an inversion would give
                g = torch.Generator().manual_seed(0)
                inputs.cache[key] = torch.randn(latents.shape, generator=g).to(sample.device)
            noise = inputs.cache[key]
        x = noised_exemplar(latents, noise.to(sample.device, sample.dtype), inputs.alphas_cumprod, ctx.timestep)
        template = slice(rows.start, rows.start + e)
        grown = {k: append_rows(v, b, template, k) for k, v in args.items() if k not in ("sample", "cross_attention_kwargs")}
        out = {k: v for k, v in grown.items() if v is not args[k]}
        out["sample"] = torch.cat([sample, x.to(sample.dtype)], dim=0)
        state.exemplar_rows = slice(b, b + e)
        return out

    def finish_forward(self, ctx: ForwardContext | None, output: Any) -> Any:
        state = None if ctx is None else ctx.extras.get(_STATE_KEY)
        if state is None or state.exemplar_rows is None:
            return output
        from .toolkit import keep_rows

        return keep_rows(output, state.batch)

    # ---- attention ----------------------------------------------------------------------------------------------
    def attend(self, call: AttentionCall) -> torch.Tensor:
        q, k, v = call.q, call.k, call.v
        dense = F.scaled_dot_product_attention(q, k, v, attn_mask=call.attn_mask, scale=call.scale)
        state: _ForwardState | None = None if call.context is None else call.context.extras.get(_STATE_KEY)
        if state is None or state.inputs is None or not state.active or not self.chosen(call.layer.path, call.layer.index):
            return dense
        rows = state.rows
        if rows.stop <= rows.start:
            return dense
        grid = require_grid(call, "ficgen")
        hw = (grid.height, grid.width)
        inputs = state.inputs
        nc = rows.stop - rows.start
        b = len(inputs.layouts)
        if b not in (1, nc):
            raise ValueError(f"ficgen: {b} layouts for {nc} conditional rows; give one layout or one per row")
        maps = inputs.maps(*hw, device=q.device, dtype=torch.float32).flatten(-2)  # [b, n, S]
        if b == 1 and nc > 1:
            maps = maps.expand(nc, -1, -1)
        if call.role == "self":
            strength = self.config.self_attention_bias
            ex = state.exemplar_rows
            if (strength is None or strength == 0) and ex is None:
                return dense
            bias = None
            if strength is not None and strength != 0:
                bias = region_bias(maps, float(strength)).to(q.dtype)
            if call.attn_mask is not None:
                mask = _as_additive(call.attn_mask, q.dtype)[rows]
                bias = mask if bias is None else bias + mask
            out = dense.clone()
            if ex is None:
                out[rows] = F.scaled_dot_product_attention(q[rows], k[rows], v[rows], attn_mask=bias, scale=call.scale)
                return out
            from .ficgen_exemplar import exemplar_attention

            ek, ev = k[ex], v[ex]
            if ek.shape[0] not in (1, nc):
                raise ValueError(f"ficgen: {ek.shape[0]} exemplar rows for {nc} conditional rows")
            out[rows] = exemplar_attention(q[rows], k[rows], v[rows], ek, ev, maps, hw, rho=self.config.rho,
                                           band=self.config.band, scale=float(self.config.exemplar_scale),
                                           attn_scale=call.scale, self_bias=bias)
            return out
        if call.project_kv is None:
            raise RuntimeError(f"ficgen: layer {call.layer.path} gave no key/value projector (not a UNet cross-attention)")
        n = inputs.num_instances
        emb = inputs.phrase_embeds.to(device=q.device, dtype=k.dtype)
        pk, pv = call.project_kv(emb.flatten(0, 1))  # [b * n, H, L, D]
        pk, pv = pk.unflatten(0, (b, n)), pv.unflatten(0, (b, n))
        if b == 1 and nc > 1:
            pk, pv = pk.expand(nc, *pk.shape[1:]), pv.expand(nc, *pv.shape[1:])
        qc = q[rows].unsqueeze(1).expand(-1, n, -1, -1, -1)
        phrase_out = F.scaled_dot_product_attention(qc.flatten(0, 1), pk.flatten(0, 1), pv.flatten(0, 1), scale=call.scale)
        phrase_out = phrase_out.unflatten(0, (nc, n))  # [nc, n, H, S, D]
        global_out = dense[rows]
        modules = self.modules
        layer_module = None if modules is None else modules.for_layer(call.layer.path, hw, q.shape[1] * q.shape[-1])
        if layer_module is not None:
            param = next(modules.parameters())
            if param.device != q.device:
                modules.to(q.device)
                param = next(modules.parameters())
            pd = param.dtype
            pooled_text = state.text_pooled
            if pooled_text.shape[0] == 1 and nc > 1:
                pooled_text = pooled_text.expand(nc, -1)
            tokens = modules.tokens(inputs, pooled_text, nc, q.device, pd)
            mixed = layer_module(call.hidden_states[rows].to(pd), global_out.to(pd), phrase_out.to(pd), maps.to(pd),
                                 tokens, hw)
        else:
            background_out = None
            if inputs.background_embeds is not None and bool(inputs.has_background.any()):
                bk, bv = call.project_kv(inputs.background_embeds.to(device=q.device, dtype=k.dtype))
                if b == 1 and nc > 1:
                    bk, bv = bk.expand(nc, -1, -1, -1), bv.expand(nc, -1, -1, -1)
                background_out = F.scaled_dot_product_attention(q[rows], bk, bv, scale=call.scale)
                has = inputs.has_background.to(q.device)
                if b == 1 and nc > 1:
                    has = has.expand(nc)
                background_out = torch.where(has[:, None, None, None], background_out, global_out)
            with torch.autocast(q.device.type, enabled=False):  # FFTs have no bf16 kernels
                mixed = frequency_composite(
                    global_out, phrase_out, maps, hw, rho=self.config.rho, alpha=self.config.alpha,
                    beta=self.config.beta, band=self.config.band, instance_weight=self.config.instance_weight,
                    background_out=background_out,
                )
        out = dense.clone()
        out[rows] = mixed.to(dense.dtype)
        return out


def _as_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


SPEC = MethodSpec(
    name="ficgen",
    summary="FICGen: frequency-aware regional (layout) attention; training-free or with trained modules",
    config_cls=FICGenConfig,
    families=("unet",),
    build=FICGenMethod,
    role="guidance",
    pipeline_only="needs a layout (layout= with a pipeline, or the layout pipeline); a bare forward runs stock attention",
)
