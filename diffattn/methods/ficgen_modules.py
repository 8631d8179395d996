"""FICGen's trainable modules as `nn.Module`s (facts file §3.1 B-D), sized for small UNets.

- `FrequencyProtos`: inside every bottleneck of the reference encoders, the 3x3-conv output is band-passed with the
  square FFT mask (low for the background encoder, high for the instance encoder) and re-weighted:
  `Re(ifft2(ifftshift(F m))) * sigmoid(conv3x3(x)) * sqrt(SE(Re F m)^2 + SE(Im F m)^2 + 1e-8)`
  (orthonormal FFTs here, so the amplitude term does not grow with the map size).
- `ResConvNet` (7x7 stride-2 conv, max-pool, three stages of two bottlenecks) + a Perceiver `Resampler`:
  `SerialSampler` turns each instance's reference patch into 16 "frequency prototype" tokens (high band) and the
  background exemplar into 8 (low band); `PositionNet` embeds each box (Fourier features -> MLP) as one token.
- `VFELayer`, one per chosen attn2: the frozen cross-attention outputs (prompt O_0 and per phrase O_i, computed by
  the method) are masked and enriched -- instance i: `O_i M_i + CrossAttn_obj(LN x; [pooled phrase_i, HF_i, box_i]) M_i`,
  background: `O_0 M_bg + CrossAttn_bg(LN x; [pooled prompt, LF]) M_bg` -- plus a layout self-attention T on x whose
  logits are masked to pairs sharing a region; then `ASFA` aggregates the phases [bg, instances, T].
- `ASFA`: per phase `s = conv1x1([phase; mask])`, `score = CBAM(s) + conv1x1(dwconv3x3([Attn_S(LN s); Attn_F(LN s)]))`,
  softmax over the phases (and an all-zero null phase), output `sum_p phase_p w_p`. `Attn_F` is channel-wise
  attention on `fft2(s)` with L2-normalised q, k, a learned temperature and the "complex softmax" (softmax of the
  real and imaginary parts separately), `|ifft2(attn v)|` joined with `|ifft2(SE(Re F) F)|`.

Differences from upstream, on purpose (documented in docs/ficgen.md): widths are small (the demo UNet has 64-128
channels; upstream's encoders reach 1024 channels and its resamplers are 1280 wide); the phases are the attention
outputs *before* the frozen `to_out` (which then projects the aggregate), so the same processor path serves both
variants; ASFA's score starts at zero on top of a fixed prior `log(w_p m_p + eps)` (w = 1 for the background, 10 per
instance, as RefinedShader), so training starts from the training-free mix instead of a uniform average of phases,
and the new attention outputs start at zero.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..frequency import low_pass_mask
from .ficgen_parts import block_name, parse_layers, pooled, region_bias

logger = logging.getLogger("diffattn")

WEIGHTS_NAME = "ficgen_modules.safetensors"
CONFIG_NAME = "ficgen_modules.json"


@dataclass
class ModulesConfig:
    """Sizes of the trainable modules; `layers` maps attn2 module paths to their (query channels, inner channels)."""

    context_dim: int
    layers: dict[str, list[int]] = field(default_factory=dict)
    rho: float = 0.35
    reference_size: int = 64
    encoder_width: int = 8
    resampler_dim: int = 64
    resampler_depth: int = 2
    resampler_heads: int = 4
    hf_queries: int = 16
    lf_queries: int = 8
    attn_dim: int = 64
    attn_heads: int = 4
    asfa_dim: int = 32
    asfa_heads: int = 4
    instance_weight: float = 10.0
    fourier_freqs: int = 8

    def __post_init__(self) -> None:
        for name in ("context_dim", "reference_size", "encoder_width", "resampler_dim", "attn_dim", "asfa_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ModulesConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.reference_size % 16:
            raise ValueError(f"ModulesConfig.reference_size must be a multiple of 16, got {self.reference_size}")
        for dim, heads in ((self.resampler_dim, self.resampler_heads), (self.attn_dim, self.attn_heads),
                           (self.asfa_dim, self.asfa_heads)):
            if dim % heads:
                raise ValueError(f"ModulesConfig: width {dim} is not a multiple of its head count {heads}")


# ---- building blocks ----------------------------------------------------------------------------------------------
class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc(x.mean(dim=(-2, -1))))[..., None, None]


class FrequencyProtos(nn.Module):
    """FICGen's frequency re-weighting of a feature map `[B, C, H, W]` with the square FFT mask (`mode` low/high)."""

    def __init__(self, channels: int, rho: float = 0.35, mode: str = "high") -> None:
        super().__init__()
        if mode not in ("low", "high"):
            raise ValueError(f"FrequencyProtos mode must be 'low' or 'high', got {mode!r}")
        self.rho, self.mode = rho, mode
        self.spatial = nn.Conv2d(channels, 1, 3, padding=1)
        self.se_real, self.se_imag = SqueezeExcite(channels), SqueezeExcite(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        mask = low_pass_mask(h, w, self.rho, "square").to(x.device, torch.float32)
        if self.mode == "high":
            mask = 1 - mask
        spectrum = torch.fft.fftshift(torch.fft.fft2(x.float(), norm="ortho"), dim=(-2, -1)) * mask
        band = torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1)), norm="ortho").real
        amplitude = torch.sqrt(self.se_real(spectrum.real) ** 2 + self.se_imag(spectrum.imag) ** 2 + 1e-8)
        return (band * torch.sigmoid(self.spatial(x)).float() * amplitude).to(x.dtype)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, rho: float, mode: str) -> None:
        super().__init__()
        mid = max(4, cout // 4)
        self.reduce = nn.Sequential(nn.Conv2d(cin, mid, 1), nn.GroupNorm(1, mid), nn.SiLU())
        self.conv = nn.Sequential(nn.Conv2d(mid, mid, 3, stride=stride, padding=1), nn.GroupNorm(1, mid), nn.SiLU())
        self.freq = FrequencyProtos(mid, rho, mode)
        self.expand = nn.Sequential(nn.Conv2d(mid, cout, 1), nn.GroupNorm(1, cout))
        self.skip = nn.Identity() if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.expand(self.freq(self.conv(self.reduce(x)))) + self.skip(x))


class ResConvNet(nn.Module):
    """Reference image `[B, 3, r, r]` -> tokens `[B, (r/16)^2, 16 * width]`."""

    def __init__(self, width: int, rho: float, mode: str) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 7, stride=2, padding=3), nn.SiLU(), nn.MaxPool2d(3, 2, 1))
        stages, cin = [], width
        for cout, stride in ((4 * width, 1), (8 * width, 2), (16 * width, 2)):
            stages += [Bottleneck(cin, cout, stride, rho, mode), Bottleneck(cout, cout, 1, rho, mode)]
            cin = cout
        self.stages = nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x)).flatten(2).transpose(1, 2)


class Resampler(nn.Module):
    """Perceiver resampler (IP-Adapter style): learned queries attend to [tokens; queries]."""

    def __init__(self, in_dim: int, dim: int, depth: int, heads: int, queries: int, out_dim: int) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(in_dim, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([nn.LayerNorm(dim), nn.LayerNorm(dim), nn.MultiheadAttention(dim, heads, batch_first=True),
                           nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))])
            for _ in range(depth)
        )
        self.proj_out = nn.Sequential(nn.Linear(dim, out_dim), nn.LayerNorm(out_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(tokens)
        lat = self.latents.expand(x.shape[0], -1, -1)
        for norm_x, norm_l, attn, ff in self.layers:
            ln = norm_l(lat)
            kv = torch.cat([norm_x(x), ln], dim=1)
            lat = lat + attn(ln, kv, kv, need_weights=False)[0]
            lat = lat + ff(lat)
        return self.proj_out(lat)


class PositionNet(nn.Module):
    """Box `[..., 4]` -> one token: Fourier features (`freqs` per coordinate, sin and cos) -> MLP."""

    def __init__(self, out_dim: int, freqs: int = 8, hidden: int = 128) -> None:
        super().__init__()
        self.register_buffer("bands", (2.0 ** torch.arange(freqs)) * math.pi, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(4 * 2 * freqs, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, out_dim))

    def forward(self, boxes: torch.Tensor) -> torch.Tensor:
        angles = boxes.float()[..., None] * self.bands
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2))


class SerialSampler(nn.Module):
    """High-band prototypes of instance patches, low-band prototypes of the background exemplar, box tokens."""

    def __init__(self, cfg: ModulesConfig) -> None:
        super().__init__()
        width = cfg.encoder_width
        self.hf_encoder = ResConvNet(width, cfg.rho, "high")
        self.lf_encoder = ResConvNet(width, cfg.rho, "low")
        args = (16 * width, cfg.resampler_dim, cfg.resampler_depth, cfg.resampler_heads)
        self.hf_resampler = Resampler(*args, cfg.hf_queries, cfg.context_dim)
        self.lf_resampler = Resampler(*args, cfg.lf_queries, cfg.context_dim)
        self.position = PositionNet(cfg.context_dim, cfg.fourier_freqs)
        self.size = cfg.reference_size

    def forward(self, patches: torch.Tensor, exemplar: torch.Tensor, boxes: torch.Tensor):
        """patches `[b, n, 3, r, r]`, exemplar `[b, 3, r, r]`, boxes `[b, n, 4]` -> HF `[b, n, 16, D]`, LF `[b, 8, D]`,
        box tokens `[b, n, 1, D]`."""
        b, n = patches.shape[:2]
        hf = self.hf_resampler(self.hf_encoder(patches.flatten(0, 1))).unflatten(0, (b, n))
        lf = self.lf_resampler(self.lf_encoder(exemplar))
        return hf, lf, self.position(boxes).unsqueeze(2)


class CrossAttention(nn.Module):
    """Multi-head attention of `x` `[B, S, Cq]` over `ctx` `[B, T, Cc]`, output `[B, S, Cout]` (zero-initialised)."""

    def __init__(self, query_dim: int, context_dim: int, inner: int, heads: int, out_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = nn.Linear(query_dim, inner), nn.Linear(context_dim, inner), nn.Linear(context_dim, inner)
        self.to_out = nn.Linear(inner, out_dim)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.to_q(x)), heads(self.to_k(ctx)), heads(self.to_v(ctx)), attn_mask=bias)
        return self.to_out(out.transpose(1, 2).flatten(-2))


class CBAM(nn.Module):
    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))
        self.spatial = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ca = torch.sigmoid(self.mlp(x.mean(dim=(-2, -1))) + self.mlp(x.amax(dim=(-2, -1))))[..., None, None]
        x = x * ca
        sa = torch.sigmoid(self.spatial(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)))
        return x * sa


class FrequencyChannelAttention(nn.Module):
    """ASFA's Attn_F: channel-wise ("transposed") attention on `fft2(s)` with the complex softmax."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.se = SqueezeExcite(channels, reduction=4)
        self.proj = nn.Conv2d(2 * channels, channels, 1)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        b, c, h, w = s.shape
        spec = torch.fft.fft2(s.float(), norm="ortho")
        qkv = spec.reshape(b, self.heads, c // self.heads, h * w)
        unit = qkv / qkv.abs().pow(2).sum(-1, keepdim=True).clamp_min(1e-12).sqrt()
        logits = (unit @ unit.conj().transpose(-1, -2)) * self.temperature
        attn = torch.complex(torch.softmax(logits.real, -1), torch.softmax(logits.imag, -1))
        a = torch.fft.ifft2((attn @ qkv).reshape(b, c, h, w), norm="ortho").abs()
        g = torch.fft.ifft2(self.se(spec.real) * spec, norm="ortho").abs()
        return self.proj(torch.cat([a, g], dim=1).to(s.dtype))


class ASFA(nn.Module):
    """Adaptive Spatial-Frequency Aggregation of phases `[P, B, C, H, W]` with masks `[P, B, 1, H, W]`."""

    def __init__(self, channels: int, dim: int, heads: int) -> None:
        super().__init__()
        self.inp = nn.Conv2d(channels + 1, dim, 1)
        self.cbam = CBAM(dim)
        self.norm = nn.LayerNorm(dim)
        self.attn_s = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.attn_f = FrequencyChannelAttention(dim, heads)
        self.mix = nn.Sequential(nn.Conv2d(2 * dim, 2 * dim, 3, padding=1, groups=2 * dim), nn.Conv2d(2 * dim, dim, 1))
        self.score = nn.Conv2d(dim, channels, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def scores(self, phases: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        p, b, c, h, w = phases.shape
        s = self.inp(torch.cat([phases, masks.to(phases.dtype)], dim=2).flatten(0, 1))  # [P*B, d, H, W]
        tokens = self.norm(s.flatten(2).transpose(1, 2))
        spatial = self.attn_s(tokens, tokens, tokens, need_weights=False)[0].transpose(1, 2).reshape_as(s)
        freq = self.attn_f(tokens.transpose(1, 2).reshape_as(s))
        score = self.cbam(s) + self.mix(torch.cat([spatial, freq], dim=1))
        return self.score(score).unflatten(0, (p, b))

    def forward(self, phases: torch.Tensor, masks: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """`prior` `[P + 1, B, 1, H, W]`: fixed log-weights of the phases and the null phase (-inf: excluded)."""
        null = torch.zeros_like(phases[:1])
        everything = torch.cat([phases, null], dim=0)
        logits = self.scores(everything, torch.cat([masks, torch.zeros_like(masks[:1])], dim=0)).float() + prior
        weights = torch.softmax(logits, dim=0)[:-1]
        return (weights * phases.float()).sum(0).to(phases.dtype)


class VFELayer(nn.Module):
    """The trained replacement of one attn2's mix (see the module docstring)."""

    def __init__(self, query_dim: int, channels: int, cfg: ModulesConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(query_dim)
        self.obj = CrossAttention(query_dim, cfg.context_dim, cfg.attn_dim, cfg.attn_heads, channels)
        self.bg = CrossAttention(query_dim, cfg.context_dim, cfg.attn_dim, cfg.attn_heads, channels)
        self.layout = CrossAttention(query_dim, query_dim, cfg.attn_dim, cfg.attn_heads, channels)
        self.asfa = ASFA(channels, cfg.asfa_dim, cfg.asfa_heads)
        self.instance_weight = cfg.instance_weight

    def forward(self, x, global_out, phrase_out, maps, tokens, hw) -> torch.Tensor:
        """x `[B, S, Cq]`; global_out `[B, H, S, D]`; phrase_out `[B, n, H, S, D]`; maps `[B, n, S]`; tokens from
        `FICGenModules.tokens` (expanded to B rows). Returns `[B, H, S, D]`. Runs in the modules' own dtype with
        autocast off (the FFTs and complex products have no bf16 kernels; the modules are small)."""
        with torch.autocast(x.device.type, enabled=False):
            return self._forward(x, global_out, phrase_out, maps, tokens, hw)

    def _forward(self, x, global_out, phrase_out, maps, tokens, hw) -> torch.Tensor:
        b, heads, s, d = global_out.shape
        n = phrase_out.shape[1]
        hf, lf, box, phrase_pooled, text_pooled, valid = tokens
        g = global_out.transpose(1, 2).flatten(-2)  # [B, S, C]
        p = phrase_out.transpose(2, 3).flatten(-2)  # [B, n, S, C]
        xn = self.norm(x)
        bg_map = (1.0 - maps.amax(dim=1)) if n else torch.ones_like(maps[:, 0])  # [B, S]
        ctx_obj = torch.cat([phrase_pooled.unsqueeze(2), hf, box], dim=2).flatten(0, 1)  # [B*n, T, D]
        ea = self.obj(xn.unsqueeze(1).expand(-1, n, -1, -1).flatten(0, 1), ctx_obj).unflatten(0, (b, n))
        m = maps.unsqueeze(-1).to(g.dtype)
        inst = (p + ea) * m  # [B, n, S, C]
        ea0 = self.bg(xn, torch.cat([text_pooled.unsqueeze(1), lf], dim=1))
        mb = bg_map.unsqueeze(-1).to(g.dtype)
        back = (g + ea0) * mb
        bias = region_bias(maps, math.inf).to(xn.dtype)
        template = self.layout(xn, xn, bias)
        h, w = hw

        def grid(t: torch.Tensor) -> torch.Tensor:  # [..., S, C] -> [..., C, H, W]
            return t.transpose(-1, -2).unflatten(-1, (h, w))

        phases = torch.cat([grid(back).unsqueeze(0), grid(inst).transpose(0, 1), grid(template).unsqueeze(0)], dim=0)
        mask_list = torch.cat([bg_map.unsqueeze(0), maps.transpose(0, 1), torch.ones_like(bg_map).unsqueeze(0)], dim=0)
        masks = mask_list.unflatten(-1, (h, w)).unsqueeze(2)  # [P, B, 1, H, W]
        eps = 1e-4
        weights = torch.cat([
            bg_map.unsqueeze(0), self.instance_weight * maps.transpose(0, 1),
            torch.full_like(bg_map, eps).unsqueeze(0), torch.full_like(bg_map, eps).unsqueeze(0),
        ], dim=0)
        prior = torch.log(weights.float() + eps)
        invalid = torch.cat([torch.zeros(1, b, dtype=torch.bool, device=valid.device), ~valid.t(),
                             torch.zeros(2, b, dtype=torch.bool, device=valid.device)], dim=0)
        prior = prior.masked_fill(invalid[..., None], float("-inf")).unflatten(-1, (h, w)).unsqueeze(2)
        out = self.asfa(phases, masks, prior)  # [B, C, H, W]
        return out.flatten(2).transpose(1, 2).unflatten(-1, (heads, d)).transpose(1, 2)


def _key(path: str) -> str:
    return path.replace(".", "__")


class FICGenModules(nn.Module):
    """All trainable FICGen modules of one UNet: the shared `SerialSampler` and one `VFELayer` per chosen attn2."""

    def __init__(self, cfg: ModulesConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.sampler = SerialSampler(cfg)
        self.layers = nn.ModuleDict({_key(path): VFELayer(qd, ch, cfg) for path, (qd, ch) in cfg.layers.items()})

    @classmethod
    def for_unet(cls, unet: nn.Module, layers: Any = "mid,up1", **sizes: Any) -> FICGenModules:
        """Modules for the attn2 layers of `unet` that `layers` names (as the method's `layers` option)."""
        names, indices, every = parse_layers(layers)
        found: dict[str, list[int]] = {}
        index = -1
        for path, module in unet.named_modules():
            if type(module).__name__ != "BasicTransformerBlock":
                continue
            index += 1
            attn = getattr(module, "attn2", None)
            if attn is None or not getattr(attn, "is_cross_attention", False):
                continue
            if every or index in indices or block_name(path) in names:
                found[f"{path}.attn2"] = [attn.to_q.in_features, attn.to_q.out_features]
        if not found:
            raise ValueError(f"FICGenModules: no cross-attention layer of this UNet matches layers={layers!r}")
        return cls(ModulesConfig(context_dim=unet.config.cross_attention_dim, layers=found, **sizes))

    def for_layer(self, path: str, hw: tuple[int, int], channels: int) -> VFELayer | None:
        layer = self.layers[_key(path)] if _key(path) in self.layers else None
        if layer is not None and self.cfg.layers[path][1] != channels:
            raise ValueError(f"FICGen modules for {path} expect {self.cfg.layers[path][1]} channels, got {channels}")
        return layer

    def tokens(self, inputs: Any, text_pooled: torch.Tensor, rows: int, device: torch.device, dtype: torch.dtype):
        """Reference tokens of one forward's inputs (computed once per inputs object and row count)."""
        cache = inputs.cache
        key = ("tokens", id(self), rows, device, dtype)
        if key in cache:
            return cache[key]
        b, n = inputs.phrase_embeds.shape[:2]
        r = self.cfg.reference_size
        param = next(self.parameters())
        patches = inputs.patches if inputs.patches is not None else torch.zeros(b, n, 3, r, r)
        exemplar = inputs.exemplar if inputs.exemplar is not None else torch.zeros(b, 3, r, r)
        patches = F.interpolate(patches.flatten(0, 1).to(param.device, param.dtype), size=(r, r), mode="bilinear",
                                antialias=True, align_corners=False).unflatten(0, (b, n))
        exemplar = F.interpolate(exemplar.to(param.device, param.dtype), size=(r, r), mode="bilinear", antialias=True,
                                 align_corners=False)
        with torch.autocast(param.device.type, enabled=False):
            hf, lf, box = self.sampler(patches, exemplar, inputs.boxes.to(param.device, param.dtype))
        phrase_pooled = inputs.phrase_pooled if inputs.phrase_pooled is not None else pooled(inputs.phrase_embeds)
        out = [hf, lf, box, phrase_pooled.to(param.device, param.dtype), None, inputs.valid.to(param.device)]
        if b == 1 and rows > 1:
            out = [t.expand(rows, *t.shape[1:]) if t is not None else None for t in out]
        out[4] = text_pooled.to(param.device, param.dtype)
        out = tuple(t.to(device=device, dtype=dtype) if t is not None and t.is_floating_point() else t for t in out)
        cache[key] = out
        return out


def save_modules(modules: FICGenModules, folder: str | os.PathLike, dtype: torch.dtype = torch.float16,
                 extra: dict[str, Any] | None = None) -> str:
    """Write `ficgen_modules.safetensors` (in `dtype`) and `ficgen_modules.json` (sizes, layers) into `folder`."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in modules.state_dict().items()}
    save_file(state, os.path.join(folder, WEIGHTS_NAME))
    with open(os.path.join(folder, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump({"modules": asdict(modules.cfg), **(extra or {})}, f, indent=2)
    return str(folder)


def load_modules(folder: str | os.PathLike, device: Any = None) -> FICGenModules:
    """The modules saved by `save_modules` (float32 parameters)."""
    from safetensors.torch import load_file

    folder = str(folder)
    cfg_path, weights_path = os.path.join(folder, CONFIG_NAME), os.path.join(folder, WEIGHTS_NAME)
    for path in (cfg_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ficgen weights: {path} not found (weights= is a folder written by ficgen_train)")
    with open(cfg_path, encoding="utf-8") as f:
        meta = json.load(f)
    modules = FICGenModules(ModulesConfig(**meta["modules"]))
    state = {k: v.float() for k, v in load_file(weights_path).items()}
    modules.load_state_dict(state)
    modules.eval().requires_grad_(False)
    return modules.to(device) if device is not None else modules
