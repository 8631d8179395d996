"""FICGen measurements: `diffattn bench layout --model assets/demo-unet [--weights assets/ficgen-demo-unet]`.

1. **Layout accuracy** on the UNet demo model: random layouts of 1-3 shapes (distinct colours, boxes that do not
   overlap), generated with the prompt only (stock), training-free FICGen and trained FICGen at the same seeds. Per
   instance: the fraction of the pixels of its colour (RGB distance < 60 to the palette colour) that lie inside its
   box ("mass in box"), and a hit: mass in box >= 0.5 and the colour covers >= 25% of the box ("colour hit"), plus
   the shape read from how much of its own bounding box the colour fills (square > 0.88 > circle > 0.64 > triangle)
   being right ("shape hit"). Two sets: `grid` (boxes near the 3x3 cells; each phrase names its nearest cell, so the
   prompt says roughly where -- the demo model was trained on such prompts) and `free` (boxes anywhere; the phrases
   and prompt name no place, so only the layout says where).
2. **Overhead per step** (`--overhead`): one UNet forward (batch 2, CFG) of a real SD1.5 config (random weights) at
   512x512, stock processors vs ficgen variants, timed with `triton.testing.do_bench` (median) on the GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

import torch

from ..api import apply, installed, remove
from ..layout import Instance, Layout
from .layout import ShapesReferenceBank, build_inputs

logger = logging.getLogger("diffattn")

THRESHOLD = 60.0


def random_layouts(n: int, seed: int = 0, mode: str = "grid") -> list[dict[str, Any]]:
    """`n` scenes: prompt, layout, and per instance (colour, shape, box)."""
    from .demo_data import BACKGROUNDS, GRID_PLACES, SHAPE_COLORS, SHAPES

    if mode not in ("grid", "free"):
        raise ValueError(f"mode must be 'grid' or 'free', got {mode!r}")
    g = torch.Generator().manual_seed(seed)
    places, colours = list(GRID_PLACES), list(SHAPE_COLORS)
    items = []
    while len(items) < n:
        k = int(torch.randint(1, 4, (1,), generator=g))
        picks = torch.randperm(len(colours), generator=g)[:k].tolist()
        boxes: list[tuple[float, float, float, float]] = []
        names: list[str] = []
        attempts = 0
        while len(boxes) < k and attempts < 200:
            attempts += 1
            size = 0.18 + 0.14 * float(torch.rand((), generator=g))
            if mode == "grid":
                cell = places[int(torch.randint(len(places), (1,), generator=g))]
                cx, cy = (c + 0.16 * (float(torch.rand((), generator=g)) - 0.5) for c in GRID_PLACES[cell])
            else:
                cell = ""
                cx, cy = (size / 2 + (1 - size) * float(torch.rand((), generator=g)) for _ in range(2))
            box = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
            if min(box) < 0 or max(box) > 1:
                continue
            if any(not (box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1]) for b in boxes):
                continue
            if mode == "grid" and cell in names:
                continue
            boxes.append(box)
            names.append(cell)
        if len(boxes) < k:
            continue
        shapes = [SHAPES[int(torch.randint(len(SHAPES), (1,), generator=g))] for _ in range(k)]
        cols = [colours[i] for i in picks]
        options = [b for b in BACKGROUNDS if b not in cols]
        background = options[int(torch.randint(len(options), (1,), generator=g))]
        phrases = [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s}" + (f" {p}" if p else "")
                   for c, s, p in zip(cols, shapes, names)]
        prompt = f"{' and '.join(phrases)} on a {background} background"
        layout = Layout(tuple(Instance(p, box=b) for p, b in zip(phrases, boxes)))
        items.append({"prompt": prompt, "layout": layout, "targets": list(zip(cols, shapes, boxes)),
                      "background": f"a {background} background"})
    return items


def shape_of(mask: torch.Tensor) -> str | None:
    """circle / square / triangle from how much of its own bounding box a binary mask fills."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if ys.numel() < 4:
        return None
    area = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = float(mask.sum()) / float(area)
    return "square" if fill > 0.88 else "circle" if fill > 0.64 else "triangle"


def score(images: torch.Tensor, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per instance metrics for images `[N, 3, H, W]` in [0, 1]."""
    from .demo_data import SHAPE_COLORS

    out = []
    for img, item in zip(images, items):
        h, w = img.shape[-2:]
        pix = img.float() * 255
        for colour, shape, box in item["targets"]:
            ref = torch.tensor(SHAPE_COLORS[colour], dtype=torch.float32).view(3, 1, 1)
            match = (pix - ref).pow(2).sum(0).sqrt() < THRESHOLD
            x0, y0, x1, y1 = (int(round(v)) for v in (box[0] * w, box[1] * h, box[2] * w, box[3] * h))
            inside = match[y0:y1, x0:x1]
            total = float(match.sum())
            mass = float(inside.sum()) / total if total else 0.0
            cover = float(inside.float().mean()) if inside.numel() else 0.0
            colour_hit = mass >= 0.5 and cover >= 0.25
            out.append({"mass_in_box": mass, "cover": cover, "colour_hit": colour_hit,
                        "shape_hit": colour_hit and shape_of(inside) == shape})
    return out


def summarise(rows: list[dict[str, Any]]) -> dict[str, float]:
    n = max(1, len(rows))
    return {"instances": len(rows), "mass_in_box": sum(r["mass_in_box"] for r in rows) / n,
            "colour_hit": sum(r["colour_hit"] for r in rows) / n, "shape_hit": sum(r["shape_hit"] for r in rows) / n}


def generate(pipe: Any, items: list[dict[str, Any]], variant: str, *, weights: Any = None, steps: int = 20,
             seed: int = 0, batch: int = 32, references: ShapesReferenceBank | None = None,
             options: dict[str, Any] | None = None) -> torch.Tensor:
    """Images `[N, 3, H, W]` in [0, 1]: `variant` stock / free (training-free) / trained (modules `weights`)."""
    images = []
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        prompts = [it["prompt"] for it in chunk]
        kwargs: dict[str, Any] = {}
        opts = dict(options or {})
        exemplar = opts.pop("exemplar", None)  # "composite": the exemplar K/V path with the bank's composites
        named = opts.pop("background", None)  # the layouts name their background phrase ("a gray background")
        layouts = [it["layout"] for it in chunk]
        if named:
            layouts = [Layout(lay.instances, background=it["background"]) for lay, it in zip(layouts, chunk)]
        if variant != "stock":
            bank = references if variant == "trained" or exemplar else None
            if exemplar and bank is None:
                bank = references = ShapesReferenceBank()
            inputs = build_inputs(pipe, layouts, prompts, references=bank, device=pipe.device, exemplar=exemplar)
            apply(pipe, "ficgen", **opts)
            if variant == "trained":
                installed(pipe.unet).runtime.attach_modules(weights)
            kwargs["cross_attention_kwargs"] = {"ficgen": inputs}
        try:
            gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
            out = pipe(prompt=prompts, num_inference_steps=steps, generator=gens, output_type="pt", **kwargs).images
        finally:
            remove(pipe)
        images.append(out.float().cpu())
    return torch.cat(images)


def layout_accuracy(pipe: Any, *, weights: Any = None, n: int = 64, steps: int = 20, seed: int = 0,
                    modes: tuple[str, ...] = ("grid", "free"), options: dict[str, Any] | None = None,
                    references: ShapesReferenceBank | None = None,
                    extra_free: list[dict[str, Any]] | None = None,
                    progress: Any = None, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Scores per `set/variant`; `extra_free` adds training-free variants with other options (`free[k=v,...]`);
    `weights`: trained modules, or a dict label -> modules (one trained variant each, `trained[label]`)."""
    results: dict[str, Any] = {}
    variants: list[tuple[str, str, dict[str, Any], Any]] = [("stock", "stock", {}, None),
                                                            ("free", "free", options or {}, None)]
    for extra in extra_free or []:
        label = "free[" + ",".join(f"{k}={v}" for k, v in extra.items()) + "]"
        variants.append((label, "free", {**(options or {}), **extra}, None))
    trained = weights if isinstance(weights, dict) else {} if weights is None else {"": weights}
    for name, modules in trained.items():
        variants.append((f"trained[{name}]" if name else "trained", "trained", options or {}, modules))
    variants = [v for v in variants if v[0] not in skip]
    for mode in modes:
        items = random_layouts(n, seed=seed, mode=mode)
        for label, variant, opts, modules in variants:
            start = time.perf_counter()
            imgs = generate(pipe, items, variant, weights=modules, steps=steps, seed=seed, references=references,
                            options=opts)
            results[f"{mode}/{label}"] = {**summarise(score(imgs, items)), "seconds": time.perf_counter() - start,
                                          "options": opts}
            results[f"{mode}/{label}"]["_images"] = imgs[:8]
            if progress is not None:  # e.g. print each row as it is measured (a cut-off run keeps what it had)
                progress(f"{mode}/{label}", results[f"{mode}/{label}"])
    return results


def sd15_unet(device: str, dtype: torch.dtype):
    """A UNet2DConditionModel with the SD1.5 config (random weights)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):  # initialised on the device: 860 M parameters initialise slowly on the CPU
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
        )
    return unet.to(dtype).eval()


def overhead(device: str = "cuda", dtype: torch.dtype = torch.float16, instances: int = 3, rounds: int = 12,
             steps_per_round: int = 5, seed: int = 0) -> list[dict[str, Any]]:
    """Time of one SD1.5 UNet forward at 512x512 (batch 2: uncond + cond), stock vs ficgen variants.

    Interleaved: `rounds` rounds, each visiting every variant in a fresh random order (install, 2 untimed warm-up
    forwards, then `steps_per_round` forwards each timed with its own pair of CUDA events, remove), so slow drifts
    of the machine (clocks, other work) fall on every variant alike. Per variant: median, 10th/90th percentile and
    the spread between them over all timed forwards, and the median of the per-round ratios to stock."""
    from ..methods.ficgen import FICGenInputs
    from ..methods.ficgen_modules import FICGenModules

    unet = sd15_unet(device, dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    sample = torch.randn(2, 4, 64, 64, device=device, dtype=dtype, generator=g)
    text = torch.randn(2, 77, 768, device=device, dtype=dtype, generator=g)
    t = torch.tensor(500, device=device)
    boxes = [(0.05, 0.1, 0.45, 0.6), (0.5, 0.05, 0.95, 0.45), (0.3, 0.55, 0.8, 0.95)][:instances]
    layout = Layout(tuple(Instance(f"thing {i}", box=b) for i, b in enumerate(boxes)))
    inputs = FICGenInputs.from_layouts(layout, torch.randn(instances, 77, 768, device=device, dtype=dtype,
                                                           generator=g), cond_rows=slice(1, 2))
    modules = FICGenModules.for_unet(unet, "mid,up1").to(device).eval()
    variants: list[tuple[str, dict[str, Any] | None, bool]] = [
        ("stock (AttnProcessor2_0)", None, False),
        ("ficgen training-free, mid+up1", {}, False),
        ("ficgen training-free, mid+up1, attn1 bias", {"self_attention_bias": 4.0}, False),
        ("ficgen training-free, all layers", {"layers": "all"}, False),
        ("ficgen trained modules (random init), mid+up1", {}, True),
    ]
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    per_round: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    order_g = torch.Generator().manual_seed(seed)
    for _ in range(rounds):
        for j in torch.randperm(len(variants), generator=order_g).tolist():
            name, options, trained = variants[j]
            if options is not None:
                apply(unet, "ficgen", **options)
                if trained:
                    installed(unet).runtime.attach_modules(modules)
            kwargs = {} if options is None else {"cross_attention_kwargs": {"ficgen": inputs}}
            try:
                with torch.no_grad():
                    for _ in range(2):
                        unet(sample, t, encoder_hidden_states=text, **kwargs)
                    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                              for _ in range(steps_per_round)]
                    for start, end in events:
                        start.record()
                        unet(sample, t, encoder_hidden_states=text, **kwargs)
                        end.record()
                    torch.cuda.synchronize()
            finally:
                if options is not None:
                    remove(unet)
            ms = [start.elapsed_time(end) for start, end in events]
            times[name] += ms
            per_round[name].append(_quantile(ms, 0.5))
    rows = []
    base = per_round[variants[0][0]]
    for name, _, _ in variants:
        ms = times[name]
        p10, med, p90 = _quantile(ms, 0.1), _quantile(ms, 0.5), _quantile(ms, 0.9)
        ratios = [a / b for a, b in zip(per_round[name], base)]
        rows.append({"variant": name, "ms": med, "p10": p10, "p90": p90, "spread": (p90 - p10) / med,
                     "forwards": len(ms), "vs_stock": _quantile(ratios, 0.5),
                     "vs_stock_p10": _quantile(ratios, 0.1), "vs_stock_p90": _quantile(ratios, 0.9)})
    return rows


def _quantile(values: list[float], q: float) -> float:
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffattn bench layout", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="the UNet demo model folder (layout accuracy)")
    parser.add_argument("--weights", action="append", default=[], metavar="[LABEL=]FOLDER",
                        help="trained FICGen modules folder (adds a trained variant; repeatable, e.g. old=... new=...)")
    parser.add_argument("--n", type=int, default=64, help="layouts per set (default 64)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--overhead", action="store_true", help="also time the SD1.5 UNet step (GPU)")
    parser.add_argument("--rounds", type=int, default=12, help="interleaved timing rounds (--overhead)")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the layout accuracy (with --model)")
    parser.add_argument("--modes", default="grid,free", help="layout sets: grid, free or both (default)")
    parser.add_argument("--skip", default="", help="variants to leave out, e.g. 'stock,free' (measured before)")
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="training-free ficgen option")
    parser.add_argument("--also", action="append", default=[], metavar="K=V;K=V",
                        help="another training-free variant with these options (repeatable), e.g. 'alpha=1;beta=2'")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--grid-png", default=None, help="write a picture of the first layouts per variant")
    args = parser.parse_args(argv)
    from ..generate import parse_method_options

    options = parse_method_options("ficgen", args.opt)
    record: dict[str, Any] = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if
                              torch.cuda.is_available() else "cpu", "date": time.strftime("%Y-%m-%d"),
                              "options": options, "n": args.n, "steps": args.steps}
    if args.model and not args.no_accuracy:
        from ..generate import load_pipeline
        from ..methods.ficgen_modules import load_modules

        pipe = load_pipeline(args.model, dtype="fp32", device=args.device)
        pipe.set_progress_bar_config(disable=True)
        weights = {}
        for spec in args.weights:
            label, _, folder = spec.rpartition("=") if "=" in spec else ("", "", spec)
            weights[label] = load_modules(folder, args.device)
        refs = ShapesReferenceBank() if weights else None
        extra = [_variant_options(spec) for spec in args.also]
        header = f"{'set/variant':<44} {'instances':>9} {'mass in box':>11} {'colour hit':>10} {'shape hit':>9}"

        def row(key: str, v: dict[str, Any]) -> str:
            return (f"{key:<44} {v['instances']:>9} {v['mass_in_box']:>11.3f} {v['colour_hit']:>10.3f} "
                    f"{v['shape_hit']:>9.3f}")

        print(header, flush=True)
        acc = layout_accuracy(pipe, weights=weights or None, n=args.n, steps=args.steps, seed=args.seed,
                              options=options, references=refs, extra_free=extra,
                              modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()),
                              progress=lambda key, v: print(row(key, v) + f"  ({v['seconds']:.1f} s)", flush=True),
                              skip=tuple(x.strip() for x in args.skip.split(",") if x.strip()))
        if args.grid_png:
            _picture({k: v.pop("_images") for k, v in acc.items()}, args.grid_png)
        else:
            for v in acc.values():
                v.pop("_images")
        record["layout_accuracy"] = acc
    if args.overhead:
        import triton

        rows = overhead(args.device, rounds=args.rounds)
        record["overhead"] = rows
        record["triton"] = triton.__version__
        print(f"{'SD1.5 UNet forward, 512x512, batch 2, fp16':<48} {'median ms':>9} {'p10-p90':>13} {'x stock':>6}"
              f" {'(p10-p90)':>11}")
        for r in rows:
            print(f"{r['variant']:<48} {r['ms']:>9.2f} {r['p10']:>6.2f}-{r['p90']:<6.2f} {r['vs_stock']:>6.3f}"
                  f" {r['vs_stock_p10']:>5.3f}-{r['vs_stock_p90']:<5.3f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2, default=str)
    return 0


def _variant_options(spec: str) -> dict[str, Any]:
    """`"alpha=1;beta=2"` -> ficgen options. The bench's own keys: `exemplar=composite` (the exemplar K/V path fed
    with the drawn-shapes bank's composites) and `background=1` (each layout names its background phrase)."""
    from ..generate import parse_method_options

    parts = [p for p in spec.split(";") if p]
    own = {k.strip(): v.strip() for k, _, v in (p.partition("=") for p in parts) if k.strip() in ("exemplar", "background")}
    if own.get("exemplar", "composite") != "composite" or own.get("background", "1") != "1":
        raise SystemExit(f"diffattn bench layout: --also accepts exemplar=composite and background=1, got {own}")
    options = parse_method_options("ficgen", [p for p in parts if p.partition("=")[0].strip() not in own])
    return {**({"exemplar": "composite"} if "exemplar" in own else {}),
            **({"background": True} if "background" in own else {}), **options}


def _picture(images: dict[str, torch.Tensor], path: str) -> None:
    """Rows = variants, columns = the first layouts."""
    from PIL import Image

    rows = [torch.cat(list(imgs.clamp(0, 1)), dim=-1) for imgs in images.values()]
    grid = torch.cat(rows, dim=-2)
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(path)


if __name__ == "__main__":
    raise SystemExit(main())
