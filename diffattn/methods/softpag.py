"""`softpag`: head-level soft perturbed-attention guidance (SoftPAG / HeadHunter, Ahn et al., arXiv 2506.10978).

Perturbation. For each chosen head (layer, head) the attention map A is moved toward a target map P:
A_soft = (1 - u) A + u P, so the head's output is (1 - u) * attention(q, k, v) + u * P v. Non-chosen heads, non-chosen
layers and cross-attention run the stock attention (`F.scaled_dot_product_attention` with the stock mask).

Targets and scopes are both defined on the *logit* matrix: the scope says which block of the logits is replaced, the
target says by what, and the softmax is taken over the resulting row.

- `scope="full"` (HeadHunter): the whole (joint) sequence, text rows included.
  - `identity`: logits -inf off the diagonal -> P = I, P v = v. No L x L map; no attention at all.
  - `uniform`: all logits 0 (a zero query) -> P = 1/L (over the keys the stock mask allows), P v = mean of v over
    keys, one row broadcast. With a mask, a zero-query SDPA over the allowed keys.
  - `mean_q` (SEG's limit): logits q_mean . k / sqrt(d) with q_mean the mean query (over non-padding queries) ->
    one SDPA row, broadcast (a per-query mask: the mean query expanded, still SDPA).
- `scope="image"` (Diffusers PAG's joint processors): only the image-query x image-key block is replaced; an image
  query's logits against the text keys stay as they are and text query rows are unperturbed. Then an image query i
  attends the text keys *and* the image part of the target, weighted by the softmax over the row:
  - `identity`: image logits -inf except the own key (q_i . k_i / sqrt(d)), exactly Diffusers'
    `PAGJointAttnProcessor2_0` mask;
  - `uniform`: all image logits 0; `mean_q`: image logits q_mean . k_j / sqrt(d) with q_mean the mean image query.
  All three reduce the image block to one log-sum-exp `m_i` and one output `o_i` per row (identity: m_i = own logit,
  o_i = v_i; uniform: m = log N_img, o = mean v_img; mean_q: the LSE and output of the mean query's SDPA over image
  keys), so the row is softmax([m_i, logits to text keys]) applied to [o_i, v_text]: memory N_img x (T + 1),
  computed in chunks of image rows, never N x N. For models without text in the sequence (UNet and Wan self-attention,
  SD3.5's image-only `attn2`) the two scopes coincide (Diffusers' identity processor there is `to_out(to_v(x))`).
  A mask that differs per query over the image keys is supported for `identity` (its diagonal is used) but not for
  `uniform`/`mean_q` in this scope (clear `NotImplementedError`); no supported family passes one.

Guidance. On a bare model the chosen heads are perturbed in every forward (`guidance="auto"` or `"off"`). Inside a
pipeline (`guidance="auto"` once the pipeline announces its step count, or `"on"`), every forward returns guided
predictions: the perturbed pass eps_ptb (conditional inputs, chosen heads perturbed) runs each active step, either as
extra rows of the same forward (`batched=True`) or as a second model call (`batched=False`), and the conditional
and unconditional outputs are both shifted by a = s_t (eps_c - eps_ptb). The pipeline's own CFG then gives
(eps_u + a) + g((eps_c + a) - (eps_u + a)) = eps_u + g (eps_c - eps_u) + s_t (eps_c - eps_ptb), the HeadHunter /
Diffusers PAG formula, for any g and without knowing g; with CFG off the pipeline uses eps_c + a directly. (Shifting
only eps_c by (s/g) a gives the same final prediction but needs g; the common shift does not.)

Which rows are conditional (the rule, in order): a forward under `cache_context("uncond")` is unconditional (it gets
the shift stored by the same step's conditional pass, which must come first: Wan and FLUX true-CFG do); under
`"cond"` all rows are conditional; otherwise (SD, SD3 and FLUX-dev pipelines, which name no pass) the batch holds
[uncond; cond] halves when CFG is on -- `cfg=True/False` says so explicitly; `cfg=None` asks the pipeline bound with
`bind_pipeline` (`do_classifier_free_guidance`), else takes `"cond_uncond"` passes and an even batch whose two latent
halves are identical (pipelines feed `cat([latents] * 2)`) as CFG halves -- and any other unnamed forward is
conditional, each guided on its own (so second-order solvers' repeated timesteps are fine). Separate CFG passes must
therefore be named with `model.cache_context("cond"/"uncond")`, as Diffusers' Wan, HunyuanVideo and FLUX true-CFG
pipelines do.

s_t: the scale `scale`, or with `adaptive_scale` Diffusers' max(0, scale - adaptive_scale * (1000 - t)) with t the
model's timestep on the 0..1000 scale (FLUX's transformer input t/1000 is rescaled); zero outside the step window
`start <= step / num_steps < end`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..call import AttentionCall
from ..config import MethodConfig, option
from .base import AttentionMethod
from .softpag_guidance import SoftPAGGuidance
from .softpag_heads import HeadSpec, parse_heads
from .softpag_targets import SCOPES, TARGETS, soft_perturbed_attention, target_attention
from .spec import DemoGeometry, MethodSpec

__all__ = [
    "SCOPES", "SPEC", "TARGETS", "HeadSpec", "SoftPAGConfig", "SoftPAGMethod", "parse_heads",
    "soft_perturbed_attention", "target_attention",
]

logger = logging.getLogger("diffattn")

PERTURBED_ROLES = ("self", "joint")


# ---- options ---------------------------------------------------------------------------------------------------
@dataclass
class SoftPAGConfig(MethodConfig):
    heads: Any = option(
        None,
        help="heads to perturb: 'L11H15,L1H10', 'L5' (all heads of layer 5), 'all', a preset 'sd3:golden-hour', "
        "a dict {layer: [heads]} or a list of (layer, head) pairs (required)",
    )
    u: float = option(0.5, low=0.0, high=1.0, help="how far the chosen heads' maps move toward the target (1 = PAG)")
    target: str = option("identity", choices=TARGETS, help="identity (SoftPAG), uniform, mean_q (SEG-like)")
    scope: str = option("full", choices=SCOPES, help="full joint sequence (HeadHunter) or image block (Diffusers PAG)")
    scale: float = option(3.0, low=0.0, help="perturbed-guidance scale s (pipelines)")
    adaptive_scale: float = option(0.0, low=0.0, help="s_t = max(0, s - adaptive_scale * (1000 - t)) (Diffusers PAG)")
    start: float = option(0.0, low=0.0, high=1.0, help="guidance active from this fraction of the steps")
    end: float = option(1.0, low=0.0, high=1.0, help="guidance active until (excluded) this fraction of the steps")
    batched: bool = option(True, help="perturbed pass as extra rows of the same forward (False: a second model call)")
    guidance: str = option(
        "auto", choices=("auto", "on", "off"),
        help="auto: guided predictions inside a pipeline, perturbation alone on a bare model; on/off force it",
    )
    cfg: bool | None = option(
        None, help="whether unnamed batched forwards hold [uncond; cond] halves (None: from the pipeline or inputs)"
    )

    @classmethod
    def parse_option(cls, name: str, text: str) -> Any:
        """CLI text: `heads` is kept as written ('L11H15,L1H10', 'sd3:golden-hour') unless it is a JSON object or
        list; the generic structured parser would read it as numbers."""
        if name == "heads":
            import json

            stripped = text.strip()
            if stripped[:1] in ("{", "[", '"'):
                value = json.loads(stripped)
                if isinstance(value, dict):
                    return {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in value.items()}
                return value
            return stripped
        return super().parse_option(name, text)

    def check(self) -> None:
        parse_heads(self.heads)
        if self.start >= self.end:
            raise ValueError(
                f"options 'start' ({self.start}) and 'end' ({self.end}) of method 'softpag': start must be < end"
            )


# ---- the method -------------------------------------------------------------------------------------------------
class SoftPAGMethod(SoftPAGGuidance, AttentionMethod):
    def __init__(self, config: SoftPAGConfig) -> None:
        super().__init__(config)
        self.spec = parse_heads(config.heads)
        self._init_guidance()
        self._checked_layers = False

    # ---- checks -------------------------------------------------------------------------------------------------
    def _check_family(self, family: str | None) -> None:
        if family is None or not self.spec.families:
            return
        wrong = sorted(self.spec.families - {family})
        if wrong:
            raise ValueError(
                f"option 'heads' of method 'softpag': preset(s) for {', '.join(wrong)} cannot be applied to a "
                f"{family} model; use a preset of '{family}' or explicit heads"
            )

    def _check_layers(self, call: AttentionCall) -> None:
        if self._checked_layers or call.layer.num_layers <= 0:
            return
        too_big = sorted(layer for layer in self.spec.layers if layer >= call.layer.num_layers)
        if too_big:
            raise ValueError(
                f"option 'heads' of method 'softpag' names layer(s) {too_big}, but this model has "
                f"{call.layer.num_layers} attention layers (indices 0..{call.layer.num_layers - 1})"
            )
        self._checked_layers = True

    def attend(self, call: AttentionCall) -> torch.Tensor:
        q, k, v = call.q, call.k, call.v
        if call.role not in PERTURBED_ROLES or self.config.u == 0.0:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=call.attn_mask, scale=call.scale)
        if call.context is not None:
            self._check_family(call.context.family)
        chosen = self.spec.heads_of(call.layer.index)
        self._check_layers(call)
        rows = self._rows(call.context)
        cfg = self.config
        if (chosen is None and rows is None and cfg.u == 1.0 and cfg.target == "identity"
                and (cfg.scope == "full" or call.role != "joint" or call.text_len == 0)):
            return v  # the whole call is perturbed to the identity map: no attention to compute
        dense = F.scaled_dot_product_attention(q, k, v, attn_mask=call.attn_mask, scale=call.scale)
        if chosen is False or (rows is not None and rows.stop <= rows.start):
            return dense
        num_heads = q.shape[1]
        if chosen is None:
            heads: slice | torch.Tensor = slice(None)
        else:
            bad = [h for h in chosen if h >= num_heads]
            if bad:
                raise ValueError(
                    f"option 'heads' of method 'softpag': head(s) {bad} of layer {call.layer.index} do not exist; "
                    f"{call.layer.path} has {num_heads} heads (0..{num_heads - 1})"
                )
            heads = torch.tensor(chosen, device=q.device)
        rows = slice(None) if rows is None else rows

        def pick(x: torch.Tensor | None, head_dim: int = 1) -> torch.Tensor | None:
            if x is None:
                return None
            x = x[rows] if x.shape[0] > 1 else x
            if x.ndim == 4 and x.shape[head_dim] > 1:
                x = x[:, heads]
            return x

        mask = call.attn_mask
        if mask is not None:
            while mask.ndim < 4:
                mask = mask.unsqueeze(0)
        key_padding = None if call.key_padding is None else call.key_padding[rows]
        d_sel = pick(dense)
        target = target_attention(
            pick(q), pick(k), pick(v), self.config.target, self.config.scope, dense=d_sel,
            text_len=call.text_len if call.role == "joint" else 0, text_first=call.text_first,
            attn_mask=pick(mask), key_padding=key_padding, scale=call.scale,
        ).to(dense.dtype)
        u = self.config.u
        blended = target if u == 1.0 else torch.lerp(d_sel, target, u)
        out = dense.clone()
        view = out[rows]
        view[:, heads] = blended
        return out

    def __repr__(self) -> str:
        return f"SoftPAGMethod({self.config})"


def _demo_options(g: DemoGeometry) -> dict[str, Any]:
    # SoftPAG needs heads; without a HeadHunter search for the demo models take all heads of the middle layer.
    return {"heads": f"L{g.num_layers // 2}"}


SPEC = MethodSpec(
    name="softpag",
    summary="SoftPAG: head-level soft perturbed-attention guidance (HeadHunter heads, Diffusers PAG parity)",
    config_cls=SoftPAGConfig,
    families=("sd3", "flux", "unet", "wan", "hunyuan_video"),
    build=SoftPAGMethod,
    role="guidance",
    demo_options=_demo_options,
)
