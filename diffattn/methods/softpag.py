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
import re
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..call import AttentionCall, ForwardContext
from ..config import MethodConfig, option
from .base import AttentionMethod
from .softpag_presets import get_preset
from .spec import DemoGeometry, MethodSpec
from .toolkit import append_rows, output_sample, take_rows, with_output_sample

logger = logging.getLogger("diffattn")

TARGETS = ("identity", "uniform", "mean_q")
SCOPES = ("full", "image")
PERTURBED_ROLES = ("self", "joint")
_STATE_KEY = "softpag"
_CHUNK_ELEMENTS = 1 << 24  # logits per chunk of image rows in scope="image"


# ---- head specification ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadSpec:
    """Parsed `heads`: per layer a tuple of heads, or None for all heads of that layer; `all_layers` for "all"."""

    layers: dict[int, tuple[int, ...] | None]
    all_layers: bool = False
    families: frozenset[str] = frozenset()

    def heads_of(self, layer: int) -> tuple[int, ...] | None | bool:
        """Heads of `layer`: a tuple, None (all heads) or False (layer not chosen)."""
        if self.all_layers:
            return None
        if layer not in self.layers:
            return False
        return self.layers[layer]


_ITEM = re.compile(r"^L(\d+)(?:H(\d+))?$", re.IGNORECASE)
_RANGE = re.compile(r"^L(\d+)-L?(\d+)$", re.IGNORECASE)


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, str) and value.isdigit()):
        raise ValueError(f"option 'heads' of method 'softpag': {what} must be a non-negative int, got {value!r}")
    value = int(value)
    if value < 0:
        raise ValueError(f"option 'heads' of method 'softpag': {what} must be >= 0, got {value}")
    return value


def parse_heads(spec: Any) -> HeadSpec:
    """Parse `heads`: `"L11H15,L1H10"`, `"L5"` (all heads of layer 5), `"L60-L69"` (all heads of those layers),
    `"all"`, presets (`"sd3:golden-hour"`),
    mixes of these separated by commas, a dict `{layer: [head, ...] | "all"}`, or a list of `(layer, head)` pairs
    and/or such strings. Raises `ValueError` naming what is accepted."""
    accepted = (
        "expected a string like 'L11H15,L1H10', 'L5' (all heads of layer 5), 'all' or a preset 'sd3:golden-hour', "
        "a dict {layer: [heads] | 'all'}, or a list of (layer, head) pairs"
    )
    layers: dict[int, set[int] | None] = {}
    families: set[str] = set()
    all_layers = False

    def add(layer: int, head: int | None) -> None:
        if head is None:
            layers[layer] = None
        elif layers.get(layer, set()) is not None:
            layers.setdefault(layer, set()).add(head)  # type: ignore[union-attr]

    def add_string(text: str) -> None:
        nonlocal all_layers
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise ValueError(f"option 'heads' of method 'softpag' got an empty string; {accepted}")
        for item in items:
            if item.lower() == "all":
                all_layers = True
            elif ":" in item:
                family, heads = get_preset(item)
                families.add(family)
                for layer, head in heads:
                    add(layer, head)
            elif _RANGE.match(item):
                first, last = (int(g) for g in _RANGE.match(item).groups())
                if last < first:
                    raise ValueError(f"option 'heads' of method 'softpag': empty layer range {item!r}")
                for layer in range(first, last + 1):
                    add(layer, None)
            else:
                match = _ITEM.match(item)
                if match is None:
                    raise ValueError(f"option 'heads' of method 'softpag': cannot parse {item!r}; {accepted}")
                add(int(match.group(1)), None if match.group(2) is None else int(match.group(2)))

    if spec is None:
        raise ValueError(f"option 'heads' of method 'softpag' is required; {accepted}")
    if isinstance(spec, str):
        add_string(spec)
    elif isinstance(spec, dict):
        if not spec:
            raise ValueError(f"option 'heads' of method 'softpag' got an empty dict; {accepted}")
        for key, value in spec.items():
            layer = _int(key, "a layer index")
            if value is None or (isinstance(value, str) and value.lower() == "all"):
                add(layer, None)
            elif isinstance(value, (list, tuple, set)):
                if not value:
                    raise ValueError(f"option 'heads' of method 'softpag': layer {layer} has an empty head list")
                for head in value:
                    add(layer, _int(head, "a head index"))
            else:
                add(layer, _int(value, "a head index"))
    elif isinstance(spec, (list, tuple)):
        if not spec:
            raise ValueError(f"option 'heads' of method 'softpag' got an empty list; {accepted}")
        for item in spec:
            if isinstance(item, str):
                add_string(item)
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                add(_int(item[0], "a layer index"), _int(item[1], "a head index"))
            else:
                raise ValueError(f"option 'heads' of method 'softpag': cannot use {item!r}; {accepted}")
    else:
        raise ValueError(f"option 'heads' of method 'softpag' got {type(spec).__name__}; {accepted}")
    frozen = {layer: None if heads is None else tuple(sorted(heads)) for layer, heads in layers.items()}
    return HeadSpec(frozen, all_layers, frozenset(families))


# ---- the perturbed attention (pure tensor functions) ----------------------------------------------------------
def _additive_mask(mask: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """A stock SDPA mask as a 4-D additive float mask (bool: True = attend)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    else:
        mask = mask.to(dtype)
    while mask.ndim < 4:
        mask = mask.unsqueeze(0)
    return mask


def _mean_query(q: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean query `[b, h, 1, D]` over the rows marked valid (`[b, S]` bool), or over all rows."""
    if valid is None:
        return q.mean(dim=2, keepdim=True)
    w = valid.to(q.dtype)[:, None, :, None]
    return (q * w).sum(dim=2, keepdim=True) / w.sum(dim=2, keepdim=True).clamp_min(1)


def _broadcast_query_attention(qbar, k, v, mask, scale, num_queries: int) -> torch.Tensor:
    """attention(qbar, k, v) for one query row per (batch, head), broadcast to `num_queries` rows; a mask that
    differs per query row expands the query instead (still SDPA, no map)."""
    if mask is None or mask.shape[-2] == 1:
        out = F.scaled_dot_product_attention(qbar, k, v, attn_mask=mask, scale=scale)
        return out.expand(-1, -1, num_queries, -1)
    return F.scaled_dot_product_attention(qbar.expand(-1, -1, num_queries, -1), k, v, attn_mask=mask, scale=scale)


def target_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    target: str,
    scope: str = "full",
    *,
    dense: torch.Tensor | None = None,
    text_len: int = 0,
    text_first: bool = False,
    attn_mask: torch.Tensor | None = None,
    key_padding: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """The target's attention output P v for q, k, v `[b, h, S, D]` (self or joint attention, Sq = Sk).

    See the module docstring for the definitions. `dense` (the stock attention output) is needed for
    `scope="image"` with text (text rows keep it) and computed when not given.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"softpag perturbs self/joint attention only (Sq == Sk); got Sq={q.shape[2]}, Sk={k.shape[2]}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = attn_mask
    if scope == "full" or text_len == 0:
        if target == "identity":
            return v
        if target == "uniform":
            if mask is None:
                return v.mean(dim=2, keepdim=True).expand_as(v)
            return _broadcast_query_attention(torch.zeros_like(q[:, :, :1]), k, v, mask, scale, q.shape[2])
        return _broadcast_query_attention(_mean_query(q, key_padding), k, v, mask, scale, q.shape[2])

    # scope == "image" with text in the sequence
    s = q.shape[2]
    img = slice(text_len, s) if text_first else slice(0, s - text_len)
    txt = slice(0, text_len) if text_first else slice(s - text_len, s)
    if dense is None:
        dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    out = dense.clone()
    qi, ki, vi = q[:, :, img].float(), k[:, :, img].float(), v[:, :, img].float()
    kt, vt = k[:, :, txt].float(), v[:, :, txt].float()
    n_img = qi.shape[2]
    m4 = _additive_mask(mask)
    per_query = m4 is not None and m4.shape[-2] > 1
    if m4 is not None and target != "identity" and per_query:
        image_block = m4[..., img, img]
        if bool((image_block != image_block[..., :1, :]).any()):
            raise NotImplementedError(
                f"softpag: target {target!r} with scope='image' needs a mask that is the same for every query over "
                "the image keys; this call's mask differs per query (use target='identity' or scope='full')"
            )
    if target != "identity":
        qbar = torch.zeros_like(qi[:, :, :1]) if target == "uniform" else qi.mean(dim=2, keepdim=True)
        logits = qbar @ ki.transpose(-1, -2) * scale
        if m4 is not None:
            logits = logits + (m4[..., :1, img] if not per_query else m4[..., img.start : img.start + 1, img])
        shared_lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [b, h, 1, 1]
        shared_out = torch.softmax(logits, dim=-1) @ vi  # [b, h, 1, D]
    b, h = qi.shape[:2]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, b * h * (kt.shape[2] + 1)))
    pieces = []
    for start in range(0, n_img, chunk):
        rows = slice(start, min(n_img, start + chunk))
        qc = qi[:, :, rows]
        text_logits = qc @ kt.transpose(-1, -2) * scale
        abs_rows = slice(img.start + rows.start, img.start + rows.stop)
        if m4 is not None:
            text_logits = text_logits + (m4[..., :, txt] if not per_query else m4[..., abs_rows, txt])
        if target == "identity":
            own = (qc * ki[:, :, rows]).sum(-1, keepdim=True) * scale
            if m4 is not None:
                if per_query:
                    own = own + torch.diagonal(m4[..., abs_rows, abs_rows], dim1=-2, dim2=-1).unsqueeze(-1)
                else:
                    own = own + m4[..., 0, abs_rows].unsqueeze(-1)
            image_out = vi[:, :, rows]
        else:
            own = shared_lse.expand(-1, -1, qc.shape[2], 1)
            image_out = shared_out
        weights = torch.softmax(torch.cat([own.expand(b, h, -1, 1), text_logits.expand(b, h, -1, -1)], dim=-1), -1)
        pieces.append(weights[..., :1] * image_out + weights[..., 1:] @ vt)
    out[:, :, img] = torch.cat(pieces, dim=2).to(out.dtype)
    return out


def soft_perturbed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u: float, target: str = "identity", scope: str = "full",
    **kwargs: Any,
) -> torch.Tensor:
    """(1 - u) * attention(q, k, v) + u * target_attention(...): the SoftPAG output of all given heads and rows."""
    mask, scale = kwargs.get("attn_mask"), kwargs.get("scale")
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if u == 0:
        return dense
    tgt = target_attention(q, k, v, target, scope, dense=dense, **kwargs)
    return tgt.to(dense.dtype) if u == 1 else torch.lerp(dense, tgt.to(dense.dtype), u)


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
@dataclass
class _ForwardState:
    """What prepare_forward decided for one model forward (kept in the context's extras)."""

    rows: slice | None  # rows whose chosen heads are perturbed; None = all rows
    kind: str | None = None  # None (perturbation only), "cfg_batch", "cond", "uncond"
    scale: float = 0.0
    batch: int = 0
    cond: slice | None = None
    arguments: dict[str, Any] | None = None


_LATENT_ARGS = ("hidden_states", "sample")


class SoftPAGMethod(AttentionMethod):
    def __init__(self, config: SoftPAGConfig) -> None:
        super().__init__(config)
        self.spec = parse_heads(config.heads)
        self._pipeline: Any = None
        self._model: Any = None
        self._inner = False
        self._pending: dict[int, torch.Tensor] = {}  # step -> shift of that step's conditional pass
        self._checked_layers = False

    # ---- binding ------------------------------------------------------------------------------------------------
    def bind_pipeline(self, pipe: Any) -> None:
        """Tell the method which pipeline drives it (weakly held): turns `guidance="auto"` on and lets `cfg=None`
        read `pipe.do_classifier_free_guidance`. `diffattn.apply` on a pipeline calls this."""
        self._pipeline = weakref.ref(pipe)

    def bind_model(self, model: torch.nn.Module) -> None:
        """The model the separate perturbed pass (`batched=False`) re-runs (found automatically otherwise)."""
        self._model = weakref.ref(model)

    def _pipe(self) -> Any:
        return self._pipeline() if self._pipeline is not None else None

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

    # ---- forward level: guidance ------------------------------------------------------------------------------
    def _guiding(self, ctx: ForwardContext) -> bool:
        if self.config.guidance == "on":
            return True
        if self.config.guidance == "off":
            return False
        return self._pipe() is not None or ctx.num_steps is not None

    def scale_at(self, ctx: ForwardContext) -> float:
        """The guidance scale s_t of this forward (0 outside the step window)."""
        cfg = self.config
        if ctx.num_steps:
            frac = ctx.step_index / ctx.num_steps
            if not (cfg.start <= frac < cfg.end):
                return 0.0
        s = cfg.scale
        if cfg.adaptive_scale and ctx.timestep is not None:
            t = ctx.timestep * 1000.0 if ctx.family == "flux" else ctx.timestep
            s = max(0.0, s - cfg.adaptive_scale * (1000.0 - t))
        return float(s)

    def _cfg_batch(self, ctx: ForwardContext, args: dict[str, Any]) -> bool:
        if self.config.cfg is not None:
            return self.config.cfg and ctx.batch_size % 2 == 0
        pipe = self._pipe()
        if pipe is not None and hasattr(pipe, "do_classifier_free_guidance"):
            return bool(pipe.do_classifier_free_guidance) and ctx.batch_size % 2 == 0
        if ctx.pass_name == "cond_uncond":
            return True
        if ctx.batch_size % 2:
            return False
        latent = next((args[n] for n in _LATENT_ARGS if isinstance(args.get(n), torch.Tensor)), None)
        n = ctx.batch_size // 2
        return latent is not None and torch.equal(latent[:n], latent[n:])

    def prepare_forward(self, ctx: ForwardContext, args: dict[str, Any]) -> dict[str, Any] | None:
        self._check_family(ctx.family)
        if self._inner or not self._guiding(ctx):
            ctx.extras[_STATE_KEY] = _ForwardState(rows=None)
            return None
        b = ctx.batch_size
        if ctx.step_index == 0 and ctx.pass_index == 0:
            self._pending.clear()
        s = self.scale_at(ctx)
        if ctx.pass_name == "uncond":
            ctx.extras[_STATE_KEY] = _ForwardState(rows=slice(0, 0), kind="uncond", scale=s, batch=b)
            return None
        if ctx.pass_name != "cond" and self._cfg_batch(ctx, args):
            kind, cond = "cfg_batch", slice(b // 2, b)
        else:  # "cond", or an unnamed forward without CFG halves (FLUX-dev; second-order solvers' repeated t)
            kind, cond = "cond", slice(0, b)
        state = _ForwardState(rows=slice(0, 0), kind=kind, scale=s, batch=b, cond=cond)
        ctx.extras[_STATE_KEY] = state
        if s == 0.0:
            return None
        if not self.config.batched:
            state.arguments = take_rows(args, b, cond)
            return None
        state.rows = slice(b, b + cond.stop - cond.start)
        return append_rows(args, b, cond)

    def _find_model(self, ctx: ForwardContext) -> torch.nn.Module:
        """The model whose forward is finishing (the separate perturbed pass re-runs it).

        Found in `ctx.extras["module"]` (the context hook records the running model, so Wan 2.2's two experts,
        which share one method, each re-run themselves), else the model given to `bind_model`.
        """
        module = ctx.extras.get("module")
        if isinstance(module, torch.nn.Module):
            return module
        if self._model is not None and self._model() is not None:
            return self._model()
        raise RuntimeError(
            "softpag (batched=False): cannot find the model to run the perturbed pass; call "
            "method.bind_model(model) or use batched=True"
        )

    def finish_forward(self, ctx: ForwardContext | None, output: Any) -> Any:
        state: _ForwardState | None = None if ctx is None else ctx.extras.get(_STATE_KEY)
        if state is None or state.kind is None or self._inner:
            return output
        sample = output_sample(output)
        if state.kind == "uncond":
            if state.scale == 0.0:
                return output
            shift = self._pending.get(ctx.step_index)
            if shift is None or shift.shape != sample.shape:
                raise RuntimeError(
                    "softpag: an unconditional pass came before the conditional pass of its step (or with another "
                    "batch); the guidance shift is computed in the conditional pass, which must come first"
                )
            return with_output_sample(output, sample + shift.to(sample.dtype))
        if state.scale == 0.0:
            return output
        b, cond = state.batch, state.cond
        if self.config.batched:
            eps, perturbed = sample[:b], sample[b:]
        else:
            eps = sample
            model = self._find_model(ctx)
            self._inner = True
            try:
                perturbed = output_sample(model(**state.arguments))
            finally:
                self._inner = False
        shift = state.scale * (eps[cond] - perturbed)
        if state.kind == "cfg_batch":
            guided = eps + shift.repeat(2, *([1] * (shift.ndim - 1)))
        else:
            guided = eps + shift
            self._pending = {ctx.step_index: shift}
        return with_output_sample(output, guided)

    # ---- attention --------------------------------------------------------------------------------------------
    def _rows(self, ctx: ForwardContext | None) -> slice | None:
        state = None if ctx is None else ctx.extras.get(_STATE_KEY)
        if self._inner or state is None:
            return None
        return state.rows

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
