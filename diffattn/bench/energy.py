"""Attention energy decay: how much attention mass a video/image query puts on keys at each distance.

Measured in a dense generation by `EnergyProbe`, a stand-in for a method's runtime that computes the dense output
(exactly `dense_attention`) and, for every self/joint attention call with a token grid, the softmax probabilities of
a few sampled video/image queries against all keys (from the very q, k and scale the processor hands the method).
Mass is binned by the query-key distance on the token grid: temporal |dt| in frames and spatial distance in token
units (Euclidean distance between (row, column) positions, rounded to the nearest integer). Joint models' text keys
get their own bin. Per query the bins (plus text) sum to 1.

Read as: "mass per key at distance d" = the average probability of one key at that distance (compare with 1/keys,
the uniform level); "mass at distance d" = the share of a query's attention spent at that distance. Sparse methods
keep the near keys; a fast decay of mass per key with distance is what makes them close to dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..call import AttentionCall
from ..methods.base import dense_attention


@dataclass
class EnergyDecay:
    """Sums over every probed (call, batch row, head, sampled query).

    `mass[dt][ds]`: summed probability of visual keys at temporal distance dt and spatial distance ds; `keys[dt][ds]`:
    number of (query, key) pairs at that distance (same weighting as `mass`); `queries`: probed query rows;
    `text_mass`: summed probability of text keys (joint models; 0 for Wan's self-attention).
    """

    grid: tuple[int, int, int]
    mass: list[list[float]]
    keys: list[list[float]]
    queries: int
    text_mass: float = 0.0
    calls: int = 0

    def total_mass(self) -> float:
        """Mean total probability per query (visual bins + text): 1 up to rounding."""
        return (sum(map(sum, self.mass)) + self.text_mass) / max(self.queries, 1)

    def uniform_level(self) -> float:
        """Mass per key if each query spread its visual-key mass evenly over all visual keys (the flat reference)."""
        visual = sum(map(sum, self.mass)) / max(self.queries, 1)
        return visual / (self.grid[0] * self.grid[1] * self.grid[2])

    def _profile(self, rows: list[int] | None, axis: str) -> list[dict[str, float]]:
        dts = range(len(self.mass)) if rows is None else rows
        if axis == "temporal":
            pairs = [(dt, sum(self.mass[dt]), sum(self.keys[dt])) for dt in dts]
        else:
            width = len(self.mass[0])
            pairs = [
                (ds, sum(self.mass[dt][ds] for dt in dts), sum(self.keys[dt][ds] for dt in dts)) for ds in range(width)
            ]
        q = max(self.queries, 1)
        return [
            {"distance": d, "mass": m / q, "mass_per_key": (m / k if k else 0.0), "keys_per_query": k / q}
            for d, m, k in pairs
            if k > 0
        ]

    def by_temporal(self) -> list[dict[str, float]]:
        """Per |dt|: mass per query, mean mass per key, keys per query (all spatial distances together)."""
        return self._profile(None, "temporal")

    def by_spatial(self, same_frame: bool = False) -> list[dict[str, float]]:
        """Per spatial distance: over all frames, or only keys in the query's own frame (`same_frame`)."""
        return self._profile([0] if same_frame else None, "spatial")

    def to_dict(self) -> dict[str, Any]:
        return {
            "grid": list(self.grid), "queries": self.queries, "calls": self.calls, "text_mass": self.text_mass / max(self.queries, 1),
            "total_mass": self.total_mass(), "by_temporal": self.by_temporal(), "by_spatial": self.by_spatial(),
            "by_spatial_same_frame": self.by_spatial(same_frame=True),
            "mass": self.mass, "keys": self.keys,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EnergyDecay:
        """Back from `to_dict` (e.g. a bench's JSON)."""
        queries = int(data["queries"])
        return cls(tuple(data["grid"]), data["mass"], data["keys"], queries, float(data["text_mass"]) * queries,
                   int(data.get("calls", 0)))


@dataclass
class _Accumulator:
    grid: tuple[int, int, int]
    coords: torch.Tensor  # [3, n] (frame, row, column) of every visual token
    width: int
    mass: torch.Tensor
    keys: torch.Tensor
    queries: int = 0
    text_mass: torch.Tensor | None = None
    calls: int = 0


@dataclass
class EnergyProbe:
    """Computes dense attention and records the attention mass of `queries` sampled visual queries per call.

    Install it in place of a method runtime (`diffattn.api.replace_runtime(pipe, probe)` after
    `diffattn.apply(pipe, "dense")`): its outputs equal dense's. Sampling uses its own generator, so the
    pipeline's random numbers are untouched.
    """

    queries: int = 64
    seed: int = 0
    name: str = "dense"
    _acc: dict[tuple[int, int, int], _Accumulator] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.queries < 1:
            raise ValueError(f"queries must be >= 1, got {self.queries}")
        self._gen = torch.Generator().manual_seed(self.seed)

    def attend(self, call: AttentionCall) -> torch.Tensor:
        out = dense_attention(call)
        if call.role in ("self", "joint") and call.grid is not None and call.grid.num_tokens == call.num_visual:
            with torch.no_grad():
                self._record(call)
        return out

    def _accumulator(self, grid: tuple[int, int, int], device: torch.device) -> _Accumulator:
        acc = self._acc.get(grid)
        if acc is None:
            t, h, w = grid
            pos = torch.arange(t * h * w)
            coords = torch.stack([pos // (h * w), (pos // w) % h, pos % w])
            width = round(math.hypot(h - 1, w - 1)) + 1
            size = t * width
            acc = _Accumulator(
                grid, coords.to(device), width,
                torch.zeros(size, dtype=torch.float64, device=device), torch.zeros(size, dtype=torch.float64, device=device),
                text_mass=torch.zeros((), dtype=torch.float64, device=device),
            )
            self._acc[grid] = acc
        return acc

    def _record(self, call: AttentionCall) -> None:
        vis = call.visual_slice()
        grid = tuple(call.grid)
        n = call.num_visual
        acc = self._accumulator(grid, call.q.device)
        m = min(self.queries, n)
        rows = torch.randperm(n, generator=self._gen)[:m].to(call.q.device)
        q = call.q[:, :, vis][:, :, rows].float()
        k = call.k.float()
        scale = call.scale if call.scale is not None else q.shape[-1] ** -0.5
        logits = (q @ k.transpose(-1, -2)) * scale  # [B, H, m, Sk]
        mask = call.attn_mask
        if mask is not None:
            if mask.shape[-2] == call.q.shape[2]:
                mask = mask[..., vis, :][..., rows, :]
            if mask.dtype == torch.bool:
                logits = logits.masked_fill(~mask, float("-inf"))
            else:
                logits = logits + mask.float()
        probs = torch.softmax(logits, dim=-1)
        b, heads = probs.shape[:2]
        key_vis = probs[..., vis]  # keys and queries share the sequence in self/joint attention
        per_pair = key_vis.sum(dim=(0, 1)).double()  # [m, n]
        c = acc.coords
        dt = (c[0, rows, None] - c[0, None, :]).abs()
        ds = torch.sqrt(((c[1, rows, None] - c[1, None, :]) ** 2 + (c[2, rows, None] - c[2, None, :]) ** 2).double())
        idx = (dt * acc.width + ds.round().long()).reshape(-1)
        acc.mass.scatter_add_(0, idx, per_pair.reshape(-1))
        acc.keys.scatter_add_(0, idx, torch.full_like(per_pair.reshape(-1), float(b * heads)))
        acc.text_mass += (probs.sum(dim=-1) - key_vis.sum(dim=-1)).double().sum()
        acc.queries += b * heads * m
        acc.calls += 1

    def results(self) -> list[EnergyDecay]:
        """One `EnergyDecay` per token grid seen (one per model run at one size)."""
        out = []
        for acc in self._acc.values():
            t = acc.grid[0]
            mass = acc.mass.cpu().reshape(t, acc.width).tolist()
            keys = acc.keys.cpu().reshape(t, acc.width).tolist()
            out.append(EnergyDecay(acc.grid, mass, keys, acc.queries, float(acc.text_mass.item()), acc.calls))
        return out


# ---- plot (Pillow: matplotlib is not a dependency) -------------------------------------------------------------

def plot_energy_decay(decays: dict[str, EnergyDecay], path: str | Path) -> str:
    """Two panels, log-scale y: mean attention mass per key vs temporal distance |dt| (frames) and vs spatial
    distance (tokens), one line per model (videos also: keys of the query's own frame only), dashed: the level of
    mass spread evenly over the visual keys. Returns the path written."""
    from PIL import Image, ImageDraw

    from .plot import LEGEND_ROW, PALETTE, default_font, log_panel

    font = default_font()
    temporal, spatial = [], []
    for i, (label, decay) in enumerate(decays.items()):
        color, other = PALETTE[(2 * i) % len(PALETTE)], PALETTE[(2 * i + 1) % len(PALETTE)]
        light = tuple(int(c + (255 - c) * 0.45) for c in color)
        uniform = decay.uniform_level()
        if decay.grid[0] > 1:
            prof = decay.by_temporal()
            temporal.append((label, [(p["distance"], p["mass_per_key"]) for p in prof], color, False))
            temporal.append((f"{label}: even spread", [(0, uniform), (prof[-1]["distance"], uniform)], light, True))
            same = decay.by_spatial(same_frame=True)
            spatial.append((f"{label}, same frame", [(p["distance"], p["mass_per_key"]) for p in same], other, False))
        prof = decay.by_spatial()
        spatial.append((label, [(p["distance"], p["mass_per_key"]) for p in prof], color, False))
        spatial.append((f"{label}: even spread", [(0, uniform), (prof[-1]["distance"], uniform)], light, True))
    width = 1200
    height = 380 + LEGEND_ROW * max(len(temporal), len(spatial))
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    log_panel(draw, (0, 0, width // 2, height), "attention mass per key vs temporal distance", "|dt| (frames)",
           temporal, font)
    log_panel(draw, (width // 2, 0, width, height), "attention mass per key vs spatial distance", "distance (tokens)",
           spatial, font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return str(path)
