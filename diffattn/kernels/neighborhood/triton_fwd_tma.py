"""Host side of the Hopper TMA mode of the forward kernel (`triton_fwd.na_forward(..., tma=True)`).

Every query/key tile is one multi-dimensional TMA box read straight out of the caller's `[B, *spatial, H, D]`
tensors (no permutation copy): the tensor is viewed as 5-D [B', X, Y, H, D] (1-D: [B, L0, 1, H, D]; 2-D:
[B, L0, L1, H, D]; 3-D: [B*L0, L1, L2, H, D]) and a tile is one [T0', T1', T2', 1, D] box. Boxes past an axis end
read zeros and store nothing, so padding needs no buffer. Window masks, text tokens and lse are the kernel's own
code, shared with the pointer mode. Measured +11-18% over pointer loads on H100 for perfectly block-sparse plans
(NOTES.md). If descriptors fail at run time (old Triton or driver), the front door logs once and uses pointer loads.
"""

from __future__ import annotations

import functools

import torch

from .tiling import Plan


def tma_inplace_ok(q: torch.Tensor, plan: Plan) -> bool:
    """Whether the TMA mode applies to this tensor: Hopper or newer, no dilation, fp16/bf16, head dim a power of
    two >= 16, 16-byte aligned strides, and (3-D with batch > 1, where the batch folds into axis 0) batch elements
    packed back to back along axis 0."""
    if q.device.type != "cuda" or not _tma_device(torch.cuda.current_device() if q.device.index is None
                                                  else q.device.index):
        return False
    d = q.shape[-1]
    if d < 16 or d & (d - 1) or plan.groups != 1:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16):
        return False
    esz = q.element_size()
    if q.stride(-1) != 1 or any((st * esz) % 16 for st in q.stride()[:-1]) or q.data_ptr() % 16:
        return False
    return not (plan.ndim == 3 and q.shape[0] > 1 and q.stride(0) != q.shape[1] * q.stride(1))


@functools.cache
def _tma_device(index: int) -> bool:
    """Hopper or newer, with a Triton that has host tensor descriptors (once per device, not per attention call)."""
    if torch.cuda.get_device_capability(index)[0] < 9:
        return False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return True


def descriptor(t: torch.Tensor, ndim: int, tile: tuple[int, ...]):
    """The 5-D TMA descriptor of `[B, *spatial, H, D]` tensor `t` whose box is one tile of one head."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    d = t.shape[-1]
    h = t.shape[-2]
    s = t.stride()
    if ndim == 1:
        shape = [t.shape[0], t.shape[1], 1, h, d]
        strides = [s[0], s[1], s[1], s[2], 1]
        block = [1, tile[0], 1, 1, d]
    elif ndim == 2:
        shape = [t.shape[0], t.shape[1], t.shape[2], h, d]
        strides = [s[0], s[1], s[2], s[3], 1]
        block = [1, tile[0], tile[1], 1, d]
    else:
        shape = [t.shape[0] * t.shape[1], t.shape[2], t.shape[3], h, d]
        strides = [s[1], s[2], s[3], s[4], 1]
        block = [tile[0], tile[1], tile[2], 1, d]
    return TensorDescriptor(t, shape, strides, block)
