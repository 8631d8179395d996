"""`dense`: full attention through diffattn's own path; outputs equal the stock processors'.

The A/B baseline of every test and benchmark: it exercises the adapters and the context hook while computing
exactly what the stock processor computes (`F.scaled_dot_product_attention` with the stock mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..call import AttentionCall
from ..config import MethodConfig
from ..families import FAMILY_NAMES
from .base import AttentionMethod, dense_attention
from .spec import MethodSpec


@dataclass
class DenseConfig(MethodConfig):
    """Dense attention has no options."""


class DenseMethod(AttentionMethod):
    def attend(self, call: AttentionCall) -> torch.Tensor:
        return dense_attention(call)


SPEC = MethodSpec(
    name="dense",
    summary="full attention through diffattn's path (equals the stock processors; the A/B baseline)",
    config_cls=DenseConfig,
    families=FAMILY_NAMES,
    build=DenseMethod,
)
