"""HeadHunter (Ahn et al., arXiv 2506.10978): greedy search for the attention heads whose perturbation (SoftPAG)
improves an objective.

Each round, every remaining candidate head is added in turn to the heads selected so far; the pipeline generates one
image per (prompt, seed) pair with `diffattn.apply(pipe, "softpag", heads=...)` guidance; the objective scores them;
the `top_k` candidates with the best mean score join the selection. Progress is checkpointed after every candidate
(JSON), so an interrupted search resumes where it stopped. The result is a head set that `heads=` accepts.

Objectives are callables `(images, prompts) -> scores` (one float per image, higher is better). Built in:
`ImageStatistic` (brightness, saturation, contrast, warmth, sharpness: offline, for tests and demos) and
`ClipObjective` (CLIP-style image-text similarity from a local CLIP or PickScore folder).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

import diffattn

logger = logging.getLogger("diffattn")

Objective = Callable[[list, list[str]], Sequence[float]]
Head = tuple[int, int]


# ---------------------------------------------------------------------------------------------------------------
# objectives
# ---------------------------------------------------------------------------------------------------------------
def _as_arrays(images: list) -> list[np.ndarray]:
    """PIL images, arrays or tensors (HWC in [0, 1] or [0, 255], or CHW) -> float HWC arrays in [0, 1]."""
    out = []
    for img in images:
        if isinstance(img, torch.Tensor):
            arr = img.detach().float().cpu().numpy()
            if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
                arr = arr.transpose(1, 2, 0)
        else:
            arr = np.asarray(img, dtype=np.float32)
        if arr.max() > 1.5:
            arr = arr / 255.0
        out.append(arr.astype(np.float32))
    return out


class ImageStatistic:
    """A simple image statistic as the objective (no model needed): brightness, saturation, contrast, warmth
    (red minus blue) or sharpness (variance of a Laplacian). `sign=-1` minimises it."""

    KINDS = ("brightness", "saturation", "contrast", "warmth", "sharpness")

    def __init__(self, kind: str, sign: float = 1.0) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"unknown image statistic {kind!r}; choose one of {', '.join(self.KINDS)}")
        self.kind, self.sign = kind, float(sign)

    def __call__(self, images: list, prompts: list[str]) -> list[float]:
        scores = []
        for arr in _as_arrays(images):
            rgb = arr[..., :3]
            gray = rgb.mean(-1)
            if self.kind == "brightness":
                value = gray.mean()
            elif self.kind == "saturation":
                value = (rgb.max(-1) - rgb.min(-1)).mean()
            elif self.kind == "contrast":
                value = gray.std()
            elif self.kind == "warmth":
                value = (rgb[..., 0] - rgb[..., 2]).mean()
            else:
                lap = -4 * gray[1:-1, 1:-1] + gray[:-2, 1:-1] + gray[2:, 1:-1] + gray[1:-1, :-2] + gray[1:-1, 2:]
                value = lap.var()
            scores.append(self.sign * float(value))
        return scores

    def __repr__(self) -> str:
        return f"ImageStatistic({self.kind!r}, sign={self.sign})"


class ClipObjective:
    """Image-text similarity of a CLIP-style model in a local folder (CLIP ViT-L/14, PickScore_v1, ...), loaded
    with `transformers` (`CLIPModel` + `CLIPProcessor`/tokenizer + image processor). `template` formats the prompt
    (e.g. "A photo depicts {}")."""

    def __init__(self, path: str, *, device: str = "cpu", template: str = "{}") -> None:
        from transformers import AutoProcessor, CLIPModel

        if not os.path.isdir(path):
            raise ValueError(f"ClipObjective needs a local model folder; {path!r} does not exist")
        self.model = CLIPModel.from_pretrained(path).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(path)
        self.path, self.device, self.template = path, device, template

    @torch.no_grad()
    def __call__(self, images: list, prompts: list[str]) -> list[float]:
        from PIL import Image

        pil = [Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8)) for a in _as_arrays(images)]
        texts = [self.template.format(p) for p in prompts]
        inputs = self.processor(text=texts, images=pil, return_tensors="pt", padding=True, truncation=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        image_emb = self.model.get_image_features(pixel_values=inputs["pixel_values"])
        text_emb = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
        # transformers 5 returns an output object whose pooler_output holds the projected embedding
        image_emb = getattr(image_emb, "pooler_output", image_emb)
        text_emb = getattr(text_emb, "pooler_output", text_emb)
        image_emb = image_emb / image_emb.norm(dim=-1, keepdim=True)
        text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
        scale = self.model.logit_scale.exp()
        return (scale * (image_emb * text_emb).sum(-1)).float().cpu().tolist()


def _describe(objective: Objective) -> str:
    """A stable name for checkpoints (no memory addresses): the repr of built-in objectives, else the qualname."""
    if isinstance(objective, ImageStatistic):
        return repr(objective)
    if isinstance(objective, ClipObjective):
        return f"ClipObjective({objective.path!r}, template={objective.template!r})"
    return getattr(objective, "__qualname__", type(objective).__qualname__)


def objective_from_name(spec: str) -> Objective:
    """`brightness`, `-brightness` (minimise), ..., or `clip:/path/to/folder`."""
    if spec.startswith("clip:"):
        return ClipObjective(spec[5:])
    sign = -1.0 if spec.startswith("-") else 1.0
    return ImageStatistic(spec.lstrip("-+"), sign)


# ---------------------------------------------------------------------------------------------------------------
# head sets
# ---------------------------------------------------------------------------------------------------------------
def format_heads(heads: Sequence[Head]) -> str:
    """`[(11, 15), (1, 10)]` -> `"L11H15,L1H10"` (the `heads=` syntax)."""
    return ",".join(f"L{layer}H{head}" for layer, head in heads)


def candidate_heads(model: torch.nn.Module) -> list[Head]:
    """Every (layer, head) of the model's self/joint attention modules, in layer order."""
    from diffattn.adapters import family_of

    seen: dict[int, int] = {}
    for slot in family_of(model).slots(model):
        if slot.layer.role in ("self", "joint") and slot.layer.index not in seen:
            seen[slot.layer.index] = int(slot.module.heads)
    return [(layer, h) for layer, n in sorted(seen.items()) for h in range(n)]


@dataclass
class SearchState:
    """Everything needed to resume: the selection so far and the scores of the current round."""

    selected: list[Head] = field(default_factory=list)
    round: int = 0
    round_scores: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    baseline: float | None = None


@dataclass
class HeadHunterResult:
    heads: str
    selected: list[Head]
    history: list[dict[str, Any]]
    baseline: float | None
    settings: dict[str, Any]

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @staticmethod
    def load(path: str | os.PathLike) -> "HeadHunterResult":
        data = json.loads(Path(path).read_text())
        data["selected"] = [tuple(h) for h in data["selected"]]
        return HeadHunterResult(**data)


class HeadHunter:
    """Greedy head search on a Diffusers pipeline (SD3, FLUX, SD/SDXL, Wan...).

    Args:
        pipe: the pipeline; `diffattn.apply(pipe, "softpag", ...)` is installed per evaluation and removed after.
        objective: `(images, prompts) -> scores`, higher is better.
        pairs: (prompt, seed) pairs every candidate is evaluated on.
        rounds, top_k: R rounds, k heads added per round (paper's style search: 5 rounds of 3).
        candidates: heads to search (default: every head of every self/joint attention layer).
        softpag: options for the perturbation and guidance (u, target, scope, scale, ...); the paper searches with
            u=1 and tunes u afterwards.
        generation: keyword arguments for `pipe(...)` (steps, size, guidance, ...).
        checkpoint: JSON path written after every candidate; an existing file is resumed (same settings only).
    """

    def __init__(
        self,
        pipe,
        objective: Objective,
        pairs: Sequence[tuple[str, int]],
        *,
        rounds: int = 5,
        top_k: int = 3,
        candidates: Sequence[Head] | None = None,
        softpag: dict[str, Any] | None = None,
        generation: dict[str, Any] | None = None,
        checkpoint: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> None:
        if rounds < 1 or top_k < 1:
            raise ValueError(f"rounds and top_k must be >= 1, got rounds={rounds}, top_k={top_k}")
        if not pairs:
            raise ValueError("pairs must hold at least one (prompt, seed) pair")
        self.pipe, self.objective, self.pairs = pipe, objective, [(str(p), int(s)) for p, s in pairs]
        self.rounds, self.top_k = rounds, top_k
        model = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
        if model is None:
            raise ValueError("HeadHunter needs a pipeline with a transformer or unet")
        self.candidates = [tuple(c) for c in (candidates if candidates is not None else candidate_heads(model))]
        self.softpag = {"u": 1.0, "scale": 3.0, **(softpag or {})}
        self.generation = dict(generation or {})
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.progress = progress

    def settings(self) -> dict[str, Any]:
        return {
            "pairs": self.pairs, "rounds": self.rounds, "top_k": self.top_k, "softpag": self.softpag,
            "generation": self.generation, "objective": _describe(self.objective), "candidates": len(self.candidates),
        }

    def _generate(self, heads: Sequence[Head] | None) -> list:
        images = []
        if heads:
            diffattn.apply(self.pipe, "softpag", heads=format_heads(heads), **self.softpag)
        try:
            for prompt, seed in self.pairs:
                out = self.pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), **self.generation)
                result = out.images if hasattr(out, "images") else out.frames
                images.append(result[0] if isinstance(result, (list, tuple)) or getattr(result, "ndim", 0) > 3 else result)
        finally:
            if heads:
                diffattn.remove(self.pipe)
        return images

    def score(self, heads: Sequence[Head] | None) -> float:
        """Mean objective over the pairs with `heads` perturbed (None: the unperturbed pipeline)."""
        images = self._generate(heads)
        scores = list(self.objective(images, [p for p, _ in self.pairs]))
        if len(scores) != len(images):
            raise ValueError(f"the objective returned {len(scores)} scores for {len(images)} images")
        return float(np.mean(scores))

    def _load(self) -> SearchState:
        if self.checkpoint is None or not self.checkpoint.exists():
            return SearchState()
        data = json.loads(self.checkpoint.read_text())
        if data.get("settings") != json.loads(json.dumps(self.settings())):
            raise ValueError(
                f"checkpoint {self.checkpoint} was written with other settings; delete it or use another path"
            )
        state = SearchState(**data["state"])
        state.selected = [tuple(h) for h in state.selected]
        logger.info("diffattn HeadHunter: resuming round %d with %d heads selected", state.round, len(state.selected))
        return state

    def _save(self, state: SearchState) -> None:
        if self.checkpoint is None:
            return
        tmp = self.checkpoint.with_suffix(".tmp")
        tmp.write_text(json.dumps({"settings": self.settings(), "state": asdict(state)}, indent=2))
        os.replace(tmp, self.checkpoint)

    def run(self) -> HeadHunterResult:
        state = self._load()
        if state.baseline is None:
            state.baseline = self.score(None)
            self._save(state)
        total = self.rounds * len(self.candidates)
        bar = tqdm(total=total, desc="HeadHunter", disable=not self.progress)
        bar.update(sum(len(self.candidates) for _ in range(state.round)) + len(state.round_scores))
        try:
            while state.round < self.rounds:
                pool = [c for c in self.candidates if c not in state.selected]
                if not pool:
                    break
                for head in pool:
                    key = format_heads([head])
                    if key in state.round_scores:
                        continue
                    state.round_scores[key] = self.score([*state.selected, head])
                    self._save(state)
                    bar.update(1)
                    bar.set_postfix(round=state.round, best=f"{max(state.round_scores.values()):.4f}")
                ranked = sorted(state.round_scores.items(), key=lambda kv: kv[1], reverse=True)
                chosen = [tuple(int(x) for x in k[1:].split("H")) for k, _ in ranked[: self.top_k]]
                state.selected.extend(chosen)
                state.history.append({"round": state.round, "added": format_heads(chosen), "scores": dict(ranked)})
                logger.info("diffattn HeadHunter: round %d adds %s", state.round, format_heads(chosen))
                state.round += 1
                state.round_scores = {}
                bar.update(len(self.candidates) - len(pool))
                self._save(state)
        finally:
            bar.close()
        return HeadHunterResult(format_heads(state.selected), state.selected, state.history, state.baseline, self.settings())


# ---------------------------------------------------------------------------------------------------------------
# CLI: diffattn headhunt
# ---------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffattn headhunt", description="greedy search for SoftPAG heads")
    parser.add_argument("--model", required=True, help="a Diffusers pipeline folder or hub id")
    parser.add_argument("--prompt", action="append", default=[], help="repeatable")
    parser.add_argument("--prompts", help="a text file, one prompt per line")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; every prompt runs with every seed")
    parser.add_argument("--objective", default="brightness", help="brightness|saturation|contrast|warmth|sharpness "
                        "(prefix - to minimise) or clip:/path/to/local/clip")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--u", type=float, default=1.0)
    parser.add_argument("--scale", type=float, default=3.0)
    parser.add_argument("--target", default="identity")
    parser.add_argument("--scope", default="full")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None, help="the pipeline's CFG scale")
    parser.add_argument("--extra", action="append", default=[], help="more pipe(...) arguments as key=JSON")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="heads.json")
    parser.add_argument("--checkpoint", default=None, help="default: <out>.ckpt.json")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    prompts = list(args.prompt)
    if args.prompts:
        prompts += [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    if not prompts:
        print("diffattn headhunt: give --prompt or --prompts", file=sys.stderr)
        return 2
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        objective = objective_from_name(args.objective)
        from diffattn.generate import load_pipeline

        pipe = load_pipeline(args.model, device=args.device)
        pipe.set_progress_bar_config(disable=True)
        generation: dict[str, Any] = {"num_inference_steps": args.steps, "output_type": "np"}
        for key in ("height", "width"):
            if getattr(args, key) is not None:
                generation[key] = getattr(args, key)
        if args.guidance is not None:
            generation["guidance_scale"] = args.guidance
        for item in args.extra:
            key, _, value = item.partition("=")
            generation[key] = json.loads(value)
        hunter = HeadHunter(
            pipe, objective, [(p, s) for p in prompts for s in seeds], rounds=args.rounds, top_k=args.top_k,
            softpag={"u": args.u, "scale": args.scale, "target": args.target, "scope": args.scope},
            generation=generation, checkpoint=args.checkpoint or f"{args.out}.ckpt.json", progress=not args.no_progress,
        )
        start = time.perf_counter()
        result = hunter.run()
    except (ValueError, OSError) as exc:
        print(f"diffattn headhunt: {exc}", file=sys.stderr)
        return 2
    result.save(args.out)
    print(f"heads: {result.heads} (baseline {result.baseline:.4f}; {time.perf_counter() - start:.0f} s); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
