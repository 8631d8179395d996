"""Context parallelism (Diffusers' `model.enable_parallelism(config=ContextParallelConfig(...))`) for diffattn methods.

Diffusers shards the sequence of each model input named in the model's `_cp_plan` equally over the ranks (rank r holds
the r-th contiguous chunk of the video/image tokens and, for joint models, of the text tokens) and hands each
attention call the local shard. A masked method cannot run on a shard alone: its mask and its token order are global.

- **Ulysses** (`ulysses_degree=P`): an all-to-all turns the sequence shards into whole sequences for H/P heads. The
  gathered sequence is rank-major (`[text_0; img_0; text_1; img_1]` for FLUX), so it is permuted to the model's own
  order, the unchanged method runs on it (global grid, global text span; per-head methods see their global head
  numbers), and the result goes back the same way. Every method whose heads are independent works this way.
- **Ring** (`ring_degree=P`): queries stay local; the key/value shards of all ranks are gathered (as Diffusers'
  `rotate_method="allgather"` ring does) and visited one shard at a time; each shard's partial output and its
  log-sum-exp come from the block-sparse kernel with the method's block mask sliced to (local query blocks x that
  shard's key blocks), and partial outputs merge through `merge_attention_states`. Shard boundaries are snapped to the
  mask's block grid (each key block belongs to the shard holding its first token), so any shard size works. `gna`
  instead cuts the halo its local windows reach from the gathered keys (see `_ring_neighborhood`). Methods with a
  ring plan: `dense`, `radial`, `gna`; `softpag` runs the Ulysses head exchange over the ring group instead (its
  targets are not sums over key shards). Others refuse with a clear error.

Not supported (clear errors): Ulysses and Ring together, `ulysses_anything` / `ring_anything` (unequal shards),
text that is not sharded with the image (a model whose `_cp_plan` leaves it whole), masks other than key padding,
and autograd through the parallel path (inference only).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .call import AttentionCall
from .call import ForwardContext
from .geometry import TokenGrid

logger = logging.getLogger("diffattn")

GLOBAL_KEY = "cp_global"  # ForwardContext.extras key: the forward's context as the whole (unsharded) inputs give it
_ROOT_SPLIT_HOOK = "cp_input---"  # Diffusers' name of the split hook on the model itself (module id "")
_GATHER_LIMIT = 1 << 20  # sharded root inputs up to this many elements are gathered for reading; larger ones are
# replaced by meta tensors of the global shape (readers only look at their shapes)

# Which CP modes each method supports. Ulysses runs the unchanged method on whole sequences; Ring needs a plan below.
SUPPORTED: dict[str, tuple[str, ...]] = {
    "dense": ("ulysses", "ring"),
    "radial": ("ulysses", "ring"),
    "gna": ("ulysses", "ring"),
    "softpag": ("ulysses", "ring"),
}
# Methods whose ring_degree path is the head exchange of Ulysses over the ring group: SoftPAG's targets (the identity
# map, the mean query) are not sums over key shards, so they cannot be merged shard by shard through a log-sum-exp.
RING_BY_HEADS = ("softpag",)


def context_parallel_config(parallel_config: Any) -> Any:
    """The `ContextParallelConfig` inside a processor's `_parallel_config` (a `ParallelConfig`), or None."""
    if parallel_config is None:
        return None
    return getattr(parallel_config, "context_parallel_config", parallel_config)


def mode_of(cp: Any) -> str:
    """'ulysses' or 'ring'; a clear error for what diffattn does not run."""
    if getattr(cp, "ulysses_anything", False) or getattr(cp, "ring_anything", False):
        raise NotImplementedError(
            "diffattn under context parallelism needs equal shards: ulysses_anything/ring_anything are not supported; "
            "use a sequence length divisible by the number of ranks"
        )
    if cp.ulysses_degree > 1 and cp.ring_degree > 1:
        raise NotImplementedError(
            f"diffattn runs ulysses_degree or ring_degree alone, not both (got ulysses_degree={cp.ulysses_degree}, "
            f"ring_degree={cp.ring_degree})"
        )
    return "ulysses" if cp.ulysses_degree > 1 else "ring"


def check_supported(method_name: str, cp: Any) -> str:
    """The mode, or `NotImplementedError` naming the method, the mode and what is supported."""
    mode = mode_of(cp)
    modes = SUPPORTED.get(method_name, ())
    if mode not in modes:
        table = "; ".join(f"{m}: {', '.join(v)}" for m, v in SUPPORTED.items())
        raise NotImplementedError(
            f"method {method_name!r} does not support context parallelism with {mode}_degree > 1 in diffattn. "
            f"Supported: {table}"
        )
    return mode


def bind_model(model: torch.nn.Module) -> None:
    """Give every processor of `model` that takes a parallel config the model's config, as `enable_parallelism` does.

    Needed when processors are replaced after `enable_parallelism` (diffattn.apply, diffattn.remove): a processor
    without it would attend over its local shard only, silently wrong."""
    config = getattr(model, "_parallel_config", None)
    if config is None or getattr(config, "context_parallel_config", None) is None:
        return
    for proc in model.attn_processors.values():
        if hasattr(proc, "_parallel_config"):
            proc._parallel_config = config


# ---- the forward's global geometry ------------------------------------------------------------------------------
def global_context(
    module: torch.nn.Module, hook_name: str, arguments: dict[str, Any],
    read_inputs: Callable[[torch.nn.Module, dict[str, Any]], ForwardContext], local: ForwardContext,
) -> ForwardContext:
    """The context the whole inputs give, when the inputs our hook sees were already sharded by Diffusers' root split
    hook (FLUX, LTX shard `hidden_states`, `encoder_hidden_states`, `img_ids` at the model's own input); `local`
    otherwise (Wan shards only after the patch embedding)."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None or _ROOT_SPLIT_HOOK not in registry.hooks:
        return local
    order = registry._hook_order
    if order.index(_ROOT_SPLIT_HOOK) < order.index(hook_name):
        return local  # the split runs inside our hook: we saw the whole inputs
    split = registry.hooks[_ROOT_SPLIT_HOOK]
    mesh = split.parallel_config._flattened_mesh
    world = mesh.size()
    group = mesh.get_group()
    args = dict(arguments)
    for name, cpm in split.metadata.items():
        value = args.get(name) if isinstance(name, str) else None
        if not isinstance(value, torch.Tensor) or getattr(cpm, "split_output", True):
            continue
        if cpm.expected_dims is not None and value.dim() != cpm.expected_dims:
            continue  # Diffusers did not split it either
        shape = list(value.shape)
        shape[cpm.split_dim] *= world
        if value.numel() * world <= _GATHER_LIMIT:
            parts = [torch.empty_like(value) for _ in range(world)]
            dist.all_gather(parts, value.contiguous(), group=group)
            args[name] = torch.cat(parts, dim=cpm.split_dim)
        else:
            args[name] = torch.empty(shape, dtype=value.dtype, device="meta")
    return read_inputs(module, args)


# ---- layout of the local shard ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardLayout:
    """How the local shard of a self/joint call sits in the global sequence (equal shards, `world` ranks)."""

    world: int
    rank: int
    text_local: int
    visual_local: int
    text_first: bool

    @property
    def local_len(self) -> int:
        return self.text_local + self.visual_local

    def gathered_to_global(self, device: torch.device) -> torch.Tensor | None:
        """Index `perm` with `global = gathered[..., perm, :]` for the rank-major gathered sequence; None if equal."""
        if self.text_local == 0:
            return None
        s, t = self.local_len, self.text_local
        text = [torch.arange(r * s, r * s + t) if self.text_first else torch.arange(r * s + s - t, (r + 1) * s)
                for r in range(self.world)]
        vis = [torch.arange(r * s + t, (r + 1) * s) if self.text_first else torch.arange(r * s, r * s + s - t)
               for r in range(self.world)]
        parts = text + vis if self.text_first else vis + text
        return torch.cat(parts).to(device)


def shard_layout(call: AttentionCall, world: int, rank: int) -> tuple[ShardLayout, ForwardContext | None]:
    """The local shard's layout, from the call (local text count) and the forward's global context."""
    ctx = call.context
    g = None if ctx is None else ctx.extras.get(GLOBAL_KEY, ctx)
    s_local = call.q.shape[2]
    text_local = call.text_len if call.role == "joint" else 0
    if g is not None and g.grid is not None:
        visual_global = g.grid.num_tokens
        if call.role == "joint" and g.text_len == text_local and world > 1 and text_local:
            raise NotImplementedError(
                f"diffattn under context parallelism: layer {call.layer.path!r} holds the whole text ({text_local} "
                "tokens) next to a shard of the image; only models whose _cp_plan shards the text as well are supported"
            )
        if (s_local - text_local) * world != visual_global:
            raise ValueError(
                f"diffattn under context parallelism: layer {call.layer.path!r} holds {s_local - text_local} "
                f"video/image tokens per rank, but the forward's grid {tuple(g.grid)} has {visual_global} tokens over "
                f"{world} ranks; equal shards are needed"
            )
    return ShardLayout(world, rank, text_local, s_local - text_local, call.text_first), g


def _global_key_padding(call: AttentionCall, g: ForwardContext | None, layout: ShardLayout, batch: int):
    """`[B, S]` key padding in the global order (text mask from the global context), or None."""
    if call.key_padding is None:
        return None
    if g is None or g.text_mask is None or layout.text_local == 0:
        raise NotImplementedError(
            f"diffattn under context parallelism: layer {call.layer.path!r} has a key padding mask but the forward's "
            "global text mask is unknown"
        )
    text = g.text_mask.to(call.q.device).bool().expand(batch, -1)
    ones = torch.ones(batch, layout.visual_local * layout.world, dtype=torch.bool, device=call.q.device)
    return torch.cat([text, ones] if layout.text_first else [ones, text], dim=1)


def _check_mask(call: AttentionCall) -> None:
    if call.attn_mask is not None and call.key_padding is None:
        raise NotImplementedError(
            f"diffattn under context parallelism: layer {call.layer.path!r} passes an attention mask that is not a key "
            "padding mask; only key padding is supported"
        )


# ---- per-head views of methods ------------------------------------------------------------------------------------
class _LocalHeads:
    """A SoftPAG head specification seen by one Ulysses rank, which holds heads [start, stop)."""

    def __init__(self, spec: Any, start: int, stop: int) -> None:
        self.spec, self.start, self.stop = spec, start, stop
        self.layers, self.all_layers, self.families = spec.layers, spec.all_layers, spec.families

    def heads_of(self, layer: int):
        chosen = self.spec.heads_of(layer)
        if chosen is None or chosen is False:
            return chosen
        local = tuple(h - self.start for h in chosen if self.start <= h < self.stop)
        return local if local else False


def method_for_heads(method: Any, start: int, stop: int, total: int) -> Any:
    """`method` as it must run on heads [start, stop) of `total` (methods whose heads are independent: itself)."""
    if getattr(method, "name", "") == "softpag" and (start, stop) != (0, total):
        view = copy.copy(method)
        view.spec = _LocalHeads(method.spec, start, stop)
        return view
    return method


# ---- collectives --------------------------------------------------------------------------------------------------
def _seq_to_heads(x: torch.Tensor, world: int, group) -> torch.Tensor:
    """`[B, H, S_loc, D]` sequence shards -> `[B, H/P, P*S_loc, D]` (rank-major sequence) for this rank's heads."""
    b, h, s, d = x.shape
    send = x.reshape(b, world, h // world, s, d).permute(1, 0, 2, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, h // world, world * s, d)


def _heads_to_seq(x: torch.Tensor, world: int, group) -> torch.Tensor:
    """Inverse of `_seq_to_heads`: `[B, H/P, P*S_loc, D]` -> `[B, H, S_loc, D]`."""
    b, hl, s, d = x.shape
    send = x.reshape(b, hl, world, s // world, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 0, 2, 3, 4).reshape(b, hl * world, s // world, d)


def _all_gather_seq(x: torch.Tensor, world: int, group) -> torch.Tensor:
    """`[B, H, S_loc, D]` -> `[B, H, P*S_loc, D]` rank-major."""
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=2)


# ---- the parallel attention ---------------------------------------------------------------------------------------
def parallel_attend(
    method: Any, call: AttentionCall, parallel_config: Any, cross_keys_sharded: bool = False
) -> torch.Tensor:
    """Run `method` on a call whose q, k, v are this rank's sequence shard; returns this rank's `[B, H, S_loc, D]`.

    Cross-attention rows are independent: with whole keys (Wan's text; Diffusers runs it without CP) the call runs
    as it is; with sharded keys (`cross_keys_sharded`: LTX-Video's plan shards the text too, and its stock processor
    hands the parallel config to the cross call) the key/value shards and the key mask are gathered first."""
    cp = context_parallel_config(parallel_config)
    if call.role in ("cross", "cross_image") or call.q.shape[2] != call.k.shape[2]:
        if not cross_keys_sharded:
            return method.attend(call)
        mode_of(cp)
        group = cp._flattened_mesh.get_group()
        world = cp.ring_degree * cp.ulysses_degree
        local_keys = call.k.shape[2]
        k, v = _all_gather_seq(call.k, world, group), _all_gather_seq(call.v, world, group)
        mask = call.attn_mask
        if mask is not None and mask.shape[-1] == local_keys:
            parts = [torch.empty_like(mask) for _ in range(world)]
            dist.all_gather(parts, mask.contiguous(), group=group)
            mask = torch.cat(parts, dim=-1)
        return method.attend(replace(call, k=k, v=v, attn_mask=mask, text_len=k.shape[2], key_padding=None))
    name = getattr(method, "name", type(method).__name__)
    mode = check_supported(name, cp)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (call.q, call.k, call.v)):
        raise NotImplementedError(
            "diffattn under context parallelism is inference only (no autograd); use torch.no_grad()"
        )
    _check_mask(call)
    if mode == "ulysses":
        return _ulysses(method, call, cp.ulysses_degree, cp._ulysses_local_rank, cp._ulysses_mesh.get_group())
    if name in RING_BY_HEADS:
        return _ulysses(method, call, cp.ring_degree, cp._ring_local_rank, cp._ring_mesh.get_group())
    return _ring(method, call, cp)


def _ulysses(method: Any, call: AttentionCall, world: int, rank: int, group: Any) -> torch.Tensor:
    b, h = call.q.shape[:2]
    if h % world:
        raise ValueError(
            f"context parallelism over {world} ranks by heads needs a head count divisible by {world}; layer "
            f"{call.layer.path!r} has {h}"
        )
    layout, g = shard_layout(call, world, rank)
    q, k, v = (_seq_to_heads(x, world, group) for x in (call.q, call.k, call.v))
    perm = layout.gathered_to_global(q.device)
    if perm is not None:
        q, k, v = q[:, :, perm], k[:, :, perm], v[:, :, perm]
    key_padding = _global_key_padding(call, g, layout, b)
    text_len = layout.text_local * world
    grid = None if g is None or g.grid is None else g.grid
    whole = replace(
        call, q=q, k=k, v=v, grid=grid, text_len=text_len, key_padding=key_padding,
        attn_mask=None if key_padding is None else key_padding[:, None, None, :],
    )
    hl = h // world
    out = method_for_heads(method, rank * hl, (rank + 1) * hl, h).attend(whole)
    if perm is not None:
        out = out[:, :, torch.argsort(perm)]
    return _heads_to_seq(out.contiguous(), world, group)


# Ring plans: (method, call with global text/grid) -> block mask over the visual tokens `[nb, nb]` and its block
# size, or None for dense attention (all keys).
def _dense_plan(method: Any, call: AttentionCall) -> tuple[torch.Tensor, int] | None:
    return None


def _radial_plan(method: Any, call: AttentionCall) -> tuple[torch.Tensor, int] | None:
    family = call.context.family if call.context is not None else "wan"
    s = method.settings(family)
    if method.runs_dense(call, s) or call.grid is None or call.grid.frames < 2:
        if call.grid is None and not method.runs_dense(call, s):
            raise RuntimeError(f"radial under ring_degree needs the token grid of layer {call.layer.path!r}")
        return None
    return method.mask_for(call.grid.frames, call.grid.tokens_per_frame, s, call.q.device), s["block_size"]


@dataclass(frozen=True)
class NeighborhoodPlan:
    """GNA's window over the global token grid `shape` (settings already fitted to it, as `GNAMethod.fit` does)."""

    shape: tuple[int, ...]
    settings: dict[str, tuple]


def _gna_plan(method: Any, call: AttentionCall) -> NeighborhoodPlan | None:
    """The decisions of `GNAMethod.attend` (dense layers/steps, 2-D for image families) through its public methods."""
    from .methods.text_split import can_split
    from .families import IMAGE_FAMILIES

    cfg, ctx = method.config, call.context
    if not can_split(call) or (cfg.layers is not None and call.layer.index not in cfg.layers):
        return None
    if cfg.dense_timesteps:
        if ctx is None:
            raise RuntimeError("gna: dense_timesteps needs the denoising step; install it with diffattn.apply(...)")
        if ctx.step_index < cfg.dense_timesteps:
            return None
    if call.grid is None:
        raise RuntimeError(f"gna under ring_degree needs the token grid of layer {call.layer.path!r}")
    shape: tuple[int, ...] = tuple(call.grid)
    if (ctx.family if ctx is not None else "") in IMAGE_FAMILIES or call.grid.frames == 1:
        shape = (call.grid.height, call.grid.width)
    return NeighborhoodPlan(shape, method.fit(shape, method.settings_for(call.layer.index), call.layer.path))


RING_PLANS: dict[str, Callable[[Any, AttentionCall], Any]] = {
    "dense": _dense_plan,
    "radial": _radial_plan,
    "gna": _gna_plan,
}


def _ring(method: Any, call: AttentionCall, cp: Any) -> torch.Tensor:
    from .kernels import block_sparse_attention
    from .kernels.merge import merge_attention_states

    world = cp.ring_degree
    rank = cp._ring_local_rank
    group = cp._ring_mesh.get_group()
    b = call.q.shape[0]
    layout, g = shard_layout(call, world, rank)
    text_local, vis_local = layout.text_local, layout.visual_local
    k, v = _all_gather_seq(call.k, world, group), _all_gather_seq(call.v, world, group)
    perm = layout.gathered_to_global(k.device)
    if perm is not None:
        k, v = k[:, :, perm], v[:, :, perm]
    text_len = text_local * world
    visual_len = vis_local * world
    key_padding = _global_key_padding(call, g, layout, b)
    grid = None if g is None or g.grid is None else g.grid
    whole = replace(call, grid=grid, text_len=text_len, key_padding=key_padding)
    plan = RING_PLANS[method.name](method, whole)

    # global slices
    txt = slice(0, text_len) if layout.text_first else slice(visual_len, visual_len + text_len)
    vis = slice(text_len, text_len + visual_len) if layout.text_first else slice(0, visual_len)
    q_local = call.q
    lt = slice(0, text_local) if layout.text_first else slice(vis_local, vis_local + text_local)
    lv = slice(text_local, text_local + vis_local) if layout.text_first else slice(0, vis_local)
    q_txt, q_vis = q_local[:, :, lt], q_local[:, :, lv]
    k_txt, v_txt = k[:, :, txt], v[:, :, txt]
    k_vis, v_vis = k[:, :, vis], v[:, :, vis]
    if isinstance(plan, NeighborhoodPlan):
        def visual_fn(qv, kv, vv, kt, vt):
            return _ring_neighborhood(qv, kv, vv, kt, vt, plan, rank * vis_local, call.scale)
    else:
        block = plan[1] if plan is not None else 128
        mask = plan[0] if plan is not None else None

        def visual_fn(qv, kv, vv, kt, vt):
            return _ring_visual(qv, kv, vv, kt, vt, mask, block, rank * vis_local, world, vis_local, call.scale,
                                block_sparse_attention, merge_attention_states)

    out_vis = torch.empty_like(q_vis)
    for rows, text_idx in _batch_groups(key_padding, txt, b):
        qv = q_vis if rows is None else q_vis[rows]
        kt, vt = (k_txt, v_txt) if rows is None else (k_txt[rows], v_txt[rows])
        if text_idx is not None:
            kt, vt = kt[:, :, text_idx], vt[:, :, text_idx]
        kv_vis = (k_vis, v_vis) if rows is None else (k_vis[rows], v_vis[rows])
        res = visual_fn(qv, kv_vis[0], kv_vis[1], kt if text_len else None, vt if text_len else None)
        if rows is None:
            out_vis = res
        else:
            out_vis[rows] = res
    if text_local == 0:
        return out_vis
    # Text queries attend every valid key densely (as `joint.visual_with_text` does).
    attn_mask = None if key_padding is None else key_padding[:, None, None, :]
    out_txt = F.scaled_dot_product_attention(q_txt, k, v, attn_mask=attn_mask, scale=call.scale)
    return torch.cat([out_txt, out_vis] if layout.text_first else [out_vis, out_txt], dim=2)


def _batch_groups(key_padding: torch.Tensor | None, txt: slice, batch: int):
    """Batch elements grouped by their valid text keys: [(rows or None, text indices or None)]."""
    if key_padding is None:
        return [(None, None)]
    pad = key_padding[:, txt].to("cpu")
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in range(batch):
        groups.setdefault(tuple(torch.nonzero(pad[i]).flatten().tolist()), []).append(i)
    device = key_padding.device
    out = []
    for valid, members in groups.items():
        idx = None if len(valid) == pad.shape[1] else torch.tensor(valid, dtype=torch.long, device=device)
        rows = None if len(groups) == 1 else torch.tensor(members, dtype=torch.long, device=device)
        out.append((rows, idx))
    return out


def _ring_visual(q, k_vis, v_vis, k_txt, v_txt, mask, block, q_start, world, shard, scale, kernel, merge):
    """Visual queries `q` (global visual rows [q_start, q_start + len)) against the gathered visual keys, one shard at a
    time, plus the text keys; partial outputs merged by their log-sum-exp."""
    n_q = q.shape[2]
    n_vis = k_vis.shape[2]
    if mask is None:
        # dense: the natural shards, a full mask per shard
        chunks = [(j * shard, (j + 1) * shard) for j in range(world)]
        q_pad, off = q, 0
    else:
        # snap to the block grid: key block kb belongs to the shard holding its first token
        nb = mask.shape[-1]
        owner = [min((kb * block) // shard, world - 1) for kb in range(nb)]
        chunks = []
        for j in range(world):
            blocks = [kb for kb in range(nb) if owner[kb] == j]
            if blocks:
                chunks.append((blocks[0] * block, min(n_vis, (blocks[-1] + 1) * block)))
        qb0, qb1 = q_start // block, -(-(q_start + n_q) // block)
        off = q_start - qb0 * block
        length = min(n_vis, qb1 * block) - qb0 * block
        q_pad = q.new_zeros(q.shape[0], q.shape[1], length, q.shape[3])
        q_pad[:, :, off : off + n_q] = q
    out = lse = None
    for i, (k0, k1) in enumerate(chunks):
        ek = k_txt if i == 0 else None
        ev = v_txt if i == 0 else None
        if mask is None:
            m = torch.ones(1, 1, -(-q_pad.shape[2] // block), -(-(k1 - k0) // block), dtype=torch.bool, device=q.device)
        else:
            m = mask[qb0:qb1, k0 // block : -(-k1 // block)][None, None]
            if not bool(m.any()) and ek is None:
                continue
        o, l = kernel(q_pad, k_vis[:, :, k0:k1], v_vis[:, :, k0:k1], m, block_size=block, scale=scale,
                      extra_k=ek, extra_v=ev, return_lse=True)
        if out is None:
            out, lse = o, l
        else:
            out, lse = merge(out, lse, o, l)
    return out[:, :, off : off + n_q]


def _ring_neighborhood(q, k_vis, v_vis, k_txt, v_txt, plan: NeighborhoodPlan, q_start: int, scale):
    """Visual queries `q` (global raster rows [q_start, q_start + len)) with GNA's window: the slab of whole rows of
    the first grid axis that the local queries' windows reach (a halo) is cut from the gathered keys, and the kernel
    runs on that sub-grid, with the local queries in place and zeros elsewhere (their outputs are dropped).

    Exact when the windows on the sub-grid sit where they sit on the whole grid: the first axis needs stride 1,
    dilation 1 and no causality; its window start, clamp(t - k//2, 0, T - k), is monotonic in t, so the slab from the
    first query's window start to the last query's window end keeps every local window in place."""
    from .kernels.neighborhood import grid_neighborhood_attention

    s = plan.settings
    if s["stride"][0] != 1 or s["dilation"][0] != 1 or s["is_causal"][0]:
        raise NotImplementedError(
            f"gna under ring_degree needs stride 1, dilation 1 and no causality along the first grid axis (the one the "
            f"sequence is sharded along); got kernel_size={s['kernel_size']}, stride={s['stride']}, "
            f"dilation={s['dilation']}, is_causal={s['is_causal']}: use ulysses_degree instead"
        )
    axis, row = plan.shape[0], 1
    for n in plan.shape[1:]:
        row *= n
    k0 = s["kernel_size"][0]

    def start(t: int) -> int:
        return min(max(t - k0 // 2, 0), axis - k0)

    n_q = q.shape[2]
    first, last = q_start // row, (q_start + n_q - 1) // row
    a, b = start(first), start(last) + k0
    off = q_start - a * row
    q_sub = q.new_zeros(q.shape[0], q.shape[1], (b - a) * row, q.shape[3])
    q_sub[:, :, off : off + n_q] = q
    out = grid_neighborhood_attention(
        q_sub, k_vis[:, :, a * row : b * row], v_vis[:, :, a * row : b * row], (b - a, *plan.shape[1:]),
        s["kernel_size"], s["stride"], s["dilation"], s["is_causal"], scale=scale, extra_k=k_txt, extra_v=v_txt,
    )
    return out[:, :, off : off + n_q]
