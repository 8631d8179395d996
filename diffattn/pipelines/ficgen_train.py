"""Train FICGen's modules on a frozen UNet pipeline:
`python -m diffattn.pipelines.ficgen_train --model assets/demo-unet --out assets/ficgen-demo-unet --minutes 4`.

Frozen: the UNet, the VAE and the text encoder; trained: the `FICGenModules` (reference encoders and resamplers,
box embedding, VFE attention and ASFA at the chosen attn2 layers), as upstream. Loss: the pipeline's SD loss (DDPM
noising; epsilon or v-prediction from the scheduler config). AdamW, constant learning rate, gradient clipping 1.

Data: `demo_data.sample_scenes` (1-3 drawn shapes with known boxes and phrases) by default, or any
`data(batch, generator, device) -> (pixels, prompts, layouts)`. Every step draws its batch, timesteps, noise and
reference drop-outs from generators seeded by (seed, step), so a run resumed from a checkpoint (modules, optimizer,
step, loss log) continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..api import apply, installed, remove
from ..layout import Instance, Layout, occupancy
from ..methods.ficgen_modules import FICGenModules, save_modules
from .layout import ShapesReferenceBank, build_inputs

logger = logging.getLogger("diffattn")

CHECKPOINT_NAME = "checkpoint.pt"
Data = Callable[[int, torch.Generator, torch.device], tuple[torch.Tensor, list[str], list[Layout]]]


@dataclass
class TrainConfig:
    layers: str = "mid,up1"
    steps: int = 2000
    batch: int = 16
    lr: float = 1e-4
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    checkpoint_every: int = 200
    seed: int = 0
    reference_drop: float = 0.3
    size: int = 128
    minutes: float | None = None
    bf16: bool = True
    workers: int = 0  # data worker processes (0: in the training process); the batches are the same either way

    def __post_init__(self) -> None:
        if int(self.workers) < 0:
            raise ValueError(f"TrainConfig.workers must be >= 0, got {self.workers!r}")
        for name in ("steps", "batch", "checkpoint_every", "size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if not 0 <= self.reference_drop <= 1:
            raise ValueError(f"TrainConfig.reference_drop must be in [0, 1], got {self.reference_drop}")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")


def scene_data(size: int) -> Data:
    """The drawn-shapes scenes with boxes, as layouts (each ShapeBox's phrase and box)."""
    from .demo_data import sample_scenes

    def data(batch: int, g: torch.Generator, device: torch.device):
        pixels, prompts, boxes = sample_scenes(batch, size=size, generator=g, device=device)
        layouts = [Layout(tuple(Instance(sb.phrase, box=tuple(sb.box)) for sb in scene)) for scene in boxes]
        return pixels, prompts, layouts

    return data


@dataclass
class StepBatch:
    """Everything random about one training step, drawn on the CPU from the generator seeded by (seed, step)."""

    pixels: torch.Tensor
    prompts: list[str]
    layouts: list[Layout]
    timesteps: torch.Tensor
    noise: torch.Tensor
    patches: torch.Tensor | None
    exemplar: torch.Tensor | None
    maps: dict[tuple[int, int], torch.Tensor]


class StepBatches(torch.utils.data.Dataset):
    """`dataset[step]` -> the `StepBatch` of that step. A pure function of (seed, step), so data-loader workers
    (`TrainConfig.workers`) prefetch the same batches the training process would draw itself, in any order, and a
    resumed run continues exactly."""

    def __init__(self, cfg: TrainConfig, data: Data, references: ShapesReferenceBank | None, num_train_timesteps: int,
                 latent_shape: tuple[int, ...], grids: list[tuple[int, int]]) -> None:
        self.cfg, self.data, self.references = cfg, data, references
        self.num_train_timesteps, self.latent_shape, self.grids = num_train_timesteps, latent_shape, grids

    def __len__(self) -> int:
        return self.cfg.steps

    def __getitem__(self, step: int) -> StepBatch:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + int(step))
        pixels, prompts, layouts = self.data(self.cfg.batch, g, torch.device("cpu"))
        t = torch.randint(0, self.num_train_timesteps, (pixels.shape[0],), generator=g)
        noise = torch.randn((pixels.shape[0], *self.latent_shape), generator=g)
        patches = exemplar = None
        if self.references is not None:
            patches, exemplar = self.references.references(layouts, prompts, self.cfg.reference_drop, g)
        n = max(len(lay.instances) for lay in layouts)
        maps = {}
        for h, w in self.grids:  # the occupancy rasters of every level, off the training process
            out = torch.zeros(len(layouts), n, h, w)
            for j, lay in enumerate(layouts):
                out[j, : len(lay.instances)] = occupancy(lay, h, w)
            maps[(h, w)] = out
        return StepBatch(pixels.cpu(), list(prompts), list(layouts), t, noise, patches, exemplar, maps)


def _no_collate(batch: StepBatch) -> StepBatch:
    return batch


class Trainer:
    """One training run; `run()` trains to `cfg.steps` (or `cfg.minutes`), resuming from `out/checkpoint.pt`."""

    def __init__(self, pipe: Any, out: str | os.PathLike, cfg: TrainConfig | None = None, *, data: Data | None = None,
                 references: ShapesReferenceBank | None | str = "shapes", device: Any = None,
                 module_sizes: dict[str, Any] | None = None) -> None:
        from diffusers import DDPMScheduler

        self.cfg = cfg or TrainConfig()
        self.out = Path(out)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.pipe = pipe.to(self.device)
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            model = getattr(pipe, name, None)
            if isinstance(model, torch.nn.Module):
                model.requires_grad_(False).eval()
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.data = data or scene_data(self.cfg.size)
        self.references = ShapesReferenceBank() if references == "shapes" else references
        torch.manual_seed(self.cfg.seed)
        self.modules = FICGenModules.for_unet(pipe.unet, self.cfg.layers, **(module_sizes or {})).to(self.device)
        self.optimizer = torch.optim.AdamW(self.modules.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.step = 0
        self.log: list[dict[str, float]] = []
        with torch.no_grad():  # the latent shape of one image, for the noise drawn with each batch
            probe = torch.zeros(1, 3, self.cfg.size, self.cfg.size, device=self.device, dtype=pipe.vae.dtype)
            latent_shape = tuple(pipe.vae.encode(probe).latent_dist.mode().shape[1:])
        grids = [(max(1, latent_shape[-2] >> k), max(1, latent_shape[-1] >> k)) for k in range(4)]
        self.batches = StepBatches(self.cfg, self.data, self.references, self.scheduler.config.num_train_timesteps,
                                   latent_shape, grids)
        self._resume()

    # ---- checkpoints --------------------------------------------------------------------------------------------
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT_NAME

    def save_checkpoint(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint_path().with_suffix(".tmp")
        torch.save({"modules": self.modules.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                    "log": self.log, "config": asdict(self.cfg)}, tmp)
        os.replace(tmp, self.checkpoint_path())

    def _resume(self) -> None:
        path = self.checkpoint_path()
        if not path.is_file():
            return
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.modules.load_state_dict(state["modules"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.log = int(state["step"]), list(state["log"])
        logger.info("ficgen_train: resumed from %s at step %d", path, self.step)

    # ---- one step -----------------------------------------------------------------------------------------------
    def loss_at(self, step: int | StepBatch) -> torch.Tensor:
        """The training loss of one step (its batch drawn here, or prefetched by a data worker)."""
        batch = self.batches[step] if isinstance(step, int) else step
        pipe, device = self.pipe, self.device
        vae = pipe.vae
        with torch.no_grad():
            pixels = batch.pixels.to(device, vae.dtype)
            x0 = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor
            text = pipe.encode_prompt(prompt=batch.prompts, device=device, num_images_per_prompt=1,
                                      do_classifier_free_guidance=False)[0]
            inputs = build_inputs(pipe, batch.layouts, batch.prompts, reference_images=(batch.patches, batch.exemplar),
                                  device=device, cond_rows=slice(0, len(batch.prompts)))
            inputs._maps.update(batch.maps)
        t = batch.timesteps.to(device)
        noise = batch.noise.to(device, x0.dtype)
        xt = self.scheduler.add_noise(x0, noise, t)
        kind = self.scheduler.config.prediction_type
        target = noise if kind == "epsilon" else self.scheduler.get_velocity(x0, noise, t)
        autocast = device.type == "cuda" and self.cfg.bf16
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            pred = pipe.unet(xt, t, encoder_hidden_states=text, cross_attention_kwargs={"ficgen": inputs},
                             return_dict=False)[0]
        return torch.nn.functional.mse_loss(pred.float(), target.float())

    def _stream(self):
        """The batches from the current step on: drawn in this process, or prefetched in order by data workers."""
        if self.cfg.workers == 0:
            return (self.batches[step] for step in range(self.step, self.cfg.steps))
        return iter(torch.utils.data.DataLoader(
            self.batches, batch_size=None, sampler=range(self.step, self.cfg.steps), num_workers=self.cfg.workers,
            collate_fn=_no_collate, prefetch_factor=4, persistent_workers=False,
        ))

    def run(self, on_checkpoint: Callable[[Trainer], None] | None = None) -> dict[str, Any]:
        """Train from the current step; checkpoints every `checkpoint_every` steps and at the end (`on_checkpoint`
        is called after each, e.g. to export the weights so far)."""
        cfg = self.cfg
        apply(self.pipe.unet, "ficgen", layers=cfg.layers, cfg=False)
        installed(self.pipe.unet).runtime.attach_modules(self.modules)
        self.modules.train()
        start = time.monotonic()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="ficgen train", disable=None)
        stream = self._stream()
        try:
            while self.step < cfg.steps:
                if cfg.minutes is not None and time.monotonic() - start > cfg.minutes * 60:
                    logger.info("ficgen_train: time budget of %.1f min reached at step %d", cfg.minutes, self.step)
                    break
                loss = self.loss_at(next(stream))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.modules.parameters(), cfg.grad_clip)
                self.optimizer.step()
                self.step += 1
                self.log.append({"step": self.step, "loss": float(loss.detach())})
                bar.update(1)
                bar.set_postfix(loss=f"{self.log[-1]['loss']:.4f}")
                if self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                    if on_checkpoint is not None:
                        on_checkpoint(self)
        finally:
            bar.close()
            del stream  # stops the data workers
            remove(self.pipe.unet)
        self.save_checkpoint()
        self.modules.eval()
        return {"steps": self.step, "seconds": time.monotonic() - start, "log": self.log}

    def export(self, folder: str | os.PathLike | None = None, extra: dict[str, Any] | None = None) -> str:
        """The shipped weights: fp16 safetensors + config (no optimizer state)."""
        record = {"training": asdict(self.cfg), "steps": self.step, **(extra or {})}
        return save_modules(self.modules, folder or self.out, extra=record)


def loss_curve(log: list[dict[str, float]], parts: int = 10) -> list[tuple[int, int, float]]:
    """The loss curve in `parts` equal stretches of steps: (first step, last step, mean loss) each (the per-step
    SD loss is dominated by the random timesteps, so only means over many steps show the trend)."""
    if not log:
        return []
    n = len(log)
    out = []
    for i in range(min(parts, n)):
        chunk = log[i * n // min(parts, n):(i + 1) * n // min(parts, n)]
        out.append((int(chunk[0]["step"]), int(chunk[-1]["step"]), sum(e["loss"] for e in chunk) / len(chunk)))
    return out


def write_card(folder: str | os.PathLike, record: dict[str, Any]) -> Path:
    """A model card `README.md` for the shipped modules."""
    folder = Path(folder)
    log = record.get("log", [])
    first = sum(e["loss"] for e in log[:50]) / max(1, len(log[:50]))
    last = sum(e["loss"] for e in log[-50:]) / max(1, len(log[-50:]))
    size = sum(p.stat().st_size for p in folder.glob("ficgen_modules.*"))
    text = f"""# FICGen modules for the UNet demo model

Trained by `python -m diffattn.pipelines.ficgen_train` (diffattn) on the drawn-shapes scenes with boxes
(`demo_data.sample_scenes`: 1-3 shapes per 128x128 image), for the UNet demo model `assets/demo-unet`.
Load with `diffattn.apply(pipe, "ficgen", weights="assets/{folder.name}")` or
`diffattn.pipelines.layout.LayoutPipeline(pipe, weights=..., references="shapes")`.

- What: FICGen's trainable modules (reference encoders with FrequencyProtos + Perceiver resamplers, box
  embedding, VFE attention and ASFA) at the attn2 layers `{record.get('training', {}).get('layers')}`, small widths
  (see `ficgen_modules.json`). The UNet, the VAE and the text encoder are frozen and not included.
- Training: {record.get('steps')} steps of batch {record.get('training', {}).get('batch')}, AdamW lr
  {record.get('training', {}).get('lr')}, grad-clip 1, references dropped {record.get('training', {}).get('reference_drop')}
  of the time; {record.get('seconds', 0):.0f} s on {record.get('device', '?')}.
- Loss (SD loss of the frozen UNet with the modules): mean of the first 50 steps {first:.4f}, of the last 50
  {last:.4f}.
- Files: `ficgen_modules.safetensors` (fp16) and `ficgen_modules.json`, {size / 2**20:.2f} MiB in all.

Loss curve (mean SD loss per tenth of the run):

| steps | mean loss |
|---|---|
""" + "".join(f"| {a}-{b} | {m:.4f} |\n" for a, b, m in loss_curve(log)) + f"""

- Limits: trained for minutes on synthetic shapes only; it knows the demo vocabulary's colours and shapes, nothing
  else. Accuracy against the training-free variant is in BENCHMARKS.md (FICGen layout accuracy).
"""
    path = folder / "README.md"
    path.write_text(text, encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffattn.pipelines.ficgen_train", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="folder of a StableDiffusionPipeline (the UNet demo model)")
    parser.add_argument("--out", required=True, help="folder for checkpoints and the exported modules")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--minutes", type=float, default=None)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--layers", default="mid,up1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--export", default=None, help="folder for the shipped weights + card (default: --out)")
    parser.add_argument("--workers", type=int, default=0, help="data worker processes (default 0: none)")
    parser.add_argument("--checkpoint-every", type=int, default=200)
    args = parser.parse_args(argv)
    from ..generate import load_pipeline

    pipe = load_pipeline(args.model, dtype="fp32", device="cpu")  # diffattn's class for the demo models
    cfg = TrainConfig(layers=args.layers, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                      minutes=args.minutes, workers=args.workers, checkpoint_every=args.checkpoint_every)
    trainer = Trainer(pipe, args.out, cfg, device=args.device)
    device_name = torch.cuda.get_device_name() if trainer.device.type == "cuda" else "cpu"
    folder = args.export or args.out
    started = time.monotonic()

    def export(t: Trainer, seconds: float | None = None) -> None:  # the weights so far: a cut-off run still has some
        t.export(folder, {"seconds": time.monotonic() - started if seconds is None else seconds, "device": device_name})
        with open(os.path.join(folder, "training_log.json"), "w", encoding="utf-8") as f:
            json.dump(t.log, f)

    record = trainer.run(on_checkpoint=export)
    record["device"] = device_name
    export(trainer, record["seconds"])
    write_card(folder, {**record, "training": asdict(cfg)})
    print(json.dumps({"steps": record["steps"], "seconds": round(record["seconds"], 1),
                      "loss_first": record["log"][0]["loss"] if record["log"] else None,
                      "loss_last": record["log"][-1]["loss"] if record["log"] else None}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
