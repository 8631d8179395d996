"""Token merging (ToMe bipartite soft matching) and agent attention as pure tensor functions, with references.

AgentSD (Han et al., ECCV 2024) on a self-attention layer of N tokens:

1. `bipartite_partition`: one destination token per `sx x sy` cell of the token grid (random within the cell,
   reproducible from a generator), the rest are sources.
2. `merge_assignment`: each source picks its most similar destination (cosine on a metric, e.g. the block's
   pre-norm input); the `r` best-matching sources merge into their destination. The result is an assignment
   `[B, N]` of every token to one of `N - r` slots; `merge` averages the tokens of each slot, `unmerge` copies each
   slot's value back to its tokens. The same ordering with `agent_r` sources gives the agents' slots.
3. `agent_attention`: agents aggregate the values (`softmax(A K^T s) V`), queries read them back with a softer
   temperature (`softmax(Q A^T s^power)`), plus `shortcut * V` (upstream's replacement for the depthwise conv).
   Extra keys (text tokens of joint DiT attention) join the broadcast softmax at the normal scale.

Everything is batched `[B, H, S, D]` like `F.scaled_dot_product_attention`; the fast paths are two SDPA calls,
`agent_attention_reference` materialises the softmaxes.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from .bipartite import ENV_VAR as BIPARTITE_ENV
from .bipartite import assign_slots, assign_slots_reference, best_match
from .common import resolve_backend, run_with_fallbacks

__all__ = [
    "agent_attention", "agent_attention_reference", "bipartite_partition", "merge", "merge_assignment",
    "merge_many", "merge_plans", "merge_reference", "pool_agents", "slot_weights", "unmerge",
]


def bipartite_partition(height: int, width: int, sx: int, sy: int, *, generator: torch.Generator | None = None,
                        randomize: bool = True, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Destination and source token indices (raster order over `height x width`), shared by the whole batch.

    One destination per full `sy x sx` cell (`(height // sy) * (width // sx)` of them); a random position within
    the cell from `generator` (CPU) when `randomize`, else the top-left one. Tokens of incomplete edge cells are
    sources. Returns `(dst [Nd], src [Ns])`, long, on `device`."""
    if sx < 1 or sy < 1:
        raise ValueError(f"sx and sy must be >= 1, got sx={sx}, sy={sy}")
    hs, ws = height // sy, width // sx
    if randomize:
        pick = torch.randint(sy * sx, (hs, ws), generator=generator)
    else:
        pick = torch.zeros(hs, ws, dtype=torch.long)
    rows = torch.arange(hs).view(-1, 1) * sy + pick // sx
    cols = torch.arange(ws).view(1, -1) * sx + pick % sx
    dst = (rows * width + cols).flatten()
    is_dst = torch.zeros(height * width, dtype=torch.bool)
    is_dst[dst] = True
    src = torch.nonzero(~is_dst).flatten()
    return dst.to(device), src.to(device)


def _ranked_sources(metric: torch.Tensor, dst: torch.Tensor, src: torch.Tensor,
                    backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sources ordered by their best cosine similarity to any destination (descending), and each one's best
    destination (a position in `dst`): `(order [B, Ns], best_dst [B, Ns])`. The similarity is `bipartite.best_match`
    (matmuls in the metric's dtype by default; the fused Triton kernel with backend="triton")."""
    if backend == "triton" or (backend is None and os.environ.get(BIPARTITE_ENV) == "triton"):
        best, best_dst = run_with_fallbacks("agent best_match", (metric.dtype, metric.shape[-1]), [
            ("triton", lambda: best_match(metric, dst, src, backend="triton")),
            ("blocked", lambda: best_match(metric, dst, src, backend="blocked"))])
    else:
        best, best_dst = best_match(metric, dst, src, backend=backend)
    order = best.argsort(dim=-1, descending=True, stable=True)
    return order, best_dst


def merge_plans(metric: torch.Tensor, dst: torch.Tensor, src: torch.Tensor, counts: list[int], *,
                backend: str | None = None) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """For each `r` in `counts`: `(assign [B, N] long, slots N - r, weights [B, slots] float32)`: the slot of
    every token after merging the `r` best-matching sources into their destinations, and 1 / tokens per slot.
    Slots: destinations `0..Nd-1` (in `dst` order), then the unmerged sources in ranking order. `metric` is
    `[B, N, C]`; one similarity for all counts. Fused kernels (`kernels.bipartite`) where Triton runs."""
    batch, n = metric.shape[:2]
    ns = src.numel()
    for r in counts:
        if not 0 <= r <= ns:
            raise ValueError(f"cannot merge r={r} of {ns} source tokens")
    order, best_dst = _ranked_sources(metric, dst, src, backend)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(ns, device=order.device).expand(batch, ns))  # rank of each source
    if resolve_backend(backend, metric.device, BIPARTITE_ENV) == "triton":
        plans = run_with_fallbacks("agent assign_slots", (len(counts),), [
            ("triton", lambda: assign_slots(rank, best_dst, dst, src, n, counts, backend="triton")),
            ("reference", lambda: assign_slots_reference(rank, best_dst, dst, src, n, counts))])
    else:
        plans = assign_slots_reference(rank, best_dst, dst, src, n, counts)
    return [(a, n - r, w) for (a, w), r in zip(plans, counts)]


def merge_assignment(metric: torch.Tensor, dst: torch.Tensor, src: torch.Tensor, counts: list[int], *,
                     backend: str | None = None) -> list[tuple[torch.Tensor, int]]:
    """`merge_plans` without the weights: `(assign [B, N], slots)` per count."""
    return [(a, s) for a, s, _ in merge_plans(metric, dst, src, counts, backend=backend)]


def slot_weights(assign: torch.Tensor, slots: int) -> torch.Tensor:
    """`1 / (tokens in each slot)` `[B, slots]` float32: computed once per assignment, shared by every merged tensor."""
    count = torch.zeros(assign.shape[0], slots, dtype=torch.float32, device=assign.device)
    count.scatter_add_(1, assign, torch.ones(assign.shape, dtype=torch.float32, device=assign.device))
    return count.clamp_min_(1).reciprocal_()


def merge_many(xs: list[torch.Tensor], assign: torch.Tensor, slots: int,
               weights: torch.Tensor | None = None) -> list[torch.Tensor]:
    """`merge` of several same-shaped tensors (q, k, v) in one scatter: `[T, B, H, N, D]` stacked, summed in
    float32 per slot, scaled by `weights` (`slot_weights`, computed here if None), cast back. ~6 launches for all
    of them instead of ~9 each."""
    if not xs:
        return []
    squeeze = xs[0].ndim == 3
    if squeeze:
        xs = [x.unsqueeze(1) for x in xs]
    b, h, n, d = xs[0].shape
    if weights is None:
        weights = slot_weights(assign, slots)
    stacked = torch.stack(xs).float() if len(xs) > 1 else xs[0].unsqueeze(0).float()
    acc = torch.zeros(len(xs), b, h, slots, d, dtype=torch.float32, device=stacked.device)
    acc.scatter_add_(3, assign.view(1, b, 1, n, 1).expand(len(xs), b, h, n, d), stacked)
    out = (acc * weights.view(1, b, 1, slots, 1)).to(xs[0].dtype)
    return [o.squeeze(1) if squeeze else o for o in out.unbind(0)]


def merge(x: torch.Tensor, assign: torch.Tensor, slots: int) -> torch.Tensor:
    """Mean of the tokens of each slot: `x [B, H, N, D]` (or `[B, N, D]`), `assign [B, N]` -> `[B, (H,) slots, D]`."""
    return merge_many([x], assign, slots)[0]


def unmerge(y: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """Every token takes its slot's value: `y [B, H, slots, D]` (or `[B, slots, D]`), `assign [B, N]`."""
    if y.ndim == 3:
        return y.gather(1, assign.unsqueeze(-1).expand(-1, -1, y.shape[-1]))
    b, h, _, d = y.shape
    return y.gather(2, assign.view(b, 1, -1, 1).expand(b, h, assign.shape[1], d))


def merge_reference(x: torch.Tensor, assign: torch.Tensor, slots: int) -> torch.Tensor:
    """`merge` by a loop over slots (the definition)."""
    out = torch.zeros(*x.shape[:-2], slots, x.shape[-1], dtype=x.dtype, device=x.device)
    for b in range(x.shape[0]):
        for s in range(slots):
            members = (assign[b] == s).nonzero().flatten()
            if members.numel():
                out[b, ..., s, :] = x[b, ..., members, :].float().mean(dim=-2).to(x.dtype)
    return out


def pool_agents(q: torch.Tensor, height: int, width: int, agent_grid: tuple[int, int]) -> torch.Tensor:
    """Agents by adaptive average pooling of the queries on their `height x width` grid: `[B, H, N, D]` ->
    `[B, H, gh * gw, D]` (the paper's agent tokens; the DiT variant)."""
    b, h, n, d = q.shape
    if n != height * width:
        raise ValueError(f"q has {n} tokens, the grid {height}x{width} holds {height * width}")
    grid = q.reshape(b * h, height, width, d).permute(0, 3, 1, 2)
    pooled = F.adaptive_avg_pool2d(grid.float(), agent_grid).to(q.dtype)
    return pooled.flatten(2).transpose(1, 2).reshape(b, h, -1, d)


def agent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, agents: torch.Tensor, *,
                    scale: float | None = None, broadcast_power: float = 0.3, shortcut: float = 0.075,
                    extra_k: torch.Tensor | None = None, extra_v: torch.Tensor | None = None,
                    fp32: bool = False) -> torch.Tensor:
    """Agent attention `[B, H, N, D]`:

        V_A = softmax(A K^T s) V                      (agents aggregate; s = scale, default D^-0.5)
        O   = softmax([Q A^T s^power, Q E_k^T s]) [V_A; E_v] + shortcut * V

    `agents` `[B, H, n, D]`; extra keys/values `E` `[B, H, T, D]` (text tokens) join the broadcast softmax at the
    normal scale. `fp32` computes both softmaxes in float32 (SD 2.1 overflows in fp16). Two SDPA calls."""
    d = q.shape[-1]
    s = d**-0.5 if scale is None else scale
    dtype = q.dtype
    if fp32:
        q, k, v, agents = q.float(), k.float(), v.float(), agents.float()
        extra_k = extra_k.float() if extra_k is not None else None
        extra_v = extra_v.float() if extra_v is not None else None
    agent_v = F.scaled_dot_product_attention(agents, k, v, scale=s)
    s2 = s**broadcast_power
    if extra_k is None:
        out = F.scaled_dot_product_attention(q, agents, agent_v, scale=s2)
    else:  # one softmax over agents (scale s2) and extra keys (scale s): fold the scales into the keys
        keys = torch.cat([agents * s2, extra_k * s], dim=2)
        out = F.scaled_dot_product_attention(q, keys, torch.cat([agent_v, extra_v], dim=2), scale=1.0)
    if shortcut:
        out = torch.add(out, v, alpha=shortcut)
    return out.to(dtype)


def agent_attention_reference(q, k, v, agents, *, scale=None, broadcast_power=0.3, shortcut=0.075, extra_k=None,
                              extra_v=None) -> torch.Tensor:
    """`agent_attention` with materialised float64 softmaxes (the definition)."""
    q, k, v, a = (t.double() for t in (q, k, v, agents))
    s = q.shape[-1] ** -0.5 if scale is None else scale
    agent_v = torch.softmax(a @ k.transpose(-1, -2) * s, dim=-1) @ v
    logits = q @ a.transpose(-1, -2) * s**broadcast_power
    values = agent_v
    if extra_k is not None:
        logits = torch.cat([logits, q @ extra_k.double().transpose(-1, -2) * s], dim=-1)
        values = torch.cat([agent_v, extra_v.double()], dim=2)
    out = torch.softmax(logits, dim=-1) @ values + shortcut * v
    return out


def agent_count(n: int, num_src: int, agent_ratio: float) -> int:
    """Upstream's number of agents: `N - min(int(N * agent_ratio), |src|)`."""
    return n - min(int(n * agent_ratio), num_src)


def merged_count(n: int, num_src: int, ratio: float) -> int:
    """Tokens merged away, `r = int(N * ratio)`, capped at the number of sources."""
    return min(int(n * ratio), num_src)


def downsample_of(latent_tokens: int, tokens: int) -> int:
    """Upstream's level gate: `ceil(sqrt(N_latent / N))` (1 at the UNet's top level, 2 one level down, ...)."""
    return int(math.ceil(math.sqrt(latent_tokens / tokens)))
