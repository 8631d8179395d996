"""LoRA length extension with Radial Attention (paper §4.3): fine-tune a LoRA on a Wan 2.1 text-to-video
transformer while its self-attention runs the radial block mask, so that the model adapts to the sparse pattern
(and to longer videos than it was trained on). Gradients flow through the block-sparse kernel's backward.

Objective: Wan's rectified flow matching. Per sample a timestep t is drawn, sigma = t / 1000 (after the
scheduler's shift), x_t = (1 - sigma) * x0 + sigma * noise, and the transformer's prediction is regressed (MSE) on
the velocity noise - x0. Videos are encoded once up front by the pipeline's VAE (latent mean, normalised with
`latents_mean`/`latents_std`, the inverse of what `WanPipeline` does before decoding) and prompts once by its text
encoder; the frozen encoders then leave the accelerator.

The LoRA is saved with `WanPipeline.save_lora_weights` (Diffusers' format, alpha in the safetensors metadata), so
`pipe.load_lora_weights(output_dir)` loads it; `load_radial_lora` does that and installs the matching radial mask.

Run: `python -m diffattn.pipelines.radial_lora --pretrained-model WAN_DIR --video-dir VIDEOS --output-dir OUT`.
See docs/radial_lora.md.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

logger = logging.getLogger("diffattn")

VIDEO_SUFFIXES = (".mp4", ".gif", ".webm", ".mov", ".mkv", ".avi")
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Radial options that differ from inference for training: there is no denoising step index during training
# (each sample has its own random timestep), so no dense warm-up steps; the paper keeps the first 2 blocks dense.
TRAINING_RADIAL_DEFAULTS = {"dense_timesteps": 0, "dense_layers": 2}
CHECKPOINT_PREFIX = "checkpoint-"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
STATE_NAME = "training_state.pt"
LORA_CONFIG_NAME = "lora_config.json"
LOSS_LOG_NAME = "loss.csv"


def _fail(name: str, accepted: str, value: Any) -> ValueError:
    return ValueError(f"RadialLoRAConfig.{name} must be {accepted}; got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


@dataclass
class RadialLoRAConfig:
    """Everything a radial LoRA training run needs; validated on construction (`ValueError` names the field).

    Data: `video_dir` holds `.mp4/.gif/.webm/.mov/.mkv/.avi` files (not recursive). A video's prompt is the text of
    `<stem>.txt` beside it, or else its entry in `video_dir/prompts.jsonl` (one JSON object per line:
    `{"file": "clip.mp4", "prompt": "..."}`). Each video gives one clip: its first `num_frames` frames taken every
    `frame_stride` frames, resized (aspect kept) to cover `height x width` and centre-cropped.

    The VAE latents and prompt embeddings are computed once and kept in `cache_dir` (default
    `output_dir/latent_cache`), keyed by the files (name, size, mtime), prompts, geometry and model, so a resumed
    or repeated run does not encode again.
    """

    pretrained_model: str | Path
    video_dir: str | Path
    output_dir: str | Path
    # clip geometry (Wan: frames 4k+1, sides multiples of 16)
    num_frames: int = 81
    height: int = 480
    width: int = 832
    frame_stride: int = 1
    max_sequence_length: int = 512
    cache_dir: str | Path | None = None
    # LoRA
    rank: int = 128
    alpha: float | None = None
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    lora_dropout: float = 0.0
    # optimisation
    learning_rate: float = 1e-4
    weight_decay: float = 1e-4
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    steps: int = 2500
    batch_size: int = 1
    gradient_accumulation: int = 1
    timestep_sampling: str = "uniform"
    timestep_shift: float | None = None
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    gradient_checkpointing: bool = False
    # bookkeeping
    checkpoint_every: int = 500
    keep_checkpoints: int = 0
    resume: bool = False
    eval_every: int = 100
    eval_samples: int = 4
    progress: bool = True
    radial_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # -----------------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        if self.cache_dir is not None:
            if not isinstance(self.cache_dir, (str, os.PathLike)) or not str(self.cache_dir):
                raise _fail("cache_dir", "a path or None (None: output_dir/latent_cache)", self.cache_dir)
            self.cache_dir = Path(self.cache_dir)
        for name in ("pretrained_model", "video_dir", "output_dir"):
            value = getattr(self, name)
            if not isinstance(value, (str, os.PathLike)) or not str(value):
                raise _fail(name, "a non-empty path (str or pathlib.Path)", value)
            setattr(self, name, Path(value))

        def positive_int(name: str, low: int = 1) -> None:
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise _fail(name, f"an integer >= {low}", value)

        for name in ("num_frames", "height", "width", "frame_stride", "max_sequence_length", "rank", "steps",
                     "batch_size", "gradient_accumulation"):
            positive_int(name)
        for name in ("lr_warmup_steps", "seed", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_samples"):
            positive_int(name, 0)
        if (self.num_frames - 1) % 4:
            raise _fail("num_frames", "of the form 4k+1 (Wan's VAE compresses time 4x after the first frame)", self.num_frames)
        for name in ("height", "width"):
            if getattr(self, name) % 16:
                raise _fail(name, "a multiple of 16 (VAE stride 8 x patch 2)", getattr(self, name))
        if self.alpha is not None and (not _is_number(self.alpha) or self.alpha <= 0):
            raise _fail("alpha", "a number > 0, or None for alpha = rank", self.alpha)
        if isinstance(self.target_modules, str):
            self.target_modules = tuple(t.strip() for t in self.target_modules.split(",") if t.strip())
        if (
            not isinstance(self.target_modules, (list, tuple))
            or not self.target_modules
            or not all(isinstance(t, str) and t.strip() for t in self.target_modules)
        ):
            raise _fail("target_modules", "a non-empty list of module-name suffixes such as 'to_q' or 'attn1.to_q'", self.target_modules)
        self.target_modules = tuple(t.strip() for t in self.target_modules)
        if not _is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise _fail("lora_dropout", "a number in [0, 1)", self.lora_dropout)
        if not _is_number(self.learning_rate) or self.learning_rate <= 0:
            raise _fail("learning_rate", "a number > 0", self.learning_rate)
        for name in ("weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise _fail(name, "a number >= 0 (0 disables)", value)
        if self.timestep_sampling not in ("uniform", "logit_normal"):
            raise _fail("timestep_sampling", "one of 'uniform', 'logit_normal'", self.timestep_sampling)
        if self.timestep_shift is not None and (not _is_number(self.timestep_shift) or self.timestep_shift <= 0):
            raise _fail("timestep_shift", "a number > 0, or None for the scheduler's shift", self.timestep_shift)
        if self.dtype not in ("auto", *DTYPES):
            raise _fail("dtype", f"one of 'auto', {', '.join(repr(d) for d in DTYPES)}", self.dtype)
        if not isinstance(self.device, str):
            raise _fail("device", "'auto' or a torch device string such as 'cpu', 'cuda', 'cuda:1'", self.device)
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise _fail("device", "'auto' or a torch device string such as 'cpu', 'cuda', 'cuda:1'", self.device) from None
        for name in ("gradient_checkpointing", "resume", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(name, "True or False", getattr(self, name))
        if not isinstance(self.radial_options, dict):
            raise _fail("radial_options", "a dict of diffattn radial options", self.radial_options)
        self.radial_config()  # validates the radial options

    def radial_config(self):
        """The validated `RadialConfig` used in training (training defaults under the user's options)."""
        from diffattn.methods.radial import RadialConfig

        merged = {**TRAINING_RADIAL_DEFAULTS, **self.radial_options}
        try:
            cfg = RadialConfig.from_options(**merged)
        except ValueError as exc:
            raise ValueError(f"RadialLoRAConfig.radial_options: {exc}") from None
        for name in ("dense_timesteps", "dense_last_steps"):
            if getattr(cfg, name):
                raise _fail(
                    "radial_options",
                    f"free of dense steps ({name} must be 0: training draws a random timestep per sample and has no "
                    "denoising step index)",
                    self.radial_options,
                )
        return cfg

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, Path):
                out[key] = str(value)
            elif isinstance(value, tuple):
                out[key] = list(value)
        return out


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoItem:
    path: Path
    prompt: str


def find_videos(video_dir: Path) -> list[VideoItem]:
    """The training videos of `video_dir` (sorted by name) with their prompts; clear errors for missing data."""
    video_dir = Path(video_dir)
    if not video_dir.is_dir():
        raise ValueError(f"RadialLoRAConfig.video_dir must be an existing folder; got {str(video_dir)!r}")
    videos = sorted(p for p in video_dir.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        raise ValueError(
            f"no videos in {str(video_dir)!r}: expected files ending in {', '.join(VIDEO_SUFFIXES)} (not searched recursively)"
        )
    jsonl: dict[str, str] = {}
    jsonl_path = video_dir / "prompts.jsonl"
    if jsonl_path.exists():
        for lineno, line in enumerate(jsonl_path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                name, prompt = entry["file"], entry["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(
                    f"{jsonl_path}:{lineno}: expected a JSON object with string fields 'file' and 'prompt'"
                ) from None
            if not isinstance(name, str) or not isinstance(prompt, str):
                raise ValueError(f"{jsonl_path}:{lineno}: 'file' and 'prompt' must be strings")
            jsonl[Path(name).name] = prompt
        missing = sorted(set(jsonl) - {v.name for v in videos})
        if missing:
            logger.warning("diffattn radial LoRA: prompts.jsonl names %d file(s) not in the folder: %s", len(missing), missing[:5])
    items = []
    for video in videos:
        sidecar = video.with_suffix(".txt")
        if sidecar.exists():
            prompt = sidecar.read_text(encoding="utf-8").strip()
        elif video.name in jsonl:
            prompt = jsonl[video.name].strip()
        else:
            raise ValueError(
                f"no prompt for video {str(video)!r}: add {sidecar.name!r} beside it or an entry "
                f'{{"file": "{video.name}", "prompt": "..."}} in prompts.jsonl'
            )
        if not prompt:
            raise ValueError(f"the prompt of video {str(video)!r} is empty")
        items.append(VideoItem(video, prompt))
    return items


def read_video(path: Path, num_frames: int, height: int, width: int, frame_stride: int = 1) -> torch.Tensor:
    """The clip of `path` as a float tensor `[3, num_frames, height, width]` in [-1, 1].

    Frames 0, s, 2s, ... (s = `frame_stride`) are read, streaming (a long file is not decoded to the end), then
    resized with antialiasing so that the frame covers `height x width` (aspect kept) and centre-cropped.
    """
    import imageio.v2 as imageio
    import numpy as np

    need = (num_frames - 1) * frame_stride + 1
    frames = []
    try:
        reader = imageio.get_reader(str(path))
    except Exception as exc:  # imageio raises many types for unreadable files
        raise ValueError(f"cannot read video {str(path)!r}: {type(exc).__name__}: {exc}") from None
    try:
        for i, frame in enumerate(reader):
            if i % frame_stride == 0:
                frames.append(np.asarray(frame))
            if i + 1 >= need:
                break
    except Exception as exc:
        raise ValueError(f"cannot decode video {str(path)!r}: {type(exc).__name__}: {exc}") from None
    finally:
        reader.close()
    if len(frames) < num_frames:
        raise ValueError(
            f"video {str(path)!r} is too short: it has {len(frames)} usable frame(s) at frame_stride={frame_stride}, "
            f"and num_frames={num_frames} are needed ({need} source frames)"
        )
    arr = np.stack(frames[:num_frames])
    if arr.ndim == 3:  # grey
        arr = np.repeat(arr[..., None], 3, axis=-1)
    arr = arr[..., :3]  # drop alpha (GIF/WebM)
    video = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float()  # [F, 3, h, w], 0..255
    h, w = video.shape[-2:]
    scale = max(height / h, width / w)
    rh, rw = max(height, round(h * scale)), max(width, round(w * scale))
    if (rh, rw) != (h, w):
        video = F.interpolate(video, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (rh - height) // 2, (rw - width) // 2
    video = video[:, :, top : top + height, left : left + width]
    video = (video / 127.5 - 1.0).clamp(-1.0, 1.0)
    return video.permute(1, 0, 2, 3).contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------
def _resolve_device_dtype(cfg: RadialLoRAConfig) -> tuple[torch.device, torch.dtype]:
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"RadialLoRAConfig.device is {cfg.device!r} but CUDA is not available; use 'cpu' or 'auto'")
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = DTYPES[cfg.dtype]
    return device, dtype


def _load_pipeline(cfg: RadialLoRAConfig, dtype: torch.dtype):
    from diffusers import WanPipeline

    if not cfg.pretrained_model.is_dir():
        raise ValueError(
            f"RadialLoRAConfig.pretrained_model must be a local Diffusers Wan pipeline folder; got {str(cfg.pretrained_model)!r}"
        )
    # The Wan VAE is meant to run in float32 (as Diffusers' Wan examples load it).
    pipe = WanPipeline.from_pretrained(cfg.pretrained_model, dtype={"default": dtype, "vae": torch.float32})
    if getattr(pipe, "transformer_2", None) is not None:
        raise ValueError("radial LoRA training supports single-transformer Wan pipelines; this one has transformer_2 (Wan 2.2 A14B)")
    if getattr(pipe.config, "expand_timesteps", False):
        raise ValueError("radial LoRA training does not support Wan pipelines with expand_timesteps (Wan 2.2 TI2V) yet")
    if pipe.transformer.config.get("image_dim") is not None:
        raise ValueError("radial LoRA training supports text-to-video Wan transformers; this one takes image embeddings (I2V)")
    return pipe


def _check_geometry(cfg: RadialLoRAConfig, pipe) -> None:
    t_factor, s_factor = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
    p_t, p_h, p_w = pipe.transformer.config.patch_size
    if (cfg.num_frames - 1) % (t_factor * p_t):
        raise _fail("num_frames", f"of the form {t_factor * p_t}k+1 for this VAE and transformer", cfg.num_frames)
    for name, patch in (("height", p_h), ("width", p_w)):
        if getattr(cfg, name) % (s_factor * patch):
            raise _fail(name, f"a multiple of {s_factor * patch} for this VAE and transformer", getattr(cfg, name))


def _lora_target_names(transformer: torch.nn.Module, targets: Sequence[str]) -> list[str]:
    """Linear modules matched by PEFT's suffix rule (`name == t` or `name.endswith('.' + t)`)."""
    names = []
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            names.append(name)
    return names


@torch.no_grad()
def _encode_dataset(pipe, items: list[VideoItem], cfg: RadialLoRAConfig, device: torch.device, dtype: torch.dtype):
    """Latents `[N, C, f, h, w]` (float32) and prompt embeddings `[N, L, D]` (dtype), both kept on the CPU."""
    from tqdm.auto import tqdm

    vae = pipe.vae.to(device).eval()
    pipe.text_encoder.to(device).eval()
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, z, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, z, 1, 1, 1)
    latents, embeds = [], []
    for item in tqdm(items, desc="encoding videos", disable=not cfg.progress):
        clip = read_video(item.path, cfg.num_frames, cfg.height, cfg.width, cfg.frame_stride)
        dist = vae.encode(clip[None].to(device, vae.dtype)).latent_dist
        # The distribution's mean: deterministic, and what WanPipeline's decoder inverts.
        lat = (dist.mode().float().cpu() - mean) / std
        latents.append(lat)
        emb, _ = pipe.encode_prompt(
            item.prompt, do_classifier_free_guidance=False, max_sequence_length=cfg.max_sequence_length,
            device=device, dtype=dtype,
        )
        embeds.append(emb.cpu())
    # The frozen encoders are not needed any more; free the accelerator for the transformer.
    vae.to("cpu")
    pipe.text_encoder.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return torch.cat(latents), torch.cat(embeds)


def _cache_key(cfg: RadialLoRAConfig, items: list[VideoItem], dtype: torch.dtype) -> str:
    import hashlib

    files = []
    for item in items:
        st = item.path.stat()
        files.append([item.path.name, st.st_size, st.st_mtime_ns, item.prompt])
    model = cfg.pretrained_model.resolve()
    model_files = sorted(
        [str(p.relative_to(model)), p.stat().st_size, p.stat().st_mtime_ns]
        for sub in ("vae", "text_encoder", "tokenizer")
        if (model / sub).is_dir()
        for p in (model / sub).iterdir()
        if p.is_file()
    )
    blob = json.dumps(
        {
            "files": files, "model": str(model), "model_files": model_files, "dtype": str(dtype),
            "geometry": [cfg.num_frames, cfg.height, cfg.width, cfg.frame_stride, cfg.max_sequence_length],
            "version": 1,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _cached_dataset(pipe, items: list[VideoItem], cfg: RadialLoRAConfig, device: torch.device, dtype: torch.dtype):
    """`_encode_dataset`, through the on-disk cache."""
    cache_dir = cfg.cache_dir if cfg.cache_dir is not None else cfg.output_dir / "latent_cache"
    path = cache_dir / f"{_cache_key(cfg, items, dtype)}.pt"
    if path.exists():
        data = torch.load(path, map_location="cpu", weights_only=True)
        logger.info("diffattn radial LoRA: latents and prompt embeddings from the cache %s", path)
        return data["latents"], data["embeds"]
    latents, embeds = _encode_dataset(pipe, items, cfg, device, dtype)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"latents": latents, "embeds": embeds, "files": [i.path.name for i in items]}, tmp)
    os.replace(tmp, path)
    return latents, embeds


def _flow_shift(pipe, cfg: RadialLoRAConfig) -> float:
    if cfg.timestep_shift is not None:
        return float(cfg.timestep_shift)
    sc = pipe.scheduler.config
    if "flow_shift" in sc and sc.get("use_flow_sigmas", False):
        return float(sc["flow_shift"])
    return float(sc.get("shift", 1.0))


# ---------------------------------------------------------------------------------------------------------------
# Training state
# ---------------------------------------------------------------------------------------------------------------
class _Sampler:
    """Epochs of shuffled sample indices drawn from the run's generator; its position is checkpointed."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n, self.gen = n, generator
        self.perm: list[int] = []
        self.pos = 0

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos >= len(self.perm):
                self.perm = torch.randperm(self.n, generator=self.gen).tolist()
                self.pos = 0
            out.append(self.perm[self.pos])
            self.pos += 1
        return out


def _sample_sigmas(n: int, cfg: RadialLoRAConfig, shift: float, gen: torch.Generator) -> torch.Tensor:
    if cfg.timestep_sampling == "logit_normal":
        u = torch.sigmoid(torch.randn(n, generator=gen))
    else:
        u = torch.rand(n, generator=gen)
    return shift * u / (1.0 + (shift - 1.0) * u)


def _flow_loss(transformer, latents, embeds, noise, sigmas, num_train_timesteps: int, dtype: torch.dtype) -> torch.Tensor:
    s = sigmas.view(-1, 1, 1, 1, 1)
    x_t = (1.0 - s) * latents + s * noise
    pred = transformer(
        hidden_states=x_t.to(dtype),
        timestep=sigmas * num_train_timesteps,
        encoder_hidden_states=embeds.to(dtype),
        return_dict=False,
    )[0]
    return F.mse_loss(pred.float(), (noise - latents).float())


def _checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    found = []
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit():
                found.append((int(p.name[len(CHECKPOINT_PREFIX):]), p))
    return sorted(found)


def _lora_state(transformer) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(transformer).items()}


def _save_lora(pipe_cls, directory: Path, transformer, lora_metadata: dict, info: dict) -> None:
    pipe_cls.save_lora_weights(
        directory, transformer_lora_layers=_lora_state(transformer), transformer_lora_adapter_metadata=lora_metadata,
        weight_name=LORA_WEIGHT_NAME,
    )
    (directory / LORA_CONFIG_NAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def _rng_state(gen: torch.Generator) -> dict[str, Any]:
    state = {"generator": gen.get_state(), "torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(gen: torch.Generator, state: dict[str, Any]) -> None:
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _LossLog:
    """`loss.csv`: step, training loss, learning rate, eval loss (blank where not evaluated)."""

    FIELDS = ("step", "loss", "lr", "eval_loss")

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        rows: list[list[str]] = []
        if resume_step is not None and path.exists():
            with path.open(newline="") as f:
                reader = csv.reader(f)
                next(reader, None)
                rows = [r for r in reader if r and int(r[0]) <= resume_step]  # drop rows past the checkpoint
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(self.FIELDS)
            writer.writerows(rows)

    def write(self, step: int, loss: float | None, lr: float | None, eval_loss: float | None) -> None:
        def fmt(x: float | None) -> str:
            return "" if x is None else repr(float(x))

        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([step, fmt(loss), fmt(lr), fmt(eval_loss)])


def read_loss_log(path: str | Path) -> list[dict[str, float | None]]:
    """Rows of a `loss.csv` as dicts of floats (None where blank); for analysis and tests."""
    out = []
    with Path(path).open(newline="") as f:
        for row in csv.DictReader(f):
            out.append({k: (int(v) if k == "step" else (float(v) if v != "" else None)) for k, v in row.items()})
    return out


# ---------------------------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------------------------
def train_radial_lora(config: RadialLoRAConfig) -> Path:
    """Train the LoRA described by `config`; returns `config.output_dir`, which then holds the final LoRA
    (`pytorch_lora_weights.safetensors`, loadable with `pipe.load_lora_weights(output_dir)`), `lora_config.json`,
    `loss.csv` and the `checkpoint-<step>/` folders."""
    import diffattn
    from diffattn.masks import radial_mask
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict
    from tqdm.auto import tqdm

    if not isinstance(config, RadialLoRAConfig):
        raise TypeError(f"train_radial_lora expects a RadialLoRAConfig; got {type(config).__name__}")
    cfg = config
    radial_cfg = cfg.radial_config()
    out_dir: Path = cfg.output_dir
    existing = _checkpoints(out_dir)
    if existing and not cfg.resume:
        raise ValueError(
            f"RadialLoRAConfig.output_dir {str(out_dir)!r} already holds checkpoints ({existing[-1][1].name}); pass "
            "resume=True to continue that run, or choose another output_dir"
        )
    items = find_videos(cfg.video_dir)  # data errors before the (slow) model load
    device, dtype = _resolve_device_dtype(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)

    pipe = _load_pipeline(cfg, dtype)
    _check_geometry(cfg, pipe)
    logger.info("diffattn radial LoRA: encoding %d video(s) at %dx%dx%d on %s", len(items), cfg.num_frames, cfg.height, cfg.width, device)
    latents, embeds = _cached_dataset(pipe, items, cfg, device, dtype)

    transformer = pipe.transformer
    transformer.requires_grad_(False)
    matched = _lora_target_names(transformer, cfg.target_modules)
    if not matched:
        raise ValueError(
            f"RadialLoRAConfig.target_modules {list(cfg.target_modules)} match no linear layer of the transformer; Wan's "
            "attention projections are 'to_q', 'to_k', 'to_v', 'to_out.0' (restrict with 'attn1.to_q', ...)"
        )
    lora_config = LoraConfig(
        r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, init_lora_weights=True,
        target_modules=list(cfg.target_modules),
    )
    transformer.add_adapter(lora_config)
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # LoRA weights train in float32 whatever the base dtype
    transformer.to(device)
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    diffattn.apply(transformer, "radial", **radial_cfg.to_dict())

    # What the sparse layers see: the mask over this clip geometry.
    settings = diffattn.api.installed(transformer).runtime.settings("wan")
    p_t, p_h, p_w = transformer.config.patch_size
    frames, tpf = latents.shape[2] // p_t, (latents.shape[3] // p_h) * (latents.shape[4] // p_w)
    density = float(
        radial_mask(frames, tpf, block_size=settings["block_size"], decay_factor=settings["decay_factor"], sink=settings["sink"])
        .float()
        .mean()
    )
    num_layers = len(transformer.blocks)
    if settings["dense_layers"] >= num_layers:
        logger.warning("diffattn radial LoRA: dense_layers=%d covers all %d blocks; training runs fully dense", settings["dense_layers"], num_layers)
    logger.info(
        "diffattn radial LoRA: %d LoRA layers (rank %d, alpha %g), %.2fM trainable parameters; radial mask %d frames x %d "
        "tokens, block %d, density %.3f on blocks >= %d",
        len(matched), cfg.rank, cfg.lora_alpha, sum(p.numel() for p in params) / 1e6, frames, tpf,
        settings["block_size"], density, settings["dense_layers"],
    )

    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    warmup = cfg.lr_warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    sampler = _Sampler(len(items), gen)
    shift = _flow_shift(pipe, cfg)
    num_train_timesteps = int(pipe.scheduler.config.get("num_train_timesteps", 1000))

    info = {
        "rank": cfg.rank,
        "alpha": cfg.lora_alpha,
        "target_modules": list(cfg.target_modules),
        "lora_dropout": cfg.lora_dropout,
        "radial": radial_cfg.to_dict(),  # as given (None: the Wan default); what load_radial_lora applies
        "radial_effective": {k: settings[k] for k in ("block_size", "decay_factor", "sink", "dense_layers")},
        "radial_mask": {"frames": frames, "tokens_per_frame": tpf, "density": density, "sparse_from_block": settings["dense_layers"]},
        "num_frames": cfg.num_frames, "height": cfg.height, "width": cfg.width,
        "base_model": str(cfg.pretrained_model),
        "timestep_shift": shift,
        "training": cfg.to_json(),
    }
    lora_metadata = transformer.peft_config["default"].to_dict()
    lora_metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in lora_metadata.items()}

    # ---- resume --------------------------------------------------------------------------------------------
    start_step = 0
    if cfg.resume and existing:
        _, ckpt = existing[-1]
        saved = json.loads((ckpt / LORA_CONFIG_NAME).read_text(encoding="utf-8"))
        for key in ("rank", "alpha", "target_modules"):
            if saved[key] != info[key]:
                raise ValueError(f"cannot resume from {str(ckpt)!r}: it was trained with {key}={saved[key]!r}, this run has {info[key]!r}")
        from safetensors.torch import load_file

        lora = {k.removeprefix("transformer."): v for k, v in load_file(str(ckpt / LORA_WEIGHT_NAME)).items()}
        result = set_peft_model_state_dict(transformer, lora, adapter_name="default")
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"cannot resume from {str(ckpt)!r}: unexpected LoRA keys {result.unexpected_keys[:3]}")
        state = torch.load(ckpt / STATE_NAME, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.perm, sampler.pos = list(state["sampler"]["perm"]), int(state["sampler"]["pos"])
        _set_rng_state(gen, state["rng"])
        start_step = int(state["step"])
        logger.info("diffattn radial LoRA: resumed from %s at step %d", ckpt, start_step)
    elif cfg.resume:
        logger.info("diffattn radial LoRA: resume requested but %s holds no checkpoint; starting at step 0", out_dir)
    loss_log = _LossLog(out_dir / LOSS_LOG_NAME, start_step if start_step else None)

    # ---- the fixed evaluation batch: its own generator, so it never perturbs training randomness -----------------
    n_eval = min(cfg.eval_samples, len(items))
    eval_gen = torch.Generator().manual_seed(cfg.seed + 1_000_003)
    eval_noise = torch.randn(n_eval, *latents.shape[1:], generator=eval_gen)
    eval_sigmas = _sample_sigmas(n_eval, cfg, shift, eval_gen)

    @torch.no_grad()
    def evaluate() -> float:
        total = 0.0
        for i in range(0, n_eval, cfg.batch_size):
            j = min(n_eval, i + cfg.batch_size)
            loss = _flow_loss(
                transformer, latents[i:j].to(device), embeds[i:j].to(device), eval_noise[i:j].to(device),
                eval_sigmas[i:j].to(device), num_train_timesteps, dtype,
            )
            total += loss.item() * (j - i)
        return total / n_eval

    def save_checkpoint(step: int) -> None:
        final = out_dir / f"{CHECKPOINT_PREFIX}{step}"
        tmp = out_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _save_lora(type(pipe), tmp, transformer, lora_metadata, {**info, "step": step})
        torch.save(
            {
                "step": step,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "sampler": {"perm": list(sampler.perm), "pos": sampler.pos},
                "rng": _rng_state(gen),
            },
            tmp / STATE_NAME,
        )
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # a checkpoint folder is complete or absent
        if cfg.keep_checkpoints:
            for _, old in _checkpoints(out_dir)[: -cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        logger.info("diffattn radial LoRA: saved %s", final)

    was_training = transformer.training
    if n_eval and start_step == 0:
        transformer.eval()
        eval_loss = evaluate()
        transformer.train(was_training)
        loss_log.write(0, None, None, eval_loss)
        logger.info("diffattn radial LoRA: step 0 eval loss %.5f", eval_loss)

    # ---- the loop ---------------------------------------------------------------------------------------------
    bar = tqdm(total=cfg.steps, initial=start_step, desc="radial LoRA", disable=not cfg.progress)
    try:
        for step in range(start_step + 1, cfg.steps + 1):
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for _ in range(cfg.gradient_accumulation):
                idx = sampler.take(cfg.batch_size)
                x0 = latents[idx]
                noise = torch.randn(x0.shape, generator=gen)
                sigmas = _sample_sigmas(len(idx), cfg, shift, gen)
                loss = _flow_loss(
                    transformer, x0.to(device), embeds[idx].to(device), noise.to(device), sigmas.to(device),
                    num_train_timesteps, dtype,
                )
                scaled = loss / cfg.gradient_accumulation
                scaled.backward()  # with gradient checkpointing the recompute reads the kept per-forward context
                step_loss += loss.item() / cfg.gradient_accumulation
            if not math.isfinite(step_loss):
                raise RuntimeError(f"radial LoRA: the loss is {step_loss} at step {step}; lower the learning rate or use float32/bfloat16")
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()

            eval_loss = None
            if n_eval and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                transformer.eval()
                eval_loss = evaluate()
                transformer.train(was_training)
            loss_log.write(step, step_loss, lr, eval_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", **({"eval": f"{eval_loss:.4f}"} if eval_loss is not None else {}))
            if eval_loss is not None:
                logger.info("diffattn radial LoRA: step %d loss %.5f eval loss %.5f", step, step_loss, eval_loss)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                save_checkpoint(step)
    finally:
        bar.close()

    _save_lora(type(pipe), out_dir, transformer, lora_metadata, {**info, "step": cfg.steps})
    diffattn.remove(transformer)
    logger.info("diffattn radial LoRA: saved the LoRA to %s", out_dir)
    return out_dir


def load_radial_lora(pipe, lora_dir: str | Path, *, adapter_name: str | None = None, apply_radial: bool = True, **radial_overrides: Any):
    """Load a LoRA saved by `train_radial_lora` into `pipe` and install the radial mask it was trained with.

    The training options are kept (block size, decay factor, sink, dense layers) except `dense_timesteps`, which
    goes back to the inference default (None: the family default, 12 for Wan) unless given in `radial_overrides`.
    Returns `pipe`.
    """
    import diffattn

    lora_dir = Path(lora_dir)
    cfg_path = lora_dir / LORA_CONFIG_NAME
    if not cfg_path.exists():
        raise ValueError(f"lora_dir {str(lora_dir)!r} has no {LORA_CONFIG_NAME}: not a radial LoRA folder")
    info = json.loads(cfg_path.read_text(encoding="utf-8"))
    pipe.load_lora_weights(str(lora_dir), weight_name=LORA_WEIGHT_NAME, adapter_name=adapter_name)
    if apply_radial:
        options = {k: v for k, v in info["radial"].items() if k != "dense_timesteps"}
        options.update(radial_overrides)
        diffattn.apply(pipe, "radial", **options)
    return pipe


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m diffattn.pipelines.radial_lora",
        description="Fine-tune a LoRA on a Wan text-to-video model with Radial Attention (length extension).",
    )
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else None) for f in dataclasses.fields(RadialLoRAConfig)}
    parser.add_argument("--pretrained-model", required=True, help="local Diffusers Wan pipeline folder")
    parser.add_argument("--video-dir", required=True, help="folder of videos with <stem>.txt prompts or prompts.jsonl")
    parser.add_argument("--output-dir", required=True, help="LoRA, lora_config.json, loss.csv and checkpoints go here")
    ints = ("num_frames", "height", "width", "frame_stride", "max_sequence_length", "rank", "lr_warmup_steps", "steps",
            "batch_size", "gradient_accumulation", "seed", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_samples")
    floats = ("lora_dropout", "learning_rate", "weight_decay", "max_grad_norm")
    for name in ints:
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=defaults[name], help=f"default {defaults[name]}")
    for name in floats:
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=defaults[name], help=f"default {defaults[name]}")
    parser.add_argument("--cache-dir", default=None, help="latent/prompt cache (default: OUTPUT_DIR/latent_cache)")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    parser.add_argument("--timestep-shift", type=float, default=None, help="flow shift of the sigmas (default: the scheduler's)")
    parser.add_argument("--target-modules", default=",".join(DEFAULT_TARGETS), help="comma-separated module-name suffixes")
    parser.add_argument("--timestep-sampling", default="uniform", choices=("uniform", "logit_normal"))
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--radial", action="append", default=[], metavar="KEY=VALUE",
        help="a radial option (block_size, decay_factor, dense_layers, sink); repeatable",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry: parse `argv`, train, return an exit status (0 done, 2 bad arguments or data)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    radial: dict[str, Any] = {}
    for item in args.radial:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            parser.error(f"--radial expects KEY=VALUE; got {item!r}")
        radial[key.strip()] = _parse_value(value)
    kwargs = {k: v for k, v in vars(args).items() if k not in ("radial", "no_progress")}
    kwargs["progress"] = not args.no_progress
    kwargs["radial_options"] = radial
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        out = train_radial_lora(RadialLoRAConfig(**kwargs))
    except ValueError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    sys.stderr.write(f"LoRA saved to {out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
