"""`dense`: full attention through diffattn's own path; outputs equal the stock processors'.

The A/B baseline of every test and benchmark: it exercises the adapters and the context hook while computing
exactly what the stock processor computes (`F.scaled_dot_product_attention` with the stock mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..call import AttentionCall
from ..config import MethodConfig
from .base import AttentionMethod
from .joint import dense_attention


@dataclass
class DenseConfig(MethodConfig):
    """Dense attention has no options."""

    method_name = "dense"


class DenseMethod(AttentionMethod):
    name = "dense"

    def attend(self, call: AttentionCall) -> torch.Tensor:
        return dense_attention(call)
