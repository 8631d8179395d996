"""`diffattn bench highres`: FreeSwim end to end at 1080p as a 24 GB user runs it (issue #5).

Builds a whole Wan2.1-T2V-1.3B pipeline from the released configs with random bf16 weights, in memory (no hub): the
transformer, the Wan 2.1 VAE, the UMT5-XXL text encoder (5.68 B parameters), an offline word-level tokenizer and
UniPC with a flow shift. Then runs `FreeSwimPipeline` (base pass at 480x832, upscale + VAE encode, FreeSwim refine at
the target size, final decode) with `enable_model_cpu_offload()`, VAE tiling, the cross-attention cache on the CPU and
`PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`, under a GPU memory cap (`torch.cuda.set_per_process_memory_fraction`:
an allocation beyond it raises out-of-memory as on a card of that size).

Per stage it records the wall time and the CUDA allocator's peaks (`max_memory_allocated` / `max_memory_reserved`,
reset at every stage boundary), the driver-level memory in use at the stage's end and the host's peak RSS. The stages
partition the generation's wall time; each starts at its first event and runs until the next one starts:

- text encoding (once, for both passes): from the call to the first base transformer forward (tokenizing, UMT5 on
  cond + uncond, moving the encoder to the GPU);
- base denoising: the base transformer forwards (the previous model is offloaded by the first one);
- base decode: the base pass's VAE decode and its conversion to PIL frames;
- refine setup: from the refine pipeline's construction (FreeSwim installed; the prompts were encoded once, in the
  first stage, for both passes);
- upscale + VAE encode: resizing the base frames to the target, moving them to the GPU and encoding them;
- refine denoising: the FreeSwim forwards (full+window, cached, window);
- final decode: the VAE decode at the target size, conversion to numpy and the final offload of every model.

An out-of-memory error is a result: it is recorded with its stage and message and the exit status is 1. Random weights
make the video noise; the point is memory and time, not quality. `--model tiny` builds tiny versions of the same
classes (tests, CPU).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .harness import GIB, gib, installed, versions, write_json
from .models import MODELS, UMT5_XXL, count_parameters, umt5_config
logger = logging.getLogger("diffattn")


DEFAULT_PROMPT = "a red fox running through fresh snow in a quiet forest at sunrise, cinematic, detailed fur"
DEFAULT_NEGATIVE = "blurry, low quality, static, distorted"

STAGES = (
    "text encoding", "base denoising", "base decode", "refine setup", "upscale + VAE encode",
    "refine denoising", "final decode",
)


@dataclass(frozen=True)
class ModelPreset:
    """What differs between the real and the tiny pipeline: component configs and the default geometry."""

    transformer: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]  # UMT5Config fields; vocab_size None = the tokenizer's size
    height: int
    width: int
    frames: int
    base_height: int
    base_width: int
    max_sequence_length: int
    vae_tiles: dict[str, int] = field(default_factory=dict)  # enable_tiling() arguments (tiny: tiles that do split)


def presets() -> dict[str, ModelPreset]:
    return {
        "wan2.1-1.3b": ModelPreset(
            transformer=dict(MODELS["wan2.1-1.3b"]["config"]),
            vae={},  # AutoencoderKLWan's defaults are the Wan 2.1 VAE (base_dim 96, z_dim 16, its latent mean/std)
            text_encoder=dict(UMT5_XXL),
            height=1088, width=1920, frames=81, base_height=480, base_width=832, max_sequence_length=512,
        ),
        "tiny": ModelPreset(
            transformer={
                "patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4,
                "out_channels": 4, "text_dim": 32, "freq_dim": 16, "ffn_dim": 64, "num_layers": 2,
                "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 64,
            },
            vae={
                "base_dim": 8, "z_dim": 4, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1,
                "temperal_downsample": [False, True, True], "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4,
            },
            text_encoder={
                "vocab_size": None, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
                "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 8,
                "relative_attention_max_distance": 16, "pad_token_id": 0, "eos_token_id": 1,
                "decoder_start_token_id": 0, "tie_word_embeddings": False,
            },
            height=64, width=96, frames=5, base_height=32, base_width=48, max_sequence_length=16,
            vae_tiles={"tile_sample_min_height": 32, "tile_sample_min_width": 32, "tile_sample_stride_height": 16,
                       "tile_sample_stride_width": 16},
        ),
    }


MODEL_NAMES = ("wan2.1-1.3b", "tiny")


# ------------------------------------------------------------------------------------------------------------------
# random weights, fast
# ------------------------------------------------------------------------------------------------------------------
class RandomFiller:
    """Fills parameters from one pool of standard-normal values (read cyclically from a random offset, scaled per
    parameter): a memory-bound copy instead of a random-number generator per element, so 5.7 B parameters take
    seconds, not minutes. Norm weights are 1 and biases 0 (as trained models start); other weights get
    std 1/sqrt(fan_in) (embeddings 1), which keeps activations finite through 24-40 random layers."""

    def __init__(self, seed: int = 0, pool_size: int = 1 << 24, dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu") -> None:
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        self.generator = torch.Generator().manual_seed(seed)
        self.device = torch.device(device)
        # the pool is drawn on the CPU (same values on every device), then filled from on `device`
        self.pool = torch.randn(pool_size, generator=self.generator).to(dtype).to(self.device)
        self.dtype = dtype

    def fill(self, tensor: torch.Tensor, std: float) -> None:
        flat = tensor.view(-1)
        n, size = flat.numel(), self.pool.numel()
        offset = int(torch.randint(size, (1,), generator=self.generator))
        i = 0
        while i < n:
            m = min(n - i, size - offset)
            torch.mul(self.pool[offset:offset + m], std, out=flat[i:i + m])
            i += m
            offset = 0

    @staticmethod
    def rule(module: torch.nn.Module, name: str, shape: torch.Size) -> tuple[str, float]:
        """('ones' | 'zeros' | 'normal', std) for parameter `name` of `module`."""
        is_norm = "norm" in type(module).__name__.lower()
        if is_norm and name in ("weight", "gamma", "scale"):
            return "ones", 0.0
        if name in ("bias", "beta"):
            return "zeros", 0.0
        if isinstance(module, torch.nn.Embedding) or len(shape) < 2:
            return "normal", 1.0 if isinstance(module, torch.nn.Embedding) else 0.02
        return "normal", 1.0 / math.sqrt(max(1, math.prod(shape[1:])))

    def materialize(self, model: torch.nn.Module) -> torch.nn.Module:
        """Replace every meta parameter by a filled tensor of `self.dtype` on `self.device`; tied parameters stay
        tied. Buffers (built for real, e.g. RoPE tables in float32) are left as they are."""
        new: dict[int, torch.nn.Parameter] = {}
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is None:
                    continue
                if id(param) not in new:
                    if param.device.type != "meta":
                        raise ValueError(f"materialize: {type(module).__name__}.{name} is not on the meta device")
                    data = torch.empty(param.shape, dtype=self.dtype, device=self.device)
                    kind, std = self.rule(module, name, param.shape)
                    if kind == "ones":
                        data.fill_(1.0)
                    elif kind == "zeros":
                        data.zero_()
                    else:
                        self.fill(data, std)
                    new[id(param)] = torch.nn.Parameter(data, requires_grad=False)
                module._parameters[name] = new[id(param)]
        for name, buffer in model.named_buffers():
            if buffer.device.type == "meta":
                raise ValueError(f"materialize: buffer {name} is on the meta device; build with real buffers")
        return model.eval().requires_grad_(False)


@contextmanager
def _meta_parameters(real_buffers: bool = True) -> Iterator[None]:
    """Parameters on the meta device (no memory, no default init work); buffers built for real (RoPE tables), or
    everything on meta when `real_buffers` is False. Transformers models need the latter: accelerate's
    `init_empty_weights` re-creates a parameter on every assignment, which unties UMT5's shared embedding (1 B
    parameters twice)."""
    if not real_buffers:
        with torch.device("meta"):
            yield
        return
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        yield


@dataclass
class BuiltPipeline:
    pipe: Any
    build_s: dict[str, float]
    parameters: dict[str, int]
    weights_bytes: dict[str, int]


def build_pipeline(model: str, *, seed: int = 0, flow_shift: float = 3.0, vae_dtype: torch.dtype = torch.bfloat16,
                   text_layers: int | None = None, preset: ModelPreset | None = None,
                   device: str | torch.device = "cpu") -> BuiltPipeline:
    """The FreeSwim pipeline for preset `model` (or the given `preset`) with random weights (transformer and text
    encoder bf16), filled on `device` (default the CPU; a GPU fills billions of parameters in a second; buffers stay
    on the CPU until the pipeline is moved). `text_layers` overrides the text encoder's depth (to time its init on a
    small machine)."""
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanTransformer3DModel,
    )
    from transformers import UMT5EncoderModel

    from ..pipelines import FreeSwimPipeline
    from ..pipelines.demo import word_tokenizer

    known = presets()
    if preset is None:
        if model not in known:
            raise ValueError(f"model must be one of {', '.join(MODEL_NAMES)}, got {model!r}")
        preset = known[model]
    filler = RandomFiller(seed, device=device)
    times: dict[str, float] = {}

    def timed(name: str, make: Callable[[], torch.nn.Module], real_buffers: bool = True) -> torch.nn.Module:
        t0 = time.perf_counter()
        with _meta_parameters(real_buffers):
            module = make()
        filler.materialize(module)
        times[name] = time.perf_counter() - t0
        logger.info("diffattn highres: built %s (%.2f B parameters) in %.1f s", name, count_parameters(module) / 1e9,
                    times[name])
        return module

    tokenizer = word_tokenizer(preset.max_sequence_length)
    te_fields = dict(preset.text_encoder)
    if te_fields.get("vocab_size") is None:
        te_fields["vocab_size"] = len(tokenizer)
    if text_layers is not None:
        te_fields["num_layers"] = text_layers
    text_encoder = timed("text_encoder", lambda: UMT5EncoderModel(umt5_config(te_fields)), real_buffers=False)
    transformer = timed("transformer", lambda: WanTransformer3DModel(**preset.transformer))
    vae = timed("vae", lambda: AutoencoderKLWan(**preset.vae))
    if vae_dtype != torch.bfloat16:
        vae.to(vae_dtype)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=flow_shift,
    )
    pipe = FreeSwimPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                            scheduler=scheduler)
    parts = {"text_encoder": text_encoder, "transformer": transformer, "vae": vae}
    return BuiltPipeline(
        pipe=pipe, build_s=times,
        parameters={k: count_parameters(m) for k, m in parts.items()},
        weights_bytes={k: sum(p.numel() * p.element_size() for p in m.parameters()) for k, m in parts.items()},
    )


# ------------------------------------------------------------------------------------------------------------------
# per-stage clock
# ------------------------------------------------------------------------------------------------------------------
def _host_peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@dataclass
class Stage:
    name: str
    seconds: float = 0.0
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    allocated_end_bytes: int | None = None
    reserved_end_bytes: int | None = None
    driver_used_end_bytes: int | None = None  # total - free from the driver: every process, CUDA context included
    host_peak_rss_bytes: int = 0
    calls: dict[str, list[float]] = field(default_factory=dict)  # component call -> seconds per call (offload included)


class StageClock:
    """Contiguous stages: `enter(name)` ends the current stage (synchronising the GPU, reading and resetting the
    allocator's peaks) and starts `name`; re-entering the current stage does nothing."""

    def __init__(self, cuda: bool, on_close: Callable[[], None] | None = None) -> None:
        self.cuda = cuda
        self.stages: list[Stage] = []
        self.current: Stage | None = None
        self.on_close = on_close  # e.g. rewrite the report: a run killed at its time limit keeps the stages so far
        self._start = 0.0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def enter(self, name: str) -> None:
        if self.current is not None and self.current.name == name:
            return
        self.close()
        self.current = Stage(name)
        self.stages.append(self.current)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self._start = time.perf_counter()
        logger.info("diffattn highres: %s ...", name)

    def close(self) -> None:
        stage = self.current
        if stage is None:
            return
        stage.seconds = self.now() - self._start
        if self.cuda:
            stage.peak_allocated_bytes = torch.cuda.max_memory_allocated()
            stage.peak_reserved_bytes = torch.cuda.max_memory_reserved()
            stage.allocated_end_bytes = torch.cuda.memory_allocated()
            stage.reserved_end_bytes = torch.cuda.memory_reserved()
            free, total = torch.cuda.mem_get_info()
            stage.driver_used_end_bytes = total - free
        stage.host_peak_rss_bytes = _host_peak_rss()
        self.current = None
        logger.info("diffattn highres: %s: %.1f s, peak %s GiB allocated (%s reserved), host RSS peak %s GiB",
                    stage.name, stage.seconds, gib(stage.peak_allocated_bytes), gib(stage.peak_reserved_bytes),
                    gib(stage.host_peak_rss_bytes))
        if self.on_close is not None:
            self.on_close()

    def record_call(self, what: str, seconds: float) -> None:
        if self.current is not None:
            self.current.calls.setdefault(what, []).append(seconds)


@dataclass
class Forward:
    """One transformer forward: its stage, timestep, FreeSwim mode ("dual": full branch + window in one batch,
    "cached", "window"; "dense" when no method is installed, as in the base pass) and time."""

    stage: str
    timestep: float
    mode: str
    seconds: float
    start: float
    end: float


class PipelineProbe:
    """Hooks on the pipeline's own seams, nothing edited: FreeSwimPipeline's sub-pipeline factory (`_stage`, which
    tells the base pass from the refine pass and gives the refine pass's video processor), torch forward hooks on the
    text encoder and the transformer (they run before accelerate's offload hook moves the weights in), and instance
    wrappers of `vae.encode` / `vae.decode` (outside Diffusers' offload hook). Removed by `detach()`."""

    def __init__(self, pipe: Any, clock: StageClock) -> None:
        self.pipe = pipe
        self.clock = clock
        self.pass_name = "base"
        self.forwards: list[Forward] = []
        self.step_ends: list[float] = []  # refine: callback_on_step_end times
        self._handles: list[Any] = []
        self._t0: dict[str, float] = {}
        self._timestep = 0.0
        self._install()

    # ---- install / remove -------------------------------------------------------------------------------------
    def _install(self) -> None:
        from diffusers import WanVideoToVideoPipeline

        pipe, clock = self.pipe, self.clock
        original_stage = pipe._stage

        def stage(cls):
            sub = original_stage(cls)
            self.pass_name = "refine" if issubclass(cls, WanVideoToVideoPipeline) else "base"
            clock.enter("text encoding" if self.pass_name == "base" else "refine setup")
            if self.pass_name == "refine":
                preprocess = sub.video_processor.preprocess_video

                def preprocess_video(*args, **kwargs):
                    clock.enter("upscale + VAE encode")
                    return preprocess(*args, **kwargs)

                sub.video_processor.preprocess_video = preprocess_video
            return sub

        pipe._stage = stage
        te, tr = pipe.text_encoder, pipe.transformer
        self._handles += [
            te.register_forward_pre_hook(lambda m, a: self._begin("text_encoder")),
            te.register_forward_hook(self._text_encoder_post),
            tr.register_forward_pre_hook(self._transformer_pre, with_kwargs=True),
            tr.register_forward_hook(self._transformer_post),
        ]
        vae = pipe.vae
        for what in ("encode", "decode"):
            setattr(vae, what, self._wrap_vae(what, getattr(vae, what)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for name in ("_stage",):
            self.pipe.__dict__.pop(name, None)
        for what in ("encode", "decode"):
            self.pipe.vae.__dict__.pop(what, None)

    # ---- hooks ------------------------------------------------------------------------------------------------
    def _begin(self, what: str) -> None:
        self._t0[what] = self.clock.now()

    def _end(self, what: str) -> float:
        seconds = self.clock.now() - self._t0.pop(what)
        self.clock.record_call(what, seconds)
        return seconds

    def _text_encoder_post(self, module, args, output) -> None:  # returns None: the output is left as it is
        self._end("text_encoder")

    def _transformer_pre(self, module, args, kwargs) -> None:
        self.clock.enter(f"{self.pass_name} denoising")
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        self._timestep = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t or 0.0)
        self._begin("transformer")

    def _transformer_post(self, module, args, output) -> None:  # returns None: the output is left as it is
        start = self._t0["transformer"]
        seconds = self._end("transformer")
        import diffattn

        state = diffattn.api.installed(module)
        ctx = getattr(getattr(state, "slot", None), "current", None) if state is not None else None
        mode = str(ctx.extras.get("freeswim_mode", "?")) if ctx is not None else "dense"
        self.forwards.append(Forward(f"{self.pass_name} denoising", self._timestep, mode, seconds, start,
                                     start + seconds))

    def _wrap_vae(self, what: str, fn: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            if what == "decode":
                self.clock.enter("base decode" if self.pass_name == "base" else "final decode")
            else:
                self.clock.enter("upscale + VAE encode")
            self._begin(f"vae.{what}")
            out = fn(*args, **kwargs)
            self._end(f"vae.{what}")
            return out

        return wrapped

    def on_step_end(self, pipe, i: int, t, kwargs: dict[str, Any]) -> dict[str, Any]:
        self.step_ends.append(self.clock.now())
        logger.info("diffattn highres: refine step %d done", i + 1)
        return kwargs

    # ---- per-step summary -------------------------------------------------------------------------------------
    def steps(self, stage: str) -> list[dict[str, Any]]:
        """Forwards grouped by timestep (a step = cond + uncond), in order."""
        out: list[dict[str, Any]] = []
        for f in (f for f in self.forwards if f.stage == stage):
            if not out or out[-1]["timestep"] != f.timestep:
                out.append({"timestep": f.timestep, "modes": [], "forward_s": [], "start": f.start, "end": f.end})
            out[-1]["modes"].append(f.mode)
            out[-1]["forward_s"].append(f.seconds)
            out[-1]["end"] = f.end
        # refine: the callback closes each step (after the scheduler's update), so its times give the step's wall
        # time; a step starts where the previous one ended (the first at its first forward)
        ends = self.step_ends if stage == "refine denoising" and len(self.step_ends) == len(out) else None
        for i, s in enumerate(out):
            s["step"] = i
            if ends is not None:
                s["wall_s"] = ends[i] - (ends[i - 1] if i else s["start"])
            s["seconds"] = s.pop("end") - s.pop("start")
        return out


# ------------------------------------------------------------------------------------------------------------------
# settings, cap, run
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class HighresSettings:
    model: str = "wan2.1-1.3b"
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    base_height: int | None = None
    base_width: int | None = None
    steps: int = 4
    base_steps: int = 2
    strength: float = 0.5
    cache_steps: int = 2
    cache_device: str = "cpu"
    guidance: float = 5.0
    flow_shift: float = 3.0
    max_sequence_length: int | None = None
    cap_gib: float = 24.0
    expandable_segments: bool = True
    offload: bool = True
    vae_tiling: bool = True
    vae_dtype: str = "bf16"
    seed: int = 0
    prompt: str = DEFAULT_PROMPT
    negative_prompt: str = DEFAULT_NEGATIVE
    device: str = "cuda"

    def __post_init__(self) -> None:
        if self.model not in MODEL_NAMES:
            raise ValueError(f"--model must be one of {', '.join(MODEL_NAMES)}, got {self.model!r}")
        preset = presets()[self.model]
        for name in ("height", "width", "frames", "base_height", "base_width", "max_sequence_length"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(preset, name))
        for name in ("height", "width", "frames", "base_height", "base_width", "steps", "base_steps", "cache_steps",
                     "max_sequence_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an int >= 1, got {getattr(self, name)}")
        if (self.frames - 1) % 4:
            raise ValueError(f"--frames must be 4k+1 (Wan's VAE compresses time by 4), got {self.frames}")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"--strength must be in (0, 1], got {self.strength}")
        if self.refine_steps < 1:
            raise ValueError(f"--steps x --strength must give >= 1 refine step, got int({self.steps} x "
                             f"{self.strength}) = 0")
        if self.cap_gib < 0:
            raise ValueError(f"--cap-gib must be >= 0 (0: no cap), got {self.cap_gib}")
        if self.cache_device not in ("same", "cpu"):
            raise ValueError(f"--cache-device must be same or cpu, got {self.cache_device!r}")
        if self.vae_dtype not in ("bf16", "fp32"):
            raise ValueError(f"--vae-dtype must be bf16 or fp32, got {self.vae_dtype!r}")

    @property
    def refine_steps(self) -> int:
        """Steps the refine pass runs (WanVideoToVideoPipeline: int(steps x strength))."""
        return min(int(self.steps * self.strength), self.steps)


def set_memory_cap(cap_gib: float, device: int = 0) -> dict[str, Any]:
    """Cap this process's CUDA allocator at `cap_gib` GiB and check that the cap bites (one allocation just above it
    must fail). The CUDA context (a few hundred MiB on a real card, outside the allocator) is not in the cap."""
    total = torch.cuda.get_device_properties(device).total_memory
    cap = int(cap_gib * GIB)
    info: dict[str, Any] = {"cap_bytes": cap, "device_total_bytes": total, "fraction": min(1.0, cap / total)}
    if cap >= total:
        info["applied"] = False
        return info
    torch.cuda.set_per_process_memory_fraction(cap / total, device)
    info["applied"] = True
    try:
        probe = torch.empty(cap + 256 * 2**20, dtype=torch.uint8, device=f"cuda:{device}")
    except torch.cuda.OutOfMemoryError:
        info["enforced"] = True
    else:
        del probe
        info["enforced"] = False
        logger.warning("diffattn highres: an allocation above the %.1f GiB cap succeeded; the cap is not enforced",
                       cap_gib)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return info


def _is_oom_message(message: str) -> bool:
    """Out-of-memory raised outside the caching allocator (cuBLAS/cuDNN workspaces, Triton launches)."""
    lowered = message.lower()
    return "out of memory" in lowered or "alloc_failed" in lowered


def expandable_segments_in_use() -> bool | None:
    """Whether the CUDA allocator really runs with expandable segments (from its segment snapshot)."""
    probe = torch.empty(2**20, dtype=torch.uint8, device="cuda")
    try:
        segments = torch.cuda.memory_snapshot()
        flags = [seg.get("is_expandable") for seg in segments if "is_expandable" in seg]
        return any(flags) if flags else None
    finally:
        del probe


def _summarize(report: dict[str, Any], clock: StageClock, probe: PipelineProbe) -> None:
    report["stages"] = [asdict(s) for s in clock.stages]
    report["base_steps"] = probe.steps("base denoising")
    report["refine_steps_detail"] = probe.steps("refine denoising")
    gpu = [s for s in clock.stages if s.peak_allocated_bytes is not None]
    if not gpu:
        return
    top = max(gpu, key=lambda s: s.peak_allocated_bytes or 0)
    report["peak_allocated_bytes"] = top.peak_allocated_bytes
    report["peak_stage"] = top.name
    report["peak_reserved_bytes"] = max(s.peak_reserved_bytes or 0 for s in gpu)
    report["driver_used_max_bytes"] = max(s.driver_used_end_bytes or 0 for s in gpu)
    # what the process holds on the GPU outside the caching allocator (CUDA context, kernels' modules): the part
    # of a real card that the cap does not model
    report["outside_allocator_bytes"] = max((s.driver_used_end_bytes or 0) - (s.reserved_end_bytes or 0) for s in gpu)
    cap = report.get("cap")
    if cap and cap.get("applied"):
        report["within_cap"] = report["peak_reserved_bytes"] <= cap["cap_bytes"] and report["oom"] is None


def video_writer(path: str) -> str:
    """The writer `generate.write_result` will use for `--video` (imageio, else OpenCV for .mp4). ValueError when
    none can or the suffix is not a video one."""
    from ..generate import VIDEO_SUFFIXES, video_writer as writer_for

    if Path(path).suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"--video must end in {', '.join(VIDEO_SUFFIXES)}, got {path!r}")
    return writer_for(path)


def write_video(result: Any, path: str, fps: int = 16) -> dict[str, Any]:
    """Write the pipeline's video (the CLI's writer); returns frames, size and the writer used."""
    from ..generate import write_result

    writer = video_writer(path)
    return {**write_result(result, path, fps=fps), "writer": writer}


def read_back(path: str, writer: str) -> dict[str, Any]:
    """Frames and frame size as a reader sees the written file (the job's real output, not what was meant)."""
    frames, size = 0, None
    if writer == "imageio":
        import imageio.v3 as iio

        for frame in iio.imiter(path):
            frames += 1
            size = list(frame.shape[:2])
        return {"frames": frames, "size": size}
    import cv2

    cap = cv2.VideoCapture(path)
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            frames += 1
            size = list(frame.shape[:2])
    finally:
        cap.release()
    return {"frames": frames, "size": size}


def preflight(video: str | None) -> None:
    """Fail before minutes of model building: what the run needs that a bare GPU image may lack."""
    if not installed("ftfy"):
        raise ValueError("ftfy is not installed: WanVideoToVideoPipeline (FreeSwim's refine pass) cleans prompts with "
                         "it unconditionally (pip install ftfy)")
    if not installed("accelerate"):
        raise ValueError("accelerate is not installed: enable_model_cpu_offload needs it (pip install accelerate)")
    if video is not None:
        video_writer(video)


def run(settings: HighresSettings, *, video: str | None = None, fps: int = 16,
        dump: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Build, run and measure; returns the report (the caller writes it). `dump` is called with the report as it
    grows (a crash or a kill still leaves what was measured)."""
    dump = dump or (lambda report: None)
    cuda = settings.device.startswith("cuda")
    report: dict[str, Any] = {
        "settings": asdict(settings), "refine_steps": settings.refine_steps, "versions": versions(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "device": torch.cuda.get_device_name() if cuda else settings.device, "oom": None, "notes": [],
    }
    if cuda:
        report["expandable_segments_in_use"] = expandable_segments_in_use()
    if cuda and settings.cap_gib:
        report["cap"] = set_memory_cap(settings.cap_gib)
    else:
        report["cap"] = None
        if settings.cap_gib and not cuda:
            report["notes"].append(f"--cap-gib {settings.cap_gib:g} ignored: no CUDA device ({settings.device})")
    if settings.refine_steps < 2:
        report["notes"].append(f"only {settings.refine_steps} refine step: no cached FreeSwim step runs")
    for note in report["notes"]:
        logger.warning("diffattn highres: %s", note)

    t_build = time.perf_counter()
    built = build_pipeline(settings.model, seed=settings.seed, flow_shift=settings.flow_shift,
                           vae_dtype=torch.float32 if settings.vae_dtype == "fp32" else torch.bfloat16)
    pipe = built.pipe
    report["build"] = {"seconds": time.perf_counter() - t_build, "per_model_s": built.build_s,
                       "parameters": built.parameters, "weights_bytes": built.weights_bytes}
    if settings.offload:
        # on a machine without CUDA the hooks still run (execution device cpu): the tests exercise them
        pipe.enable_model_cpu_offload(device=settings.device)
    else:
        pipe.to(settings.device)
    if settings.vae_tiling:
        pipe.vae.enable_tiling(**presets()[settings.model].vae_tiles)
    dump(report)

    clock = StageClock(cuda)
    clock.on_close = lambda: dump({**report, "stages": [asdict(st) for st in clock.stages]})
    probe = PipelineProbe(pipe, clock)
    result = None
    t0 = time.perf_counter()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        clock.enter("text encoding")
        result = pipe(
            settings.prompt, negative_prompt=settings.negative_prompt, height=settings.height, width=settings.width,
            num_frames=settings.frames, base_height=settings.base_height, base_width=settings.base_width,
            num_inference_steps=settings.steps, base_num_inference_steps=settings.base_steps,
            guidance_scale=settings.guidance, strength=settings.strength, cache_steps=settings.cache_steps,
            cache_device=settings.cache_device, max_sequence_length=settings.max_sequence_length,
            generator=torch.Generator(device="cpu").manual_seed(settings.seed), output_type="np",
            callback_on_step_end=probe.on_step_end,
        )
    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
        message = " ".join(str(exc).split())
        if not isinstance(exc, torch.cuda.OutOfMemoryError) and not _is_oom_message(message):
            report["error"] = f"{type(exc).__name__}: {message[:2000]}"
            raise
        stage = clock.current.name if clock.current else "?"
        report["oom"] = {"stage": stage, "kind": type(exc).__name__, "message": message[:2000]}
        logger.error("diffattn highres: CUDA out of memory in %s: %s", stage, message[:300])
    except BaseException as exc:
        report["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:2000]}"
        raise
    finally:
        clock.close()
        probe.detach()
        report["generation_s"] = time.perf_counter() - t0
        _summarize(report, clock, probe)
        dump(report)

    if result is not None:
        import numpy as np

        frames = np.asarray(result.frames[0])
        report["output"] = {"shape": list(frames.shape), "finite": bool(np.isfinite(frames).all())}
        if video:
            try:
                start = time.perf_counter()
                written = write_video(result, video, fps=fps)
                report["video"] = {"path": video, **written, "seconds": time.perf_counter() - start,
                                   "bytes": Path(video).stat().st_size, "read_back": read_back(video, written["writer"])}
                logger.info("diffattn highres: wrote %s (%d frames, %s, %s)", video, written["frames"],
                            "x".join(map(str, written["size"])), written["writer"])
            except Exception as exc:  # noqa: BLE001 - the measurement is saved; a writer problem must not hide it
                report["video_error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
                logger.error("diffattn highres: writing %s failed: %s", video, report["video_error"])
    report["host_peak_rss_bytes"] = _host_peak_rss()
    report["total_s"] = time.perf_counter() - t_build
    dump(report)
    return report


# ------------------------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------------------------
def render(report: dict[str, Any]) -> str:
    s = report["settings"]
    cap = report.get("cap")
    cap_text = (f"cap {s['cap_gib']:g} GiB ({'enforced' if cap.get('enforced') else 'NOT enforced'})"
                if cap and cap.get("applied") else "no cap")
    v = report["versions"]
    lines = [
        (f"FreeSwim end to end: {s['model']} (random weights), {s['height']}x{s['width']}x{s['frames']} from "
         f"{s['base_height']}x{s['base_width']}; base {s['base_steps']} steps, refine {report['refine_steps']} of "
         f"{s['steps']} steps; cache_steps {s['cache_steps']}, cache on {s['cache_device']}; offload "
         f"{s['offload']}, VAE tiling {s['vae_tiling']} ({s['vae_dtype']}); {cap_text}; PYTORCH_CUDA_ALLOC_CONF="
         f"{report.get('alloc_conf')}"),
        (f"{report['device']}, torch {v.get('torch')}, diffusers {v.get('diffusers')}, transformers "
         f"{v.get('transformers')}, {report['date']}"),
        "",
        "| stage | s | peak allocated GiB | peak reserved GiB | driver used at end GiB | host RSS peak GiB |",
        "|---|---|---|---|---|---|",
    ]
    for st in report.get("stages", []):
        lines.append(f"| {st['name']} | {st['seconds']:.1f} | {gib(st['peak_allocated_bytes'])} | "
                     f"{gib(st['peak_reserved_bytes'])} | {gib(st['driver_used_end_bytes'])} | "
                     f"{gib(st['host_peak_rss_bytes'])} |")
    steps = [(title, st) for key, title in (("base_steps", "base"), ("refine_steps_detail", "refine"))
             for st in report.get(key, [])]
    if steps:
        lines += ["", "| pass | step | forwards s | step wall s | forwards (FreeSwim mode, s; cond then uncond) |",
                  "|---|---|---|---|---|"]
        for title, st in steps:
            forwards = ", ".join(f"{m} {t:.2f}" for m, t in zip(st["modes"], st["forward_s"]))
            wall = f"{st['wall_s']:.2f}" if "wall_s" in st else "—"
            lines.append(f"| {title} | {st['step']} | {st['seconds']:.2f} | {wall} | {forwards} |")
    lines.append("")
    b = report.get("build", {})
    lines.append(f"build (CPU, random weights): {b.get('seconds', 0):.1f} s "
                 f"({', '.join(f'{k} {t:.1f} s' for k, t in b.get('per_model_s', {}).items())}); generation "
                 f"{report.get('generation_s', 0):.1f} s; host RSS peak {gib(report.get('host_peak_rss_bytes'))} GiB")
    if "peak_allocated_bytes" in report:
        lines.append(f"peak: {gib(report['peak_allocated_bytes'])} GiB allocated ({report['peak_stage']}), "
                     f"{gib(report['peak_reserved_bytes'])} GiB reserved; within cap: {report.get('within_cap', '—')}")
    if report.get("outside_allocator_bytes") is not None:
        lines.append(f"GPU memory outside the allocator (CUDA context etc., not under the cap): "
                     f"{gib(report['outside_allocator_bytes'])} GiB; expandable segments in use: "
                     f"{report.get('expandable_segments_in_use')}")
    if report.get("error"):
        lines.append(f"ERROR: {report['error'][:400]}")
    if report.get("oom"):
        lines.append(f"OUT OF MEMORY in {report['oom']['stage']}: {report['oom']['message'][:400]}")
    if report.get("video"):
        vid = report["video"]
        back = vid.get("read_back") or {}
        lines.append(f"video ({vid['writer']}): {vid['path']}, {vid['frames']} frames of {vid['size'][0]}x{vid['size'][1]} written, "
                     f"{back.get('frames')} frames of {'x'.join(map(str, back.get('size') or []))} read back, "
                     f"{vid.get('bytes', 0) / 2**20:.1f} MiB")
    if report.get("video_error"):
        lines.append(f"video NOT written: {report['video_error']}")
    if report.get("output"):
        lines.append(f"output frames finite: {report['output']['finite']}")
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffattn bench highres", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODEL_NAMES, default="wan2.1-1.3b",
                        help="wan2.1-1.3b: the real configs; tiny: the same classes, tiny (tests)")
    for name, what in (("height", "target height"), ("width", "target width"), ("frames", "frames (4k+1)"),
                       ("base-height", "base pass height"), ("base-width", "base pass width")):
        parser.add_argument(f"--{name}", type=int, default=None, help=f"{what} (default: the model's; 1.3B: "
                            "1088x1920x81 from 480x832)")
    parser.add_argument("--steps", type=int, default=4, help="refine schedule length (default 4)")
    parser.add_argument("--strength", type=float, default=0.5,
                        help="share of the refine schedule that runs (default 0.5: 2 of 4 steps, a full-branch step "
                        "that fills the cache and a cached one)")
    parser.add_argument("--base-steps", type=int, default=2, help="base pass steps (default 2)")
    parser.add_argument("--cache-steps", type=int, default=2)
    parser.add_argument("--cache-device", choices=("same", "cpu"), default="cpu")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--flow-shift", type=float, default=3.0, help="UniPC flow shift (Wan 480p: 3.0)")
    parser.add_argument("--max-sequence-length", type=int, default=None, help="text tokens (default: 512; tiny 16)")
    parser.add_argument("--cap-gib", type=float, default=24.0,
                        help="GPU memory cap in GiB via set_per_process_memory_fraction (0: none; ignored off CUDA)")
    parser.add_argument("--expandable-segments", action=argparse.BooleanOptionalAction, default=True,
                        help="set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True before CUDA starts (default on)")
    parser.add_argument("--offload", action=argparse.BooleanOptionalAction, default=True,
                        help="pipe.enable_model_cpu_offload() (default on)")
    parser.add_argument("--vae-tiling", action=argparse.BooleanOptionalAction, default=True,
                        help="pipe.vae.enable_tiling() (default on)")
    parser.add_argument("--vae-dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--negative-prompt", default=DEFAULT_NEGATIVE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--out", default=None, help="JSON report (rewritten as the run goes)")
    parser.add_argument("--video", default=None, help="write the generated video here (.mp4, .gif, .webm)")
    parser.add_argument("--fps", type=int, default=16)
    return parser


def _set_alloc_conf(expandable: bool) -> None:
    """Must run before CUDA's allocator starts (it reads the variable once)."""
    if not expandable:
        return
    current = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    if "expandable_segments" in current:
        return
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ",".join(x for x in (current, "expandable_segments:True") if x)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _set_alloc_conf(args.expandable_segments)  # first: before anything can start CUDA's allocator
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        settings = HighresSettings(
            model=args.model, height=args.height, width=args.width, frames=args.frames, base_height=args.base_height,
            base_width=args.base_width, steps=args.steps, base_steps=args.base_steps, strength=args.strength,
            cache_steps=args.cache_steps, cache_device=args.cache_device, guidance=args.guidance,
            flow_shift=args.flow_shift, max_sequence_length=args.max_sequence_length, cap_gib=args.cap_gib,
            expandable_segments=args.expandable_segments, offload=args.offload, vae_tiling=args.vae_tiling,
            vae_dtype=args.vae_dtype, seed=args.seed, prompt=args.prompt, negative_prompt=args.negative_prompt,
            device=device,
        )
        preflight(args.video)
    except ValueError as exc:
        print(f"diffattn bench highres: {exc}", file=sys.stderr)
        return 2

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")  # no-op under the CLI
    logger.setLevel(logging.INFO)  # stage lines go through the CLI's handler

    def dump(report: dict[str, Any]) -> None:
        write_json(report, args.out)

    report = run(settings, video=args.video, fps=args.fps, dump=dump)
    dump(report)
    print(render(report))
    return 1 if report["oom"] else 0


if __name__ == "__main__":
    sys.exit(main())
