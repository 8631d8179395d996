"""The demo models: the pixel-space VAE, the procedural data, the tokenizer, the training entry point (a few CPU
steps) and the shipped weights in assets/ (size, card, loading, and that they draw what the prompt says)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffattn.pipelines.demo import (
    SAMPLING_FIELDS,
    DemoImageConfig,
    DemoImagePipeline,
    DemoVideoConfig,
    DemoVideoPipeline,
    PixelSpaceVAE,
    word_tokenizer,
)
from diffattn.pipelines.demo_data import (
    BACKGROUNDS,
    MOTIONS,
    SHAPE_COLORS,
    sample_images,
    sample_videos,
    vocabulary,
)
from diffattn.pipelines.demo_train import train_demo, write_card

from diffattn.demo import DEMO_MODELS, assets_dir, demo_model_path
from diffattn.generate import load_pipeline, pipeline_class

# ------------------------------------------------------------------------------------------------ pixel-space VAE


@pytest.mark.parametrize("frames,h,w", [(1, 5, 7), (9, 8, 6), (17, 3, 11)])
def test_video_vae_packs_time_like_wan_and_is_lossless(frames, h, w):
    vae = PixelSpaceVAE(channels=3, temporal_pack=4)
    x = torch.randn(2, 3, frames, h, w)
    z = vae.encode(x).latent_dist.mode()
    assert z.shape == (2, 12, (frames - 1) // 4 + 1, h, w)
    # latent frame 0 = frame 0 four times; latent frame k = frames 4k-3 .. 4k, channel-major (c, t)
    assert torch.equal(z[:, 0:4, 0], x[:, 0:1, 0].expand(-1, 4, -1, -1))
    if frames > 1:
        assert torch.equal(z[:, 4 * 1 + 2, 1], x[:, 1, 3])  # channel 1 (green), third frame of the group
    torch.testing.assert_close(vae.decode(z).sample, x, rtol=0, atol=1e-6)
    assert vae.config.z_dim == 12 and vae.config.scale_factor_temporal == 4 and vae.config.latents_std == [1.0] * 12


def test_video_vae_refuses_frames_off_the_wan_rule():
    with pytest.raises(ValueError, match="4k\\+1"):
        PixelSpaceVAE(channels=3, temporal_pack=4).encode(torch.zeros(1, 3, 6, 4, 4))


def test_image_vae_is_identity_and_config_is_checked(tmp_path):
    vae = PixelSpaceVAE(channels=3, temporal_pack=1)
    x = torch.randn(2, 3, 9, 13)
    assert torch.equal(vae.decode(vae.encode(x).latent_dist.sample()).sample, x)
    assert vae.config.block_out_channels == [3] and vae.config.scaling_factor == 1.0
    with pytest.raises(ValueError, match="z_dim"):
        PixelSpaceVAE(channels=3, temporal_pack=4, z_dim=16)
    with pytest.raises(ValueError, match="temporal_pack"):
        PixelSpaceVAE(channels=3, temporal_pack=2)
    vae.save_pretrained(tmp_path)
    again = PixelSpaceVAE.from_pretrained(tmp_path)
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}
    assert public(again.config) == public(vae.config)


# ------------------------------------------------------------------------------------------------ data, tokenizer


def _colour_mask(pixels: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    target = np.asarray(rgb, dtype=np.float32) / 127.5 - 1
    return np.abs(pixels - target).max(axis=-1) < 0.08


@pytest.mark.parametrize("seed", [0, 1])
def test_video_prompts_say_what_the_pixels_show(seed):
    pixels, prompts = sample_videos(6, frames=9, height=40, width=48, seed=seed)
    assert pixels.shape == (6, 3, 9, 40, 48) and pixels.min() >= -1 and pixels.max() <= 1
    for clip, prompt in zip(pixels.permute(0, 2, 3, 4, 1).numpy(), prompts):
        words = prompt.split()
        colour, motion, background = words[1], words[4], words[7]
        assert colour in SHAPE_COLORS and motion in MOTIONS and background in BACKGROUNDS and colour != background
        centres = []
        for frame in clip:
            ys, xs = np.nonzero(_colour_mask(frame, SHAPE_COLORS[colour]))
            assert len(xs) > 10, prompt  # the shape is there, in its colour, in every frame
            centres.append((xs.mean(), ys.mean()))
        (x0, y0), (x1, y1) = centres[0], centres[-1]
        dx, dy = MOTIONS[motion]
        assert (x1 - x0) * dx + (y1 - y0) * dy > 5, prompt  # it moves the way the prompt says
        corner = clip[0, :3, :3].reshape(-1, 3).mean(0)
        named = {b: np.abs(corner - (np.asarray(rgb) / 127.5 - 1) * 0.9).sum() for b, rgb in BACKGROUNDS.items()}
        assert min(named, key=named.get) == background, prompt


def test_image_prompts_say_where():
    pixels, prompts = sample_images(12, size=64, seed=3)
    assert pixels.shape == (12, 3, 64, 64)
    for image, prompt in zip(pixels.permute(0, 2, 3, 1).numpy(), prompts):
        colour = prompt.split()[1]
        ys, xs = np.nonzero(_colour_mask(image, SHAPE_COLORS[colour]))
        cx, cy = xs.mean() / 64, ys.mean() / 64
        if "on the left" in prompt:
            assert cx < 0.4, prompt
        elif "on the right" in prompt:
            assert cx > 0.6, prompt
        elif "at the top" in prompt:
            assert cy < 0.4, prompt
        elif "at the bottom" in prompt:
            assert cy > 0.6, prompt
        else:
            assert 0.3 < cx < 0.7 and 0.3 < cy < 0.7, prompt


def test_tokenizer_knows_every_word_and_ends_with_eos():
    tok = word_tokenizer(16)
    _, prompts = sample_videos(8, seed=5)
    for prompt in prompts:
        ids = tok(prompt).input_ids
        assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
        assert len(ids) == len(prompt.split()) + 1
    assert tok("a zebra").input_ids[1] == tok.unk_token_id
    assert len(set(vocabulary())) == len(vocabulary())


# ------------------------------------------------------------------------------------------------ training


TINY_VIDEO = DemoVideoConfig(height=16, width=16, num_frames=5, layers=1, heads=2, dim_head=16, ffn=32, text_dim=16)
TINY_IMAGE = DemoImageConfig(size=16, layers=1, heads=2, dim_head=16, clip_dim=16)


def test_train_video_writes_a_pipeline_folder_that_loads_and_continues(tmp_path):
    first = train_demo("video", tmp_path / "a", cfg=TINY_VIDEO, minutes=0, max_steps=3, batch=2, eval_every=2)
    assert first["steps"] == 3 and [e["step"] for e in first["log"]] == [2, 3]
    assert all(np.isfinite(e["eval_loss"]) for e in first["log"])
    assert pipeline_class(str(tmp_path / "a")) is DemoVideoPipeline
    pipe = load_pipeline(str(tmp_path / "a"))
    assert isinstance(pipe.vae, PixelSpaceVAE) and pipe.transformer.dtype == torch.float32
    frames = pipe("a red circle moving left on a blue background", height=16, width=16, num_frames=5,
                  num_inference_steps=2, generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 5, 16, 16, 3)
    again = train_demo("video", tmp_path / "b", cfg=TINY_VIDEO, minutes=0, max_steps=2, batch=2, eval_every=2,
                       init=tmp_path / "a")
    assert again["total_steps"] == 5 and [s["steps"] for s in again["stages"]] == [3, 2]
    assert again["log"][-1]["step"] == 5
    with pytest.raises(ValueError, match="another config"):
        train_demo("video", tmp_path / "c", cfg=DemoVideoConfig(**{**TINY_VIDEO.__dict__, "layers": 2}), minutes=0,
                   max_steps=1, batch=2, init=tmp_path / "a")


def test_train_image_and_card(tmp_path):
    rec = train_demo("image", tmp_path, cfg=TINY_IMAGE, minutes=0, max_steps=2, batch=2, eval_every=1)
    assert rec["kind"] == "image" and (tmp_path / "loss.png").stat().st_size > 1000
    pipe = load_pipeline(str(tmp_path))
    assert isinstance(pipe, DemoImagePipeline)
    from safetensors import safe_open

    for name in ("text_encoder", "text_encoder_2"):  # written in fp16, loaded as float32
        with safe_open(str(tmp_path / name / "model.safetensors"), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
        assert getattr(pipe, name).dtype == torch.float32
    image = pipe("a red circle on the left on a blue background", height=16, width=16, num_inference_steps=2,
                 output_type="np").images
    assert image.shape == (1, 16, 16, 3)
    card = write_card(tmp_path).read_text()
    assert "SD3 architecture" in card and "2 steps" in card and "![loss curve](loss.png)" in card


def test_bad_training_arguments(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        train_demo("audio", tmp_path)
    with pytest.raises(ValueError, match="minutes"):
        train_demo("video", tmp_path, minutes=0)


# ------------------------------------------------------------------------------------------------ shipped weights


@pytest.mark.parametrize("kind", sorted(set(DEMO_MODELS) - {"unet"}))  # unet: tests/test_demo_unet.py
def test_shipped_demo_model_folder(kind):
    folder = Path(demo_model_path(kind))
    assert folder.parent == assets_dir()
    weights = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
    assert 1e6 < weights <= 50 * 2**20
    for name in ("README.md", "loss.png", "samples.png", "training.json"):
        assert (folder / name).is_file(), name
    record = json.loads((folder / "training.json").read_text())
    defaults = DemoVideoConfig() if kind == "video" else DemoImageConfig()
    sampling = set(SAMPLING_FIELDS)  # call defaults that may be tuned after training; the rest is the model
    trained = {k: v for k, v in record["config"].items() if k not in sampling}
    assert trained == {k: v for k, v in defaults.__dict__.items() if k not in sampling}
    assert record["log"][-1]["eval_loss_ema"] < 0.5 * record["log"][0]["eval_loss_ema"]
    from safetensors import safe_open

    encoders = sorted(folder.glob("text_encoder*/model.safetensors"))
    assert len(encoders) == (1 if kind == "video" else 2)
    for path in encoders:  # stored in fp16 (the tree's size budget); the config says float32, so they load as float32
        with safe_open(str(path), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
        assert json.loads((path.parent / "config.json").read_text())["dtype"] == "float32"


def _mean_rgb(pixels: np.ndarray) -> np.ndarray:
    return pixels.reshape(-1, 3).mean(0)


def test_demo_image_model_draws_the_prompt():
    pipe = load_pipeline(demo_model_path("image"))
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red square on the left on a blue background", generator=torch.Generator().manual_seed(0),
                 output_type="np").images[0]
    assert image.shape == (128, 128, 3)
    red = (image[..., 0] > 0.6) & (image[..., 1] < 0.4) & (image[..., 2] < 0.4)
    assert red.sum() > 100  # a red shape of some size ...
    assert np.nonzero(red)[1].mean() < 0.45 * 128  # ... on the left
    r, g, b = _mean_rgb(image[:8, -8:])  # a corner: the blue background
    assert b > r + 0.15 and b > g + 0.15


def test_demo_video_model_draws_the_prompt():
    pipe = load_pipeline(demo_model_path("video"))
    pipe.set_progress_bar_config(disable=True)
    # Seed 1: the model is small and some seeds lose the shape mid-clip (docs/demo_models.md says so).
    video = pipe("a red circle moving right on a blue background", generator=torch.Generator().manual_seed(1)).frames[0]
    assert video.shape == (17, 64, 64, 3)
    t, xs = [], []
    for i, frame in enumerate(video):
        red = (frame[..., 0] > 0.5) & (frame[..., 1] < 0.4) & (frame[..., 2] < 0.5)
        if red.sum() > 5:
            t.append(i)
            xs.append(np.nonzero(red)[1].mean())
    assert len(xs) >= 10  # the red shape is visible in most frames
    slope = np.polyfit(t, xs, 1)[0]
    assert slope > 0.7  # and moves right (training clips cross 35-55% of 64 px in 16 frames: 1.4-2.2 px/frame)
    r, g, b = _mean_rgb(video[:, :6, :6])
    assert b > r + 0.1 and b > g + 0.1


def test_learning_rate_decay_is_linear_to_ten_percent():
    import math as _math

    from diffattn.pipelines.demo_train import _decay

    assert _decay(False, 0.0, _math.inf, 5, 10) == 1.0
    assert _decay(True, 0.0, _math.inf, 0, 10) == 1.0
    assert abs(_decay(True, 0.0, _math.inf, 5, 10) - 0.55) < 1e-12
    assert _decay(True, 0.0, _math.inf, 10, 10) == _decay(True, 0.0, _math.inf, 50, 10) == 0.1
