"""FICGen's exemplar path (facts file §3.4 step 5), a training-free stand-in for the trained LF/HF prototypes.

An exemplar image (a reference scene laid out like the layout; the layout pipeline composes one from the drawn-shapes
reference bank) is noised to the current timestep (`noised_exemplar`, forward diffusion `sqrt(a) x0 + sqrt(1 - a) e`
with one fixed noise per generation: a cheap stand-in for a DDIM inversion) and run through the UNet as extra batch
rows of the same forward. At the chosen attn1 layers the conditional rows then attend their own keys plus the
exemplar's keys and values split into bands on the layer's grid (`diffattn.frequency.band_split`, the method's
`rho`/`band`), shared-attention style:

- the **low** band of the exemplar's keys/values for **background** queries (its illumination, colour, style),
- the **high** band for **instance** queries, only from the exemplar's cells of the same instance (its detail).

As attention weights: for query s and exemplar key t, `w_low(s, t) = gamma * M_bg(s)` and
`w_high(s, t) = gamma * clip(sum_i M_i(s) M_i(t), 0, 1)` with `gamma = exemplar_scale`, applied as additive logit
biases `log w` (`-inf` where w = 0) next to the query's own keys (weight 1, or the region bias if set). So
`gamma = 0` is the path without exemplar, and an exemplar whose keys equal the queries' own with the whole spectrum
in the low band and no instance is plain self-attention again (duplicated keys do not change a softmax) -- both
tested against the explicit weighted-softmax reference `exemplar_attention_reference`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..frequency import band_split, band_split_reference


def _to_grid(x: torch.Tensor, h: int, w: int) -> torch.Tensor:  # [..., S, D] -> [..., D, h, w]
    return x.transpose(-1, -2).unflatten(-1, (h, w))


def _from_grid(x: torch.Tensor) -> torch.Tensor:  # [..., D, h, w] -> [..., S, D]
    return x.flatten(-2).transpose(-1, -2)


def exemplar_weights(maps: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`(w_low [b, S, 1], w_high [b, S, S])` from instance maps `[b, n, S]` (see the module docstring)."""
    maps = maps.float()
    fg = maps.amax(dim=1) if maps.shape[1] else maps.new_zeros(maps.shape[0], maps.shape[2])
    w_low = (scale * (1.0 - fg)).unsqueeze(-1)
    w_high = scale * torch.einsum("bns,bnt->bst", maps, maps).clamp(0, 1)
    return w_low, w_high


def _log(w: torch.Tensor) -> torch.Tensor:
    return torch.where(w > 0, w.clamp_min(1e-30).log(), torch.full_like(w, float("-inf")))


def exemplar_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ek: torch.Tensor, ev: torch.Tensor,
                       maps: torch.Tensor, grid: tuple[int, int], *, rho: float = 0.35, band: str = "square",
                       scale: float = 1.0, attn_scale: float | None = None,
                       self_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Self-attention of `q, k, v` `[b, H, S, D]` with the exemplar's keys/values `ek, ev` `[b or 1, H, S, D]`
    (same grid `(h, w)`, S = h * w) appended as their low band (background queries) and high band (instance
    queries). `maps` `[b, n, S]` soft occupancy; `self_bias` an additive bias `[b or 1, 1 or H, S, S]` on the own keys.
    Returns `[b, H, S, D]` in q's dtype."""
    b, heads, s, d = q.shape
    h, w = grid
    if h * w != s or ek.shape[-2] != s or ev.shape[-2] != s:
        raise ValueError(f"exemplar_attention: grid {grid} does not hold the {s} queries and {ek.shape[-2]} exemplar keys")
    with torch.autocast(q.device.type, enabled=False):  # FFTs have no bf16 kernels
        kl, kh = band_split(_to_grid(ek.float(), h, w), rho, band)
        vl, vh = band_split(_to_grid(ev.float(), h, w), rho, band)
    kl, kh, vl, vh = (_from_grid(t).to(q.dtype).expand(b, -1, -1, -1) for t in (kl, kh, vl, vh))
    w_low, w_high = exemplar_weights(maps, scale)
    own = torch.zeros(b, 1, s, s, device=q.device, dtype=torch.float32)
    if self_bias is not None:
        own = (own + self_bias.float()).expand(b, -1, -1, -1)
    hb = own.shape[1]
    bias = torch.cat([own, _log(w_low).expand(b, s, s).unsqueeze(1).expand(-1, hb, -1, -1),
                      _log(w_high).unsqueeze(1).expand(-1, hb, -1, -1)], dim=-1)
    keys, values = torch.cat([k, kl, kh], dim=2), torch.cat([v, vl, vh], dim=2)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias.to(q.dtype), scale=attn_scale)


def exemplar_attention_reference(q, k, v, ek, ev, maps, grid, *, rho=0.35, band="square", scale=1.0,
                                 attn_scale=None) -> torch.Tensor:
    """The definition in float64: explicit DFT band split and a softmax with explicit weights
    `sum_t w_t exp(l_t) v_t / sum_t w_t exp(l_t)` (weight 1 on the own keys)."""
    b, heads, s, d = q.shape
    h, w = grid
    q, k, v = q.double(), k.double(), v.double()
    kl, kh = band_split_reference(_to_grid(ek.double(), h, w), rho, band)
    vl, vh = band_split_reference(_to_grid(ev.double(), h, w), rho, band)
    kl, kh, vl, vh = (_from_grid(t).expand(b, -1, -1, -1) for t in (kl, kh, vl, vh))
    w_low, w_high = exemplar_weights(maps.double(), scale)
    sc = attn_scale if attn_scale is not None else 1.0 / math.sqrt(d)
    out = torch.empty_like(q)
    for i in range(b):
        for j in range(s):
            logits = torch.cat([k[i, :, :, :] @ q[i, :, j, :, None], kl[i] @ q[i, :, j, :, None],
                                kh[i] @ q[i, :, j, :, None]], dim=1)[..., 0] * sc  # [H, 3S]
            weights = torch.cat([torch.ones(s, dtype=torch.float64), w_low[i, j].expand(s).double(),
                                 w_high[i, j].double()])
            e = weights * torch.exp(logits - logits.amax(dim=-1, keepdim=True))
            vals = torch.cat([v[i], vl[i], vh[i]], dim=1)  # [H, 3S, D]
            out[i, :, j] = (e[..., None] * vals).sum(1) / e.sum(-1, keepdim=True)
    return out


def noised_exemplar(latents: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
                    timestep: float | None) -> torch.Tensor:
    """The exemplar's clean latents `x0` at the forward's timestep: `sqrt(a_t) x0 + sqrt(1 - a_t) noise` (the
    variance-preserving form every SD-style scheduler hands the UNet). `timestep` None: x0 itself."""
    if timestep is None:
        return latents
    index = int(min(max(round(float(timestep)), 0), alphas_cumprod.numel() - 1))
    a = float(alphas_cumprod[index])
    return math.sqrt(a) * latents + math.sqrt(1.0 - a) * noise.to(latents)


def load_exemplar_image(image: Any, height: int, width: int) -> torch.Tensor:
    """An exemplar image (path, PIL image, or tensor `[3, H, W]` / `[1, 3, H, W]` in [0, 1]) -> `[1, 3, height,
    width]` in [-1, 1] (what the VAE encodes)."""
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        from PIL import Image

        with Image.open(image) as im:
            image = im.convert("RGB")
    if not isinstance(image, torch.Tensor):
        try:
            import numpy as np

            image = torch.from_numpy(np.asarray(image.convert("RGB"), dtype="float32") / 255.0).permute(2, 0, 1)
        except AttributeError as err:
            raise TypeError(
                f"ficgen: exemplar_image must be a path, a PIL image or a tensor [3, H, W] in [0, 1], got "
                f"{type(image).__name__}"
            ) from err
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"ficgen: exemplar_image tensor must be [3, H, W] or [1, 3, H, W], got {tuple(image.shape)}")
    image = F.interpolate(image.float(), size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return image.clamp(0, 1) * 2 - 1


def encode_exemplar(pipe: Any, pixels: torch.Tensor, device: Any = None) -> torch.Tensor:
    """Pixels `[b, 3, H, W]` in [-1, 1] -> the VAE's scaled clean latents (the distribution's mode)."""
    vae = pipe.vae
    device = device or next(vae.parameters()).device
    with torch.no_grad():
        dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
        return dist.mode() * vae.config.scaling_factor
