"""Neighborhood attention as block-sparse attention on tile-permuted tokens (the "fa4" and "gluon" backends).

Why: a plan whose every visited (query tile, key tile) pair is fully visible (`Plan.counts()["masked"] == 0`, e.g.
strided GNA with the stride a multiple of the query tile and window starts on key-tile boundaries, the configs
NATTEN calls "perfectly block-sparse") is *exactly* block-sparse attention once every tile is one contiguous run of
tokens. So the fastest block-sparse forwards we have (FlashAttention-4's CuTe-DSL block-sparse kernel, our Gluon
kernel) can run it from index lists, with no per-element mask at all.

The lowering, per plan (cached; depends on small integers only):
- permutation: tile-grid-major, then intra-tile (dilation groups become batch), q by the query tile, k/v by the key
  tile (both tiles have the same token count: the block size). Memory is token-major (`permute_rows`: whole H*D
  rows move, FA4's native `[B, S, H, D]`), by a Triton row gather through a cached row table where no gradient
  flows (`permute_triton.py`; torch's strided copies ran at ~1.5 TB/s on the H200), else by torch copies
  (differentiable); `layout="heads"` keeps `tiling.permute_tokens`'s head-major memory;
- block mask `[G or B*G, 1, nq, nk]`: query tile a attends key tile b iff per axis `q_tab[a_i] = [lo, hi)` holds b_i,
  the Kronecker AND of per-axis masks; built once per (plan, device, batch) and kept alive here, so the block-sparse
  index lists (`block_sparse.get_block_index`, cached per mask) are built once per plan too;
- attention: `block_sparse_attention(..., backend=name)` (its backward, autograd through the permutations);
- unpermute of the output (and lse), cropped to the grid.

Which configurations qualify (`lowering_reason` says why not, in words):
1. no masked tile pair in the plan at its tiles (given, or the simulator's choice): plain NA (stride 1), causal
   axes (a causal window grows row by row) and windows or strides not aligned to the tiles do not qualify;
   `propose_stride` gives the smallest stride that does;
2. the query and key tiles hold the same number of tokens (block-sparse uses one block size for both);
   fa4 then takes 64 or 128 tokens, gluon 128 (the block-sparse registry decides, reason included).
Padding is not a condition: with no masked pair a visited key tile never holds a padded key (every row's window
covers the whole tile), and padded query rows are cropped.

The permutation is a copy of q, k, v and of the output (about 3.2 GB of traffic at FLUX-4K, 0.76 ms at the H200's
copy bandwidth); a caller that keeps its
tokens in tile order for a whole forward can skip it: `lower(...)` returns the plan object with `permute_q`,
`permute_kv`, `attend` (on permuted tensors) and `unpermute`.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import threading
from dataclasses import dataclass

import torch

from .. import backends as registry
from ..common import triton_runs_on
from ..block_sparse import block_sparse_attention
from .checks import NAParams
from .tiling import Plan, permute_tokens, tile_pads, tile_view, unpermute_tokens

__all__ = ["BlockSparseLowering", "lower", "lowering_reason", "neighborhood_attention_block_sparse"]

#: block-sparse backends a neighborhood call may be lowered to (the registry's "fa4"/"gluon" use the first two;
#: "blocked"/"reference" are the CPU ground truth for the lowering itself)
LOWERED_BACKENDS = ("fa4", "gluon", "triton", "flex", "blocked", "reference")


def lowering_reason(plan: Plan) -> str | None:
    """Why `plan` is not exactly block-sparse on tile-permuted tokens (None: it is). Cached per plan."""
    key = tuple(a.key for a in plan.axes)
    if key not in _REASONS:
        _REASONS[key] = _compute_reason(plan)
    return _REASONS[key]


_REASONS: dict[tuple, str | None] = {}


def _compute_reason(plan: Plan) -> str | None:
    c = plan.counts()
    if plan.block_m != plan.block_n:
        return (f"query tile {plan.q_tile} ({plan.block_m} tokens) and key tile {plan.kv_tile} ({plan.block_n} "
                "tokens) differ in size; block-sparse attention uses one block size for both")
    if c["masked"]:
        causal = any(a.causal for a in plan.axes)
        why = "a causal axis (windows grow row by row)" if causal else (
            "plain or misaligned windows (stride not a multiple of the query tile, or window starts off key-tile "
            "boundaries); diffattn.kernels.neighborhood.propose_stride gives an aligned stride")
        return (f"the plan is not exactly block-sparse: {c['masked']} of {c['visited']} visited tile pairs need a "
                f"per-element mask at Q tile {plan.q_tile} / KV tile {plan.kv_tile} ({why})")
    return None


def _axis_block_masks(plan: Plan) -> list[list[torch.Tensor]]:
    """Per axis, per dilation group: bool `[nq_i, nk_i]`, entry (a, b) = key tile b in query tile a's range."""
    out = []
    for a in plan.axes:
        per_group = []
        for tab in a.q_tab:
            m = torch.zeros(a.n_q_tiles, a.n_kv_tiles, dtype=torch.bool)
            for qt, (lo, hi, _, _) in enumerate(tab):
                m[qt, lo:hi] = True
            per_group.append(m)
        out.append(per_group)
    return out


def _kron_and(masks: list[torch.Tensor]) -> torch.Tensor:
    full = torch.ones(1, 1, dtype=torch.bool)
    for m in masks:
        r, c = full.shape
        full = (full[:, None, :, None] & m[None, :, None, :]).reshape(r * m.shape[0], c * m.shape[1])
    return full


@dataclass(frozen=True)
class BlockSparseLowering:
    """One exactly block-sparse plan, lowered: permutation, block mask, unpermute (see the module docstring)."""

    plan: Plan
    shape: tuple[int, ...]
    dilation: tuple[int, ...]
    #: "tokens": permuted memory is token-major `[B*G, N, H, D]` (`permute_rows`, the default: whole rows move,
    #: FA4's native layout); "heads": head-major `[B*G, H, N, D]` (`tiling.permute_tokens`)
    layout: str = "tokens"

    @property
    def block_size(self) -> int:
        return self.plan.block_m

    @property
    def groups(self) -> int:
        return math.prod(self.dilation)

    @functools.cached_property
    def group_masks(self) -> torch.Tensor:
        """bool `[G, nq, nk]` on the CPU: the tile-level mask of every dilation group (row-major over groups)."""
        axes = _axis_block_masks(self.plan)
        idx = [()]
        for d in self.dilation:
            idx = [g + (j,) for g in idx for j in range(d)]
        return torch.stack([_kron_and([axes[i][g[i]] for i in range(len(g))]) for g in idx])

    def block_mask(self, device: torch.device | str, batch: int = 1) -> torch.Tensor:
        """`[1 or batch*G, 1, nq, nk]` on `device`, cached (the same tensor every call, so the block-sparse index
        lists built from it are cached too)."""
        g = self.groups
        key = (str(torch.device(device)), batch if g > 1 else 1)
        with _lock:
            hit = self._cache.get(key)
        if hit is None:
            m = self.group_masks.to(device)[:, None]  # [G, 1, nq, nk]
            hit = m.repeat(batch, 1, 1, 1) if g > 1 else m
            with _lock:
                self._cache.setdefault(key, hit)
                hit = self._cache[key]
        return hit

    @functools.cached_property
    def _cache(self) -> dict:
        return {}

    def density(self) -> float:
        """Kept tile pairs / all tile pairs (per group, averaged)."""
        m = self.group_masks
        return float(m.sum()) / m.numel()

    def _permute(self, x: torch.Tensor, tile) -> torch.Tensor:
        if self.layout == "tokens":
            if _use_triton(x):
                from .permute_triton import gather_rows, token_stride

                ts = token_stride(x)
                if ts is not None:
                    b, h, d = x.shape[0], x.shape[-2], x.shape[-1]
                    table = self.tables(x.device, tuple(tile))[0]
                    out = gather_rows(x, table, b, h, d, max(math.prod(self.shape), 1), x.stride(0), 0, ts,
                                      x.stride(-2))
                    return out.view(b * self.groups, -1, h, d).transpose(1, 2)
            return permute_rows(x, tile, self.dilation)
        return _fold(permute_tokens(x, tile, self.dilation))

    def tables(self, device: torch.device | str, tile: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """int32 row tables of the permutation by `tile` on `device` (cached): forward `[G*N_pad]` (row-major token
        index, -1 for padding) and inverse `[N]` (g*N_pad + n of each token)."""
        key = ("tables", str(torch.device(device)), tile)
        with _lock:
            hit = self._cache.get(key)
        if hit is None:
            n = math.prod(self.shape)
            ids = torch.arange(1, n + 1, dtype=torch.int64).reshape(1, *self.shape, 1, 1)
            fwd = permute_rows(ids, tile, self.dilation).reshape(-1) - 1  # [G*N_pad], -1 = padding
            inv = torch.empty(n, dtype=torch.int64)
            pos = torch.nonzero(fwd >= 0).flatten()
            inv[fwd[pos]] = pos
            hit = (fwd.to(torch.int32).to(device), inv.to(torch.int32).to(device))
            with _lock:
                hit = self._cache.setdefault(key, hit)
        return hit

    def permute_q(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, *spatial, H, D]` -> `[B*G, H, N_pad, D]` in query-tile order (one copy; memory per `layout`)."""
        return self._permute(x, self.plan.q_tile)

    def permute_kv(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, *spatial, H, D]` -> `[B*G, H, N_pad, D]` in key-tile order (one copy; memory per `layout`)."""
        return self._permute(x, self.plan.kv_tile)

    def permute_extra(self, x: torch.Tensor) -> torch.Tensor:
        """Text keys `[B, T, H, D]` -> `[B*G, H, T, D]` (a view when G == 1)."""
        xt = x.transpose(1, 2)
        g = self.groups
        if g == 1:
            return xt
        b = x.shape[0]
        return xt[:, None].expand(b, g, *xt.shape[1:]).reshape(b * g, *xt.shape[1:])

    def unpermute(self, y: torch.Tensor, batch: int) -> torch.Tensor:
        """`[B*G, H, N_pad, *rest]` -> `[B, *spatial, H, *rest]`, cropped (contiguous)."""
        if self.layout == "tokens":
            if y.dim() == 4 and _use_triton(y) and y.stride(-1) == 1 and (y.stride(1) * y.element_size()) % 16 == 0:
                from .permute_triton import gather_rows

                bg, h, n_pad, d = y.shape
                if d >= 16 and not d & (d - 1):
                    inv = self.tables(y.device, self.plan.q_tile)[1]
                    out = gather_rows(y, inv, batch, h, d, n_pad, self.groups * y.stride(0), y.stride(0),
                                      y.stride(2), y.stride(1))
                    return out.view(batch, *self.shape, h, d)
            return unpermute_rows(y, batch, self.shape, self.plan.q_tile, self.dilation)
        y = y.reshape(batch, self.groups, *y.shape[1:])
        out = unpermute_tokens(y, self.shape, self.plan.q_tile, self.dilation)
        return out if out.is_contiguous() else out.contiguous()

    def attend(self, qp: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, backend: str, *, batch: int,
               scale: float | None = None, extra_k: torch.Tensor | None = None, extra_v: torch.Tensor | None = None,
               return_lse: bool = False):
        """Block-sparse attention on permuted tensors (`permute_q`/`permute_kv`/`permute_extra`), `[B*G, H, N, D]`
        out (and `[B*G, H, N]` lse) in permuted order. `backend` is a block-sparse backend name."""
        mask = self.block_mask(qp.device, batch)
        return block_sparse_attention(qp, kp, vp, mask, block_size=self.block_size, scale=scale, extra_k=extra_k,
                                      extra_v=extra_v, return_lse=return_lse, backend=backend)


def permute_rows(x: torch.Tensor, tile, dilation) -> torch.Tensor:
    """`[B, *spatial, H, D]` -> `[B*G, H, N_pad, D]` in tile order, as a view of token-major memory
    (`[B*G, N_pad, H, D]`, one copy): whole H*D rows move (runs of `tile[-1]` tokens are contiguous in the
    source), and FA4 reads that memory as its native `[B, S, H, D]`. Same token order as `tiling.permute_tokens`."""
    b, h, d = x.shape[0], x.shape[-2], x.shape[-1]
    nd = x.dim() - 3
    x = tile_view(x, tile, dilation)
    # axis i's (r, t, dil) sit at dims 1+3i, 2+3i, 3+3i; order: b, dil..., r..., t..., H, D
    order = [0] + [3 + 3 * i for i in range(nd)] + [1 + 3 * i for i in range(nd)] + [2 + 3 * i for i in range(nd)]
    order += [1 + 3 * nd, 2 + 3 * nd]
    x = x.permute(order).reshape(b * math.prod(dilation), -1, h, d)
    return x.transpose(1, 2)


def unpermute_rows(y: torch.Tensor, batch: int, shape, tile, dilation) -> torch.Tensor:
    """Inverse of `permute_rows` for `[B*G, H, N_pad, *rest]` (any strides; rest = (D,) or ()):
    `[B, *shape, H, *rest]`, cropped, contiguous."""
    nd = len(shape)
    h = y.shape[1]
    rest = list(y.shape[3:])
    pads = tile_pads(shape, tile, dilation)
    rs = [(shape[i] + pads[i]) // (tile[i] * dilation[i]) for i in range(nd)]
    y = y.transpose(1, 2).reshape([batch] + list(dilation) + rs + list(tile) + [h] + rest)
    # dims: 0 b, 1.. dil, 1+nd.. r, 1+2nd.. t, 1+3nd h, rest
    order = [0]
    for i in range(nd):
        order += [1 + nd + i, 1 + 2 * nd + i, 1 + i]
    order += list(range(1 + 3 * nd, 2 + 3 * nd + len(rest)))
    y = y.permute(order).reshape([batch] + [shape[i] + pads[i] for i in range(nd)] + [h] + rest)
    if any(pads):
        y = y[(slice(None),) + tuple(slice(0, n) for n in shape)]
    return y if y.is_contiguous() else y.contiguous()


_lock = threading.Lock()


def _use_triton(x: torch.Tensor) -> bool:
    """The Triton row gather (permute_triton.py) where Triton runs and no gradient flows through the copy (it is not
    differentiable; the torch copies are); DIFFATTN_NA_PERMUTE=torch turns it off."""
    if os.environ.get("DIFFATTN_NA_PERMUTE", "triton") == "torch":
        return False
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    return triton_runs_on(x.device)


def _fold(x: torch.Tensor) -> torch.Tensor:
    b, g = x.shape[:2]
    return x.reshape(b * g, *x.shape[2:])


_LOWERINGS: dict[tuple, BlockSparseLowering] = {}


def _lowering(plan: Plan, shape: tuple[int, ...], dilation: tuple[int, ...], layout: str) -> BlockSparseLowering:
    # keyed by the plan's small integers (hashing a Plan hashes its tables)
    key = (tuple(a.key for a in plan.axes), shape, dilation, layout)
    hit = _LOWERINGS.get(key)
    if hit is None:
        with _lock:
            if len(_LOWERINGS) >= 128:
                _LOWERINGS.pop(next(iter(_LOWERINGS)))
            hit = _LOWERINGS.setdefault(key, BlockSparseLowering(plan, shape, dilation, layout))
    return hit


def lower(plan: Plan, params: NAParams, layout: str = "tokens") -> BlockSparseLowering:
    """The (cached) lowering of an exactly block-sparse `plan`; `ValueError` with the reason otherwise.
    layout: "tokens" or "heads" (the permuted memory; `BlockSparseLowering.layout`)."""
    if layout not in ("tokens", "heads"):
        raise ValueError(f"layout must be 'tokens' or 'heads', got {layout!r}")
    reason = lowering_reason(plan)
    if reason:
        raise ValueError(reason)
    return _lowering(plan, params.shape, params.dilation, layout)



@functools.cache
def gluon_reason(device_index: int, dtype: torch.dtype, head_dim: int, block_size: int, has_extra: bool) -> str | None:
    """The Gluon forward's own per-call check on contiguous permuted tensors of this kind (cached: the permuted
    tensors are always contiguous, so only dtype, head dim and block size matter)."""
    mod = importlib.import_module(registry.GLUON_MODULE)
    dev = torch.device("cuda", device_index)
    probe = torch.empty(1, 1, block_size, head_dim, dtype=dtype, device=dev)
    extra = torch.empty(1, 1, 1, head_dim, dtype=dtype, device=dev) if has_extra else None
    return mod.unsupported_reason(probe, probe, probe, block_size, extra, True)


def neighborhood_attention_block_sparse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, params: NAParams, backend: str, *,
    scale: float | None = None, extra_k: torch.Tensor | None = None, extra_v: torch.Tensor | None = None,
    return_lse: bool = False, layout: str = "tokens",
):
    """Neighborhood attention of `[B, *spatial, H, D]` q/k/v through a block-sparse backend (`backend`, one of
    `LOWERED_BACKENDS`): permute, attend, unpermute. Same result as `neighborhood_attention` (exact for a plan that
    `lowering_reason` accepts; `ValueError` otherwise). Differentiable through the block-sparse backend's backward."""
    if backend not in LOWERED_BACKENDS:
        raise ValueError(f"backend must be one of {LOWERED_BACKENDS}, got {backend!r}")
    low = lower(plan, params, layout)
    b = q.shape[0]
    qp, kp, vp = low.permute_q(q), low.permute_kv(k), low.permute_kv(v)
    ek = low.permute_extra(extra_k) if extra_k is not None and extra_k.shape[1] else None
    ev = low.permute_extra(extra_v) if ek is not None else None
    res = low.attend(qp, kp, vp, backend, batch=b, scale=scale, extra_k=ek, extra_v=ev, return_lse=return_lse)
    if not return_lse:
        return low.unpermute(res, b)
    out, lse = res
    return low.unpermute(out, b), low.unpermute(lse, b)
