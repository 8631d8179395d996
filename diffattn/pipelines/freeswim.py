"""`FreeSwimPipeline`: training-free high-resolution Wan video (FreeSwim, arXiv 2511.14712), coarse to fine.

1. Generate at the model's native size with the stock `WanPipeline` (or take `base_video`).
2. Upscale every frame to the target size, encode with the VAE and re-noise it at `strength` (video-to-video).
3. Denoise at the target size with the `freeswim` method installed (inward window self-attention, full-branch
   cross-attention override, cross-attention cache); it is removed afterwards.

Works with Wan 2.1 T2V 1.3B (base 480x832) and 14B (base 480x832 or 720x1280; upstream recommends 14B above 1080p).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from diffusers import DiffusionPipeline, WanPipeline, WanVideoToVideoPipeline
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput

import diffattn

logger = logging.getLogger("diffattn")


class FreeSwimPipeline(DiffusionPipeline):
    """Wan text-to-video at high resolution with FreeSwim. Loads any Wan T2V folder or hub id with
    `FreeSwimPipeline.from_pretrained(...)` (the same components as `WanPipeline`)."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(self, tokenizer, text_encoder, transformer, vae, scheduler) -> None:
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=scheduler
        )
        self.vae_scale_factor_spatial = self.vae.config.scale_factor_spatial if getattr(self, "vae", None) else 8

    def _stage(self, cls):
        pipe = cls(
            tokenizer=self.tokenizer, text_encoder=self.text_encoder, transformer=self.transformer, vae=self.vae,
            scheduler=self.scheduler,
        )
        pipe.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return pipe

    def _encode_prompts(self, pipe: WanPipeline, prompt, negative_prompt, guidance_scale: float,
                        max_sequence_length: int) -> dict[str, torch.Tensor | None]:
        """Prompt embeddings for both passes (the stock pipelines' own `encode_prompt`, so the same tokens)."""
        prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(
            prompt=prompt, negative_prompt=negative_prompt, do_classifier_free_guidance=guidance_scale > 1.0,
            max_sequence_length=max_sequence_length, device=self._execution_device,
        )
        return {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds}

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int = 1088,
        width: int = 1920,
        num_frames: int = 81,
        base_height: int = 480,
        base_width: int = 832,
        num_inference_steps: int = 50,
        base_num_inference_steps: int | None = None,
        guidance_scale: float = 5.0,
        strength: float = 0.7,
        cache_steps: int = 2,
        cache_device: str = "same",
        scale_mode: str = "keys",
        refine_flow_shift: float | None = None,
        base_video: Any = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int = 512,
    ) -> WanPipelineOutput | tuple:
        """Generate `num_frames` frames at `height` x `width`.

        `base_*` set the native-size pass (skipped when `base_video` is given: frames as PIL images, an array or a
        tensor); `strength` is how much of the refine schedule runs (0.7: 35 of 50 steps); `cache_steps`,
        `cache_device` and `scale_mode` are the `freeswim` method's options; `refine_flow_shift` (upstream: 9.0)
        replaces the scheduler's flow shift for the refine pass. Callbacks apply to the refine pass.
        """
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        factor = self.vae_scale_factor_spatial * 2
        for name, value in (("height", height), ("width", width), ("base_height", base_height), ("base_width", base_width)):
            if value % factor:
                raise ValueError(f"{name} must be a multiple of {factor} (VAE x patch), got {value}")
        # the prompts are encoded once for both passes: the text encoder (10.6 GiB for UMT5-XXL) then runs, and under
        # model offload moves to the GPU, once, and is offloaded by the base pass before the refine pass's VAE encode
        base_pipe = self._stage(WanPipeline) if base_video is None else None
        embeds = self._encode_prompts(base_pipe or self._stage(WanPipeline), prompt, negative_prompt, guidance_scale,
                                      max_sequence_length)
        if base_pipe is not None:
            logger.info("diffattn FreeSwim: base pass at %dx%d", base_height, base_width)
            base = base_pipe(
                **embeds, height=base_height, width=base_width,
                num_frames=num_frames, num_inference_steps=base_num_inference_steps or num_inference_steps,
                guidance_scale=guidance_scale, generator=generator, output_type="pil",
                max_sequence_length=max_sequence_length,
            ).frames
            base_video = base[0]

        refine = self._stage(WanVideoToVideoPipeline)
        if refine_flow_shift is not None:
            key = "flow_shift" if "flow_shift" in self.scheduler.config else "shift"
            refine.scheduler = type(self.scheduler).from_config(self.scheduler.config, **{key: refine_flow_shift})
        diffattn.apply(
            self.transformer, "freeswim", base_height=base_height, base_width=base_width, cache_steps=cache_steps,
            cache_device=cache_device, scale_mode=scale_mode, vae_scale_factor=self.vae_scale_factor_spatial,
        )
        try:
            logger.info("diffattn FreeSwim: refine pass at %dx%d, strength %.2f", height, width, strength)
            out = refine(
                video=base_video, **embeds, height=height, width=width,
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, strength=strength,
                generator=generator, output_type=output_type, callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs or ["latents"],
                max_sequence_length=max_sequence_length,
            )
        finally:
            diffattn.remove(self.transformer)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (out.frames,)
        return WanPipelineOutput(frames=out.frames)
