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
from ..layout import Instance, Layout
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

    def __post_init__(self) -> None:
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
    def _batch(self, step: int):
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        pixels, prompts, layouts = self.data(self.cfg.batch, g, self.device)
        pixels = pixels.to(self.device)
        vae = self.pipe.vae
        with torch.no_grad():
            dist = vae.encode(pixels.to(vae.dtype)).latent_dist
            latents = dist.mode() * vae.config.scaling_factor
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (pixels.shape[0],), generator=g)
        noise = torch.randn(latents.shape, generator=g).to(self.device, latents.dtype)
        return g, prompts, layouts, latents, t.to(self.device), noise

    def loss_at(self, step: int) -> torch.Tensor:
        g, prompts, layouts, x0, t, noise = self._batch(step)
        pipe = self.pipe
        with torch.no_grad():
            text = pipe.encode_prompt(prompt=prompts, device=self.device, num_images_per_prompt=1,
                                      do_classifier_free_guidance=False)[0]
            inputs = build_inputs(pipe, layouts, prompts, references=self.references, drop=self.cfg.reference_drop,
                                  generator=g, device=self.device, cond_rows=slice(0, len(prompts)))
        xt = self.scheduler.add_noise(x0, noise, t)
        kind = self.scheduler.config.prediction_type
        target = noise if kind == "epsilon" else self.scheduler.get_velocity(x0, noise, t)
        autocast = self.device.type == "cuda" and self.cfg.bf16
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
            pred = pipe.unet(xt, t, encoder_hidden_states=text, cross_attention_kwargs={"ficgen": inputs},
                             return_dict=False)[0]
        return torch.nn.functional.mse_loss(pred.float(), target.float())

    def run(self) -> dict[str, Any]:
        """Train from the current step; checkpoints every `checkpoint_every` steps and at the end."""
        cfg = self.cfg
        apply(self.pipe.unet, "ficgen", layers=cfg.layers, cfg=False)
        installed(self.pipe.unet).runtime.attach_modules(self.modules)
        self.modules.train()
        start = time.monotonic()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="ficgen train", disable=None)
        try:
            while self.step < cfg.steps:
                if cfg.minutes is not None and time.monotonic() - start > cfg.minutes * 60:
                    logger.info("ficgen_train: time budget of %.1f min reached at step %d", cfg.minutes, self.step)
                    break
                loss = self.loss_at(self.step)
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
        finally:
            bar.close()
            remove(self.pipe.unet)
        self.save_checkpoint()
        self.modules.eval()
        return {"steps": self.step, "seconds": time.monotonic() - start, "log": self.log}

    def export(self, folder: str | os.PathLike | None = None, extra: dict[str, Any] | None = None) -> str:
        """The shipped weights: fp16 safetensors + config (no optimizer state)."""
        record = {"training": asdict(self.cfg), "steps": self.step, **(extra or {})}
        return save_modules(self.modules, folder or self.out, extra=record)


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
    args = parser.parse_args(argv)
    from ..generate import load_pipeline

    pipe = load_pipeline(args.model, dtype="fp32", device="cpu")  # diffattn's class for the demo models
    cfg = TrainConfig(layers=args.layers, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                      minutes=args.minutes)
    trainer = Trainer(pipe, args.out, cfg, device=args.device)
    record = trainer.run()
    record["device"] = torch.cuda.get_device_name() if trainer.device.type == "cuda" else "cpu"
    folder = args.export or args.out
    trainer.export(folder, {"seconds": record["seconds"], "device": record["device"]})
    with open(os.path.join(folder, "training_log.json"), "w", encoding="utf-8") as f:
        json.dump(record["log"], f)
    write_card(folder, {**record, "training": asdict(cfg)})
    print(json.dumps({"steps": record["steps"], "seconds": round(record["seconds"], 1),
                      "loss_first": record["log"][0]["loss"] if record["log"] else None,
                      "loss_last": record["log"][-1]["loss"] if record["log"] else None}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
