"""The UNet demo model: multi-shape scene data with boxes, the space-to-depth VAE, training and the saved folder
loading with stock `StableDiffusionPipeline`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffattn.pipelines.demo_data import GRID_PLACES, SHAPE_COLORS, sample_images, sample_scenes, scene_prompt
from diffattn.pipelines.demo_unet import DemoUNetConfig, DemoUNetPipeline, SpaceToDepthVAE

# ------------------------------------------------------------------------------------------------ data


def _colour_mask(pixels: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    target = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
    return np.abs(pixels - target).max(axis=-1) < 0.05


@pytest.mark.parametrize("seed", [0, 7])
def test_scene_prompts_name_every_shape_and_boxes_fit_the_pixels(seed):
    size = 96
    pixels, prompts, boxes = sample_scenes(24, size=size, seed=seed)
    assert pixels.shape == (24, 3, size, size) and len(prompts) == len(boxes) == 24
    assert float(pixels.min()) >= -1 and float(pixels.max()) <= 1
    counts = [len(b) for b in boxes]
    assert min(counts) >= 1 and max(counts) <= 3 and len(set(counts)) > 1
    for image, prompt, scene in zip(pixels.permute(0, 2, 3, 1).numpy(), prompts, boxes):
        assert prompt == scene_prompt([s.phrase for s in scene], prompt.split(" on a ")[-1].split()[0])
        assert len({s.color for s in scene}) == len(scene) and len({s.place for s in scene}) == len(scene)
        background = prompt.split()[-2]
        assert background not in {s.color for s in scene}
        for s in scene:
            assert s.phrase in prompt and s.shape in s.phrase and s.color in s.phrase and s.place in GRID_PLACES
            x0, y0, x1, y1 = s.box
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            ys, xs = np.nonzero(_colour_mask(image, SHAPE_COLORS[s.color]))
            assert len(xs) > 0, s
            # The box is the shape's exact edge; fully covered pixels lie inside it (pixel centres at +0.5).
            assert xs.min() + 0.5 >= x0 * size - 1 and xs.max() + 0.5 <= x1 * size + 1, (s, xs.min(), xs.max())
            assert ys.min() + 0.5 >= y0 * size - 1 and ys.max() + 0.5 <= y1 * size + 1, (s, ys.min(), ys.max())
            assert xs.min() <= x0 * size + 2 and xs.max() >= x1 * size - 3  # and tight: the shape reaches its box
            # The place named is where the box is: its centre in the named third of the image.
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            gx, gy = GRID_PLACES[s.place]
            assert abs(cx - gx) < 1 / 6 and abs(cy - gy) < 1 / 6, s


def test_scenes_are_reproducible_and_single_shape_images_unchanged():
    a = sample_scenes(6, size=32, seed=3)
    b = sample_scenes(6, size=32, seed=3)
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    assert sample_scenes(6, size=32, seed=4)[1] != a[1]
    one = sample_scenes(5, size=32, min_shapes=2, max_shapes=2, seed=1)[2]
    assert all(len(s) == 2 for s in one)
    with pytest.raises(ValueError, match="max_shapes"):
        sample_scenes(2, max_shapes=7)
    # The single-shape image data of the shipped demo-image model is drawn as before (shared drawing code).
    pixels, prompts = sample_images(3, size=32, seed=0)
    assert pixels.shape == (3, 3, 32, 32) and all(" on a " in p for p in prompts)


# ------------------------------------------------------------------------------------------------ VAE


def test_space_to_depth_vae_is_lossless_and_checks_its_config():
    vae = SpaceToDepthVAE(channels=3, factor=2)
    assert vae.config.latent_channels == 12 and 2 ** (len(vae.config.block_out_channels) - 1) == 2
    x = torch.randn(2, 3, 10, 6)
    z = vae.encode(x).latent_dist
    assert z.mode().shape == (2, 12, 5, 3) and torch.equal(z.sample(), z.mode())
    assert torch.equal(vae.decode(z.mode()).sample, x)
    with pytest.raises(ValueError, match="multiples of 2"):
        vae.encode(torch.randn(1, 3, 5, 6))
    with pytest.raises(ValueError, match="factor"):
        SpaceToDepthVAE(factor=3)
    with pytest.raises(ValueError, match="scaling_factor"):
        SpaceToDepthVAE(scaling_factor=0.18215)
    with pytest.raises(ValueError, match="head_dim"):
        DemoUNetConfig(channels=(32, 48), head_dim=32)


# ------------------------------------------------------------------------------------------------ training

TINY = DemoUNetConfig(size=16, channels=(32, 64), layers_per_block=1, head_dim=16, text_dim=16, text_layers=1)


def _stored_dtypes(folder: Path) -> set:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}


def test_train_unet_saves_a_folder_that_stock_sd_pipeline_loads(tmp_path):
    from diffattn.generate import load_pipeline, pipeline_class
    from diffattn.pipelines.demo_train import train_demo_unet, write_card
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    rec = train_demo_unet(tmp_path / "m", cfg=TINY, minutes=0, max_steps=2, batch=2, eval_every=10, warmup=2)
    assert rec["steps"] == 2 and [e["step"] for e in rec["log"]] == [2]
    assert all(np.isfinite(e["eval_loss"]) and np.isfinite(e["eval_loss_ema"]) for e in rec["log"])
    assert np.isfinite(rec["log"][0]["train_loss"])
    folder = tmp_path / "m"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "DemoUNetPipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]

    stock = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    assert isinstance(stock.unet, UNet2DConditionModel) and stock.vae_scale_factor == 2
    assert _stored_dtypes(folder / "text_encoder") == {torch.float16}  # half the bytes on disk ...
    assert stock.text_encoder.dtype == torch.float32  # ... loaded as float32 (the config's dtype)
    assert [type(b).__name__ for b in stock.unet.down_blocks] == ["CrossAttnDownBlock2D", "DownBlock2D"]
    stock.set_progress_bar_config(disable=True)
    out = stock("a red circle on the left on a blue background", height=16, width=16, num_inference_steps=2, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 16, 16, 3) and np.isfinite(out).all()

    assert pipeline_class(str(folder)) is DemoUNetPipeline
    ours = load_pipeline(str(folder))
    ours.set_progress_bar_config(disable=True)
    again = ours("a red circle on the left on a blue background", height=16, width=16, num_inference_steps=2, guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    np.testing.assert_allclose(again, out, atol=1e-5)  # the same weights and scheduler, whichever class loads them

    card = write_card(folder).read_text()
    assert "UNet2DConditionModel" in card and "CrossAttnDownBlock2D" in card and "2 steps" in card


# ------------------------------------------------------------------------------------------------ shipped weights


def test_shipped_unet_demo_model_folder_and_agent_generation(tmp_path):
    from diffattn.demo import assets_dir, demo_model_path
    from diffattn.generate import load_pipeline, pipeline_class

    import diffattn

    folder = Path(demo_model_path("unet"))
    assert folder.parent == assets_dir()
    weights = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
    assert 1e6 < weights <= 16 * 2**20
    for name in ("README.md", "loss.png", "samples.png", "training.json"):
        assert (folder / name).is_file(), name
    record = json.loads((folder / "training.json").read_text())
    trained = {k: v for k, v in record["config"].items() if k not in ("steps", "guidance")}
    expected = {k: list(v) if isinstance(v, tuple) else v for k, v in DemoUNetConfig().__dict__.items()
                if k not in ("steps", "guidance")}
    assert trained == expected
    assert record["log"][-1]["eval_loss_ema"] < 0.5 * record["log"][0]["eval_loss_ema"]
    assert pipeline_class(str(folder)) is DemoUNetPipeline
    pipe = load_pipeline(str(folder))
    assert _stored_dtypes(folder / "text_encoder") == {torch.float16} and pipe.text_encoder.dtype == torch.float32
    pipe.set_progress_bar_config(disable=True)
    prompt = "a red circle on the left on a blue background"
    kw = {"num_inference_steps": 4, "height": 64, "width": 64, "output_type": "np"}
    dense = pipe(prompt, generator=torch.Generator().manual_seed(0), **kw).images
    diffattn.apply(pipe, "agent", seed=0)
    agent = pipe(prompt, generator=torch.Generator().manual_seed(0), **kw).images
    diffattn.remove(pipe)
    assert agent.shape == dense.shape == (1, 64, 64, 3) and np.isfinite(agent).all()
    assert 0 < np.abs(agent - dense).mean() < 0.2  # an approximation of dense, not another picture
