"""Fused pre-attention prologue: q/k RMSNorm (across heads or per head) + interleaved RoPE + `[B, H, S, D]`.

Front door `qk_norm_rope` (validation, backend choice) in `op.py`; the plain-PyTorch reference that defines it in
`reference.py`; the Triton kernel in `triton_prologue.py`.
"""

from .op import fused_supported, fused_supported_device, qk_norm_rope
from .reference import qk_norm_rope_reference

__all__ = ["fused_supported", "fused_supported_device", "qk_norm_rope", "qk_norm_rope_reference"]
