"""Train the demo models: `python -m diffattn.pipelines.demo_train --kind video --out assets/demo-video --minutes 5`.

`--kind unet` trains the UNet demo model (`demo_unet`, SD1.5 layout) on multi-shape scenes with the SD losses
(DDPM noising, v- or epsilon-prediction); its tiny CLIP text encoder is trained with it (see `train_demo_unet`).

Rectified-flow training (the loss of Wan and SD3: predict `noise - x0` at `x_t = (1 - s) x0 + s noise`) of the
transformer on procedurally drawn shapes (`demo_data`), prompts dropped 10% of the time so classifier-free guidance
works, sigmas drawn logit-normal and shifted like the inference schedule. The text encoders stay frozen. An EMA of the
weights is kept; the better of EMA and raw weights on a fixed evaluation batch is saved. Stops at `--minutes` or `--max-steps`, whichever comes first; seeds fixed.

Writes a Diffusers pipeline folder (safetensors), `training.json` (every setting, the loss log, time, device),
`loss.png`, sample pictures and a model card `README.md`.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .demo import (
    SAMPLING_FIELDS,
    DemoImageConfig,
    DemoVideoConfig,
    build_demo_image_pipeline,
    build_demo_video_pipeline,
)
from .demo_data import sample_images, sample_scenes, sample_videos

logger = logging.getLogger("diffattn")

EVAL_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)


def _sample(kind: str, cfg: Any, batch: int, g: torch.Generator, device: torch.device):
    if kind == "video":
        return sample_videos(batch, frames=cfg.num_frames, height=cfg.height, width=cfg.width, generator=g, device=device)
    return sample_images(batch, size=cfg.size, generator=g, device=device)


class _Conditioner:
    """Prompt -> the transformer's text inputs, through the pipeline's own `encode_prompt` (so training and
    generation see exactly the same embeddings)."""

    def __init__(self, pipe: Any, kind: str, cfg: Any, device: torch.device) -> None:
        self.pipe, self.kind, self.cfg, self.device = pipe, kind, cfg, device

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if self.kind == "video":
            embeds, _ = self.pipe.encode_prompt(
                prompts, do_classifier_free_guidance=False, max_sequence_length=self.cfg.text_length, device=self.device
            )
            return {"encoder_hidden_states": embeds}
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompts, prompts, prompts, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.cfg.t5_length,
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


def _shift(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigma / (1 + (shift - 1) * sigma)


def _loss(transformer: Any, x0: torch.Tensor, cond: dict[str, torch.Tensor], sigma: torch.Tensor,
          noise: torch.Tensor, autocast: bool) -> torch.Tensor:
    s = sigma.view(-1, *([1] * (x0.ndim - 1)))
    xt = (1 - s) * x0 + s * noise
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=autocast):
        pred = transformer(hidden_states=xt, timestep=sigma * 1000, return_dict=False, **cond)[0]
    return torch.nn.functional.mse_loss(pred.float(), (noise - x0).float())


def _decay(on: bool, start: float, deadline: float, step: int, max_steps: int | None) -> float:
    """Linear decay to 10% over the run (by time when the run is time-limited, else by steps)."""
    if not on:
        return 1.0
    if max_steps is not None and not math.isfinite(deadline):
        done = step / max_steps
    else:
        done = (time.perf_counter() - start) / max(deadline - start, 1e-9)
    return max(0.1, 1.0 - 0.9 * min(done, 1.0))


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def _save_with_fp16_text_encoders(pipe: Any, out: Path) -> None:
    """`save_pretrained`, then the text encoders' weights rewritten in fp16 (half the bytes; the tracked tree has a
    size budget). Their configs keep `dtype: float32`, so `from_pretrained` still loads them as float32; the
    in-memory weights are rounded to fp16 first, so what the run renders afterwards is what the folder holds."""
    from safetensors.torch import load_file, save_file

    names = [n for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None]
    with torch.no_grad():
        for name in names:
            for param in getattr(pipe, name).parameters():
                param.copy_(param.to(torch.float16).to(param.dtype))
    pipe.save_pretrained(out, safe_serialization=True)
    for name in names:
        path = Path(out) / name / "model.safetensors"
        if path.is_file():
            weights = load_file(path)
            save_file({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in weights.items()}, path,
                      metadata={"format": "pt"})


def train_demo(
    kind: str,
    out: str | Path,
    *,
    cfg: Any = None,
    minutes: float = 5.0,
    max_steps: int | None = None,
    batch: int = 32,
    lr: float = 5e-4,
    warmup: int = 100,
    ema_decay: float = 0.995,
    drop_prompt: float = 0.1,
    seed: int = 0,
    device: str | None = None,
    eval_every: int = 100,
    init: str | Path | None = None,
    lr_decay: bool = False,
) -> dict[str, Any]:
    """Train the `kind` ("video" or "image") demo model and save it to `out`; returns the training record.
    `init`: a folder this function wrote before, to continue training from (its weights, text encoders and history)."""
    if kind not in ("video", "image"):
        raise ValueError(f"kind must be 'video' or 'image', got {kind!r}")
    if minutes <= 0 and not max_steps:
        raise ValueError("give a positive --minutes or --max-steps")
    cfg = cfg or (DemoVideoConfig() if kind == "video" else DemoImageConfig())
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    previous: dict[str, Any] | None = None
    if init is not None:
        from .demo import DemoImagePipeline, DemoVideoPipeline

        cls = DemoVideoPipeline if kind == "video" else DemoImagePipeline
        absent = {} if kind == "video" else {"text_encoder_3": None, "tokenizer_3": None}
        pipe = cls.from_pretrained(str(init), dtype=torch.float32, **absent)
        previous = json.loads((Path(init) / "training.json").read_text())
        model_fields = {k: v for k, v in asdict(cfg).items() if k not in SAMPLING_FIELDS}
        if {k: v for k, v in previous["config"].items() if k not in SAMPLING_FIELDS} != model_fields:
            raise ValueError(f"--init {init} was trained with another config: {previous['config']}")
    else:
        pipe = (build_demo_video_pipeline if kind == "video" else build_demo_image_pipeline)(cfg, seed=seed)
    # A continued run appends to the earlier log; `step` counts from the very first run.
    offset = previous.get("total_steps", previous["steps"]) if previous else 0
    log: list[dict[str, float]] = list(previous["log"]) if previous else []
    stages: list[dict[str, Any]] = list(previous.get("stages", [])) if previous else []
    if previous and not stages:
        stages = [{"steps": previous["steps"], "seconds": previous["seconds"], "lr": previous["lr"]}]
    pipe.to(dev)
    transformer = pipe.transformer
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).requires_grad_(False).eval()
    transformer.train()
    ema = copy.deepcopy(transformer).requires_grad_(False).eval()
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    condition = _Conditioner(pipe, kind, cfg, dev)
    autocast = dev.type == "cuda"
    g = torch.Generator(device="cpu").manual_seed(seed + offset)  # a continued run sees new batches
    noise_g = torch.Generator(device=dev).manual_seed(seed + offset + 1)

    # A fixed evaluation batch at fixed sigmas: the loss curve compares like with like.
    eval_g = torch.Generator(device="cpu").manual_seed(seed + 1000)
    eval_pixels, eval_prompts = _sample(kind, cfg, min(batch, 16), eval_g, dev)
    eval_x0 = pipe.vae.encode(eval_pixels).latent_dist.mode()
    eval_cond = condition(eval_prompts)
    eval_noise = torch.randn(eval_x0.shape, generator=torch.Generator(device=dev).manual_seed(seed + 2), device=dev)

    def evaluate(model: torch.nn.Module) -> float:
        with torch.no_grad():
            losses = [
                _loss(model, eval_x0, eval_cond, torch.full((eval_x0.shape[0],), s, device=dev), eval_noise, autocast)
                for s in EVAL_SIGMAS
            ]
        return float(torch.stack(losses).mean())

    start = time.perf_counter()
    deadline = start + minutes * 60 if minutes > 0 else math.inf
    total = max_steps or None
    bar = tqdm(total=total, desc=f"train demo-{kind}", unit="step")
    step, running = 0, []
    while (max_steps is None or step < max_steps) and time.perf_counter() < deadline:
        pixels, prompts = _sample(kind, cfg, batch, g, dev)
        prompts = ["" if float(torch.rand((), generator=g)) < drop_prompt else p for p in prompts]
        x0 = pipe.vae.encode(pixels).latent_dist.mode()
        u = torch.randn(batch, generator=g).to(dev)
        sigma = _shift(torch.sigmoid(u), cfg.shift).clamp(1e-3, 1.0)
        noise = torch.randn(x0.shape, generator=noise_g, device=dev)
        loss = _loss(transformer, x0, condition(prompts), sigma, noise, autocast)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * _decay(lr_decay, start, deadline, step, max_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        _ema_update(ema, transformer, ema_decay if step >= warmup else 0.0)
        step += 1
        running.append(float(loss.detach()))
        bar.update(1)
        if step % eval_every == 0:
            entry = {"step": offset + step, "seconds": time.perf_counter() - start, "train_loss": float(np.mean(running)),
                     "eval_loss": evaluate(transformer), "eval_loss_ema": evaluate(ema)}
            running = []
            log.append(entry)
            bar.set_postfix(loss=f"{entry['train_loss']:.4f}", eval=f"{entry['eval_loss_ema']:.4f}")
            logger.info("demo-%s step %d: %s", kind, step, entry)
    bar.close()
    seconds = time.perf_counter() - start
    final = {"step": offset + step, "seconds": seconds, "train_loss": float(np.mean(running)) if running else float("nan"),
             "eval_loss": evaluate(transformer), "eval_loss_ema": evaluate(ema)}
    log.append(final)

    saved = "ema" if final["eval_loss_ema"] <= final["eval_loss"] else "raw"  # the better of the two on the eval batch
    if saved == "ema":
        transformer.load_state_dict(ema.state_dict())
    transformer.eval()
    out = Path(out)
    pipe.to("cpu")
    # fp16 on disk keeps each model under 50 MB; `from_pretrained` loads it back as float32 unless told otherwise.
    transformer.to(torch.float16)
    _save_with_fp16_text_encoders(pipe, out)
    record = {
        "kind": kind, "config": asdict(cfg), "steps": step, "seconds": round(seconds, 1), "batch": batch, "lr": lr,
        "total_steps": offset + step, "total_seconds": round(sum(x["seconds"] for x in stages) + seconds, 1),
        "stages": stages + [{"steps": step, "seconds": round(seconds, 1), "lr": lr, "lr_decay": lr_decay,
                             "init": str(init) if init else None}],
        "warmup": warmup, "ema_decay": ema_decay, "drop_prompt": drop_prompt, "seed": seed,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
        "samples_seen": step * batch, "saved_weights": saved, "eval_sigmas": list(EVAL_SIGMAS), "log": log,
        "parameters": sum(p.numel() for p in transformer.parameters()),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2))
    _loss_plot(log, out / "loss.png", kind)
    return record


EVAL_TIMESTEPS = (100, 300, 500, 700, 900)


class _UNetModels(torch.nn.Module):
    """The trained parts of the UNet demo model, as one module for the optimizer, the EMA and clipping."""

    def __init__(self, unet: torch.nn.Module, text_encoder: torch.nn.Module) -> None:
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder


def _unet_loss(models: _UNetModels, tokenizer: Any, scheduler: Any, x0: torch.Tensor, prompts: list[str],
               timesteps: torch.Tensor, noise: torch.Tensor, autocast: bool) -> torch.Tensor:
    """SD's loss: `x_t = sqrt(a) x0 + sqrt(1 - a) noise` at DDPM timestep `t`; the UNet predicts `noise` (epsilon)
    or `v` (v-prediction). Prompts are tokenized as `StableDiffusionPipeline.encode_prompt` does (padded to the
    tokenizer's length, no attention mask), so training and generation see the same embeddings."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(x0.device)
    xt = scheduler.add_noise(x0, noise, timesteps)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, timesteps)
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=autocast):
        embeds = models.text_encoder(ids)[0]
        pred = models.unet(xt, timesteps, encoder_hidden_states=embeds, return_dict=False)[0]
    return torch.nn.functional.mse_loss(pred.float(), target.float())


def train_demo_unet(
    out: str | Path,
    *,
    cfg: Any = None,
    minutes: float = 5.0,
    max_steps: int | None = None,
    batch: int = 64,
    lr: float = 8e-4,
    warmup: int = 100,
    ema_decay: float = 0.995,
    drop_prompt: float = 0.1,
    seed: int = 0,
    device: str | None = None,
    eval_every: int = 100,
    lr_decay: bool = True,
    max_shapes: int = 3,
) -> dict[str, Any]:
    """Train the UNet demo model (`DemoUNetPipeline`) on `sample_scenes` (1 to `max_shapes` shapes per image) and
    save it to `out`; returns the training record. The tiny CLIP text encoder is random at the start and trained with
    the UNet (a frozen random one reads "a red circle ... and a blue square ..." poorly: which colour goes with which
    shape and place is in the word order only). Batches are drawn on the training device; bf16 autocast on CUDA."""
    from diffusers import DDPMScheduler

    from .demo_unet import DemoUNetConfig, build_demo_unet_pipeline, demo_unet_scheduler_config

    if minutes <= 0 and not max_steps:
        raise ValueError("give a positive --minutes or --max-steps")
    cfg = cfg or DemoUNetConfig()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    pipe = build_demo_unet_pipeline(cfg, seed=seed)
    pipe.to(dev)
    models = _UNetModels(pipe.unet, pipe.text_encoder).train()
    ema = copy.deepcopy(models).requires_grad_(False).eval()
    train_scheduler = DDPMScheduler(**demo_unet_scheduler_config(cfg))
    opt = torch.optim.AdamW(models.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    autocast = dev.type == "cuda"
    g = torch.Generator(device="cpu").manual_seed(seed)
    noise_g = torch.Generator(device=dev).manual_seed(seed + 1)

    def scenes(n: int, gen: torch.Generator):
        return sample_scenes(n, size=cfg.size, max_shapes=max_shapes, generator=gen, device=dev)

    eval_g = torch.Generator(device="cpu").manual_seed(seed + 1000)
    eval_pixels, eval_prompts, _ = scenes(min(batch, 16), eval_g)
    eval_x0 = pipe.vae.encode(eval_pixels).latent_dist.mode()
    eval_noise = torch.randn(eval_x0.shape, generator=torch.Generator(device=dev).manual_seed(seed + 2), device=dev)

    def evaluate(model: _UNetModels) -> float:
        was = model.training
        model.eval()
        with torch.no_grad():
            losses = [_unet_loss(model, pipe.tokenizer, train_scheduler, eval_x0, eval_prompts,
                                 torch.full((eval_x0.shape[0],), t, device=dev, dtype=torch.long), eval_noise, autocast)
                      for t in EVAL_TIMESTEPS]
        model.train(was)
        return float(torch.stack(losses).mean())

    log: list[dict[str, float]] = []
    start = time.perf_counter()
    deadline = start + minutes * 60 if minutes > 0 else math.inf
    bar = tqdm(total=max_steps or None, desc="train demo-unet", unit="step")
    step, running = 0, []
    while (max_steps is None or step < max_steps) and time.perf_counter() < deadline:
        pixels, prompts, _ = scenes(batch, g)
        prompts = ["" if float(torch.rand((), generator=g)) < drop_prompt else p for p in prompts]
        x0 = pipe.vae.encode(pixels).latent_dist.mode()
        t = torch.randint(0, train_scheduler.config.num_train_timesteps, (batch,), generator=g).to(dev)
        noise = torch.randn(x0.shape, generator=noise_g, device=dev)
        loss = _unet_loss(models, pipe.tokenizer, train_scheduler, x0, prompts, t, noise, autocast)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * _decay(lr_decay, start, deadline, step, max_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models.parameters(), 1.0)
        opt.step()
        _ema_update(ema, models, ema_decay if step >= warmup else 0.0)
        step += 1
        running.append(loss.detach())  # read back at the evaluation points only (no sync per step)
        bar.update(1)
        if step % eval_every == 0:
            entry = {"step": step, "seconds": time.perf_counter() - start,
                     "train_loss": float(torch.stack(running).mean()), "eval_loss": evaluate(models),
                     "eval_loss_ema": evaluate(ema)}
            running = []
            log.append(entry)
            bar.set_postfix(loss=f"{entry['train_loss']:.4f}", eval=f"{entry['eval_loss_ema']:.4f}")
            logger.info("demo-unet step %d: %s", step, entry)
    bar.close()
    seconds = time.perf_counter() - start
    final = {"step": step, "seconds": seconds,
             "train_loss": float(torch.stack(running).mean()) if running else float("nan"),
             "eval_loss": evaluate(models), "eval_loss_ema": evaluate(ema)}
    log.append(final)
    saved = "ema" if final["eval_loss_ema"] <= final["eval_loss"] else "raw"
    if saved == "ema":
        models.load_state_dict(ema.state_dict())
    models.eval()
    pipe.to("cpu")
    pipe.unet.to(torch.float16)  # fp16 on disk (small); `from_pretrained` loads it as float32 unless told otherwise
    out = Path(out)
    _save_with_fp16_text_encoders(pipe, out)
    record = {
        "kind": "unet", "config": asdict(cfg), "steps": step, "seconds": round(seconds, 1), "batch": batch, "lr": lr,
        "total_steps": step, "total_seconds": round(seconds, 1),
        "stages": [{"steps": step, "seconds": round(seconds, 1), "lr": lr, "lr_decay": lr_decay, "init": None}],
        "warmup": warmup, "ema_decay": ema_decay, "drop_prompt": drop_prompt, "seed": seed, "max_shapes": max_shapes,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
        "samples_seen": step * batch, "saved_weights": saved, "eval_timesteps": list(EVAL_TIMESTEPS), "log": log,
        "parameters": sum(p.numel() for p in pipe.unet.parameters()),
        "text_encoder_parameters": sum(p.numel() for p in pipe.text_encoder.parameters()),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2))
    _loss_plot(log, out / "loss.png", "unet", loss_name="SD loss (v-prediction MSE, log scale)"
               if cfg.prediction_type == "v_prediction" else "SD loss (epsilon MSE, log scale)")
    return record


def _loss_plot(log: list[dict[str, float]], path: Path, kind: str,
               loss_name: str = "rectified-flow loss (MSE, log scale)") -> None:
    from diffattn.bench.plot import line_plot

    steps = [e["step"] for e in log]
    line_plot(
        {"train (mean since last point)": (steps, [e["train_loss"] for e in log]),
         "eval, fixed batch": (steps, [e["eval_loss"] for e in log]),
         "eval, EMA weights": (steps, [e["eval_loss_ema"] for e in log])},
        path, title=f"demo-{kind}: {loss_name}", xlabel="step",
    )


CARD_PROMPTS = {
    "video": ["a red circle moving right on a blue background", "a yellow square moving down on a black background",
              "a white triangle moving left on a purple background", "an orange circle moving up on a green background"],
    "image": ["a red circle on the left on a blue background", "a yellow square at the top on a black background",
              "a white triangle in the center on a purple background", "an orange circle at the bottom on a green background"],
    "unet": ["a red circle on the left on a blue background",
             "a yellow square at the top left and a blue circle at the bottom right on a black background",
             "a white triangle in the center and an orange square on the left on a purple background",
             "a green circle at the top and a red square at the bottom left and a yellow triangle on the right on a gray background"],
}


def render_samples(folder: str | Path, kind: str, device: str | None = None, seed: int = 0) -> list[str]:
    """Generate the card's prompts with the saved pipeline (its default settings) and write `samples.png` (video:
    every 4th frame per row) and, for video, `samples.gif`. Returns the file names."""
    folder = Path(folder)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "unet":  # two rows: seeds `seed` and `seed + 1`
        from .demo_unet import DemoUNetPipeline

        pipe = DemoUNetPipeline.from_pretrained(str(folder)).to(dev)
        pipe.set_progress_bar_config(disable=True)
        rows = [pipe(CARD_PROMPTS[kind], generator=torch.Generator(device="cpu").manual_seed(seed + i),
                     output_type="np").images for i in range(2)]
        sheet = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
        from PIL import Image

        Image.fromarray((sheet * 255).round().astype(np.uint8)).save(folder / "samples.png")
        return ["samples.png"]
    import imageio.v3 as iio

    from .demo import DemoImagePipeline, DemoVideoPipeline

    absent = {} if kind == "video" else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = (DemoVideoPipeline if kind == "video" else DemoImagePipeline).from_pretrained(str(folder), **absent).to(dev)
    pipe.set_progress_bar_config(disable=True)
    prompts = CARD_PROMPTS[kind]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "video":
        videos = pipe(prompts, generator=gen, output_type="np").frames  # [N, F, H, W, 3]
        sheet = np.concatenate([np.concatenate(list(v[::4]), axis=1) for v in videos], axis=0)
        iio.imwrite(folder / "samples.png", (sheet * 255).round().astype(np.uint8))
        clip = np.concatenate(list(videos), axis=2)  # the four clips side by side
        iio.imwrite(folder / "samples.gif", (clip * 255).round().astype(np.uint8), duration=125, loop=0)
        return ["samples.png", "samples.gif"]
    images = pipe(prompts, generator=gen, output_type="np").images
    iio.imwrite(folder / "samples.png", (np.concatenate(list(images), axis=1) * 255).round().astype(np.uint8))
    return ["samples.png"]


def write_card(folder: str | Path) -> Path:
    """The model card `README.md` from `training.json`: what the model is, the data, the training, the loss curve and
    the samples (rendered by `render_samples`)."""
    folder = Path(folder)
    rec = json.loads((folder / "training.json").read_text())
    kind, cfg, last = rec["kind"], rec["config"], rec["log"][-1]
    if kind == "unet":
        return _write_unet_card(folder, rec)
    sampling = DemoVideoConfig() if kind == "video" else DemoImageConfig()  # the pipeline's call defaults now
    weights = sum(f.stat().st_size for f in folder.rglob("*.safetensors")) / 2**20
    if kind == "video":
        what = (f"Text-to-video, Wan architecture (`WanTransformer3DModel`, {cfg['layers']} layers, {cfg['heads']} heads x "
                f"{cfg['dim_head']}), {cfg['num_frames']} frames of {cfg['height']}x{cfg['width']} px. Latents are pixels "
                f"packed 4 frames to a latent frame (`PixelSpaceVAE`), patch (1, 2, 2): "
                f"{(cfg['num_frames'] - 1) // 4 + 1}x{cfg['height'] // 2}x{cfg['width'] // 2} = "
                f"{((cfg['num_frames'] - 1) // 4 + 1) * cfg['height'] * cfg['width'] // 4:,} video tokens. Text: a tiny umT5 "
                f"encoder (random, frozen), {cfg['text_length']} tokens. Loads with `DemoVideoPipeline` (a `WanPipeline`).")
        data = "one shape (circle, square, triangle; 6 colours) moving left, right, up or down over one of 5 backgrounds"
    else:
        what = (f"Text-to-image, SD3 architecture (`SD3Transformer2DModel`, {cfg['layers']} layers, {cfg['heads']} heads x "
                f"{cfg['dim_head']}), {cfg['size']}x{cfg['size']} px in pixel space, patch 2: "
                f"{(cfg['size'] // 2) ** 2:,} image tokens. Text: two tiny CLIP encoders (random, frozen), no T5 "
                f"(the pipeline's {cfg['t5_length']} zero T5 tokens). Loads with `DemoImagePipeline` "
                "(a `StableDiffusion3Pipeline`).")
        data = "one shape (circle, square, triangle; 6 colours) on the left/right/top/bottom/centre of one of 5 backgrounds"
    runs = rec.get("stages") or [{"steps": rec["steps"], "seconds": rec["seconds"], "lr": rec["lr"]}]
    stages = "; ".join(f"{st['steps']} steps in {st['seconds']:.0f} s at lr {st['lr']:g}"
                       + (" decaying linearly to 10%" if st.get("lr_decay") else "") for st in runs)
    total_steps, total_seconds = rec.get("total_steps", rec["steps"]), rec.get("total_seconds", rec["seconds"])
    lines = [
        f"# diffattn demo-{kind}",
        "",
        ("A small model trained by diffattn itself so that `diffattn generate` and the app show real output offline. "
        "It is a demonstration of the attention methods, not a generative model of any quality: shapes are soft-edged "
        "and sometimes misshapen; colours, backgrounds, places and directions follow the prompt most of the time."),
        "",
        (f"- **Model**: {what} {rec['parameters'] / 1e6:.1f} M transformer parameters; {weights:.1f} MB of safetensors "
        "(transformer and text encoders stored in fp16, loaded as float32 unless a dtype is given)."),
        (f"- **Data**: procedurally drawn on the fly (`diffattn.pipelines.demo_data`): {data}; prompts say what and "
        f"where, e.g. \"{CARD_PROMPTS[kind][0]}\". {rec['samples_seen']:,} samples seen in the last stage."),
        (f"- **Training** (`python -m diffattn.pipelines.demo_train --kind {kind}`): rectified flow (Wan/SD3 loss), "
        f"batch {rec['batch']}, AdamW, {rec['warmup']}-step warm-up, prompts dropped {rec['drop_prompt']:.0%} for CFG, "
        f"EMA {rec['ema_decay']} ({rec['saved_weights']} weights saved), seed {rec['seed']}, on {rec['device']} "
        f"(torch {rec['torch']}). Stages: {stages}. Total {total_steps} steps, {total_seconds:.0f} s."),
        (f"- **Loss**: evaluation loss (fixed batch, sigmas {', '.join(map(str, rec['eval_sigmas']))}) "
        f"{last['eval_loss_ema']:.4f} (EMA) / {last['eval_loss']:.4f} (raw) at the end."),
        "",
        "![loss curve](loss.png)",
        "",
        f"Samples (seed 0, the pipeline's defaults: {sampling.steps} steps, guidance {sampling.guidance}), prompts in order: "
        + "; ".join(f"\"{p}\"" for p in CARD_PROMPTS[kind]) + ".",
        "",
        "![samples](samples.png)",
        "",
    ]
    if kind == "video":
        lines += ["Rows: the four prompts; columns: every 4th frame. Animated: [samples.gif](samples.gif).", ""]
    path = folder / "README.md"
    path.write_text("\n".join(lines))
    return path


def _write_unet_card(folder: Path, rec: dict[str, Any]) -> Path:
    from .demo_unet import DemoUNetConfig

    cfg, last, sampling = rec["config"], rec["log"][-1], DemoUNetConfig()
    weights = sum(f.stat().st_size for f in folder.rglob("*.safetensors")) / 2**20
    ch = cfg["channels"]
    heads = [c // cfg["head_dim"] for c in ch]
    top = (cfg["size"] // 2) ** 2
    lines = [
        "# diffattn demo-unet",
        "",
        ("A small SD1.5-layout UNet trained by diffattn itself so that UNet attention methods (AgentSD, FICGen, SoftPAG "
         "on UNets) run and show real output offline. A demonstration, not a generative model of any quality."),
        "",
        (f"- **Model**: text-to-image `UNet2DConditionModel` in a `StableDiffusionPipeline` folder (`DemoUNetPipeline`; "
         f"stock `StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)` loads it too). Blocks: "
         f"{' + '.join(['CrossAttnDownBlock2D'] * (len(ch) - 1) + ['DownBlock2D'])}, mid block with attention, "
         f"{' + '.join(['UpBlock2D'] + ['CrossAttnUpBlock2D'] * (len(ch) - 1))}; channels {tuple(ch)}, "
         f"{cfg['layers_per_block']} layers per block, heads {tuple(heads)} x {cfg['head_dim']}; each transformer block "
         f"has attn1 (self) and attn2 (cross, {cfg['text_length']} text tokens of width {cfg['text_dim']}). "
         f"{cfg['size']}x{cfg['size']} px; latents are pixels rearranged 2x2 into channels (`SpaceToDepthVAE`, "
         f"lossless), {cfg['size'] // 2}x{cfg['size'] // 2}x12, so the top level has {top:,} tokens (SD1.5 at 512x512: "
         f"4,096). Text: a tiny `CLIPTextModel` ({cfg['text_layers']} layers, width {cfg['text_dim']}) over the "
         f"word-level demo vocabulary, trained with the UNet. {rec['parameters'] / 1e6:.2f} M UNet parameters, "
         f"{rec['text_encoder_parameters'] / 1e6:.2f} M text encoder; {weights:.1f} MB of safetensors (UNet and text encoder in fp16)."),
        (f"- **Data**: procedurally drawn on the fly (`diffattn.pipelines.demo_data.sample_scenes`): 1 to "
         f"{rec['max_shapes']} shapes (circle, square, triangle) in distinct colours (6), each in its own cell of a 3x3 "
         "grid, over one of 5 backgrounds; the prompt names every shape, colour and place, e.g. "
         f"\"{CARD_PROMPTS['unet'][3]}\". The data also returns each shape's box and phrase (for layout methods). "
         f"{rec['samples_seen']:,} samples seen."),
        (f"- **Training** (`python -m diffattn.pipelines.demo_train --kind unet`): the SD loss "
         f"({cfg['prediction_type']}, DDPM `{cfg['beta_schedule']}` schedule, uniform timesteps), batch {rec['batch']}, "
         f"AdamW lr {rec['lr']:g} ({rec['warmup']}-step warm-up"
         + (", decaying linearly to 10%" if rec["stages"][-1].get("lr_decay") else "")
         + f"), prompts dropped {rec['drop_prompt']:.0%} for CFG, EMA {rec['ema_decay']} ({rec['saved_weights']} "
         f"weights saved), bf16 autocast, seed {rec['seed']}, on {rec['device']} (torch {rec['torch']}): "
         f"{rec['steps']} steps in {rec['seconds']:.0f} s."),
        (f"- **Loss**: evaluation loss (fixed batch of 16, timesteps {', '.join(map(str, rec['eval_timesteps']))}) "
         f"{last['eval_loss_ema']:.4f} (EMA) / {last['eval_loss']:.4f} (raw) at the end."),
        (f"- **Sampling defaults**: `DPMSolverMultistepScheduler` (trailing spacing), {sampling.steps} steps, guidance "
         f"{sampling.guidance}, {cfg['size']}x{cfg['size']}."),
        "",
        "![loss curve](loss.png)",
        "",
        "Samples (the pipeline's defaults; top row seed 0, bottom row seed 1), prompts left to right: "
        + "; ".join(f"\"{p}\"" for p in CARD_PROMPTS["unet"]) + ".",
        "",
        "![samples](samples.png)",
        "",
    ]
    path = folder / "README.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffattn.pipelines.demo_train", description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=("video", "image", "unet"), required=True)
    parser.add_argument("--out", required=True, help="output pipeline folder (e.g. assets/demo-video)")
    parser.add_argument("--minutes", type=float, default=5.0, help="training time budget")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="default 32 (unet: 64)")
    parser.add_argument("--lr", type=float, default=None, help="default 5e-4 (unet: 8e-4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--init", default=None, help="continue training from a folder written by an earlier run")
    parser.add_argument("--lr-decay", action="store_true", help="decay the learning rate linearly to 10%% over the run (unet: always)")
    parser.add_argument("--card-only", action="store_true", help="only render the samples and the model card of --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.card_only:
        render_samples(args.out, args.kind, device=args.device, seed=args.seed)
        print(f"wrote {write_card(args.out)}")
        return 0
    if args.kind == "unet":
        if args.init:
            parser.error("--init is not supported for --kind unet")
        record = train_demo_unet(args.out, minutes=args.minutes, max_steps=args.max_steps, batch=args.batch or 64,
                                 lr=args.lr or 8e-4, seed=args.seed, device=args.device, eval_every=args.eval_every)
    else:
        record = train_demo(args.kind, args.out, minutes=args.minutes, max_steps=args.max_steps, batch=args.batch or 32,
                            lr=args.lr or 5e-4, seed=args.seed, device=args.device, eval_every=args.eval_every,
                            init=args.init, lr_decay=args.lr_decay)
    last = record["log"][-1]
    print(f"demo-{args.kind}: {record['steps']} steps in {record['seconds']:.0f} s ({record['total_steps']} in all), eval loss (EMA) "
          f"{last['eval_loss_ema']:.4f}; saved to {args.out}")
    render_samples(args.out, args.kind, device=args.device, seed=args.seed)
    write_card(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
