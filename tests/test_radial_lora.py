"""Radial LoRA training (`diffattn.pipelines.radial_lora`) on a tiny Wan pipeline and tiny synthetic videos:
the loss on a fixed evaluation batch falls, training really runs the sparse kernel with gradients, a crashed run
resumed from its checkpoint reproduces the uninterrupted run exactly, and the saved LoRA loads with Diffusers'
`load_lora_weights` (alpha honoured), changes outputs, and unloads cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffattn.masks import radial_mask
from diffattn.methods import block_masked
from diffattn.pipelines import radial_lora as rl

import tiny_pipelines as tp

COLORS = [(255, 40, 40), (40, 40, 255), (40, 220, 40), (240, 240, 40)]
PROMPTS = ["a red square moving right", "a blue square moving down", "a green square moving left", "a small square moving up"]
STEPS = 30


class SimulatedCrash(Exception):
    pass


def write_video(path: Path, color, index: int, frames: int = 9, height: int = 64, width: int = 64) -> None:
    """A coloured 16x16 square moving over a dark background (direction depends on `index`)."""
    out = []
    for t in range(frames):
        f = np.full((height, width, 3), 25, np.uint8)
        dx, dy = [(4, 0), (0, 4), (-4, 0), (0, -4)][index % 4]
        x = int(np.clip(24 + dx * (t - frames // 2), 0, width - 16))
        y = int(np.clip(24 + dy * (t - frames // 2), 0, height - 16))
        f[y : y + 16, x : x + 16] = color
        out.append(f)
    if path.suffix == ".gif":
        imageio.mimwrite(path, out, duration=0.1, loop=0)
    else:
        imageio.mimwrite(path, out, fps=8)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("radial_lora")
    videos = root / "videos"
    videos.mkdir()
    jsonl = []
    for i, (color, prompt) in enumerate(zip(COLORS, PROMPTS)):
        path = videos / f"clip{i}{'.mp4' if i % 2 == 0 else '.gif'}"
        write_video(path, color, i)
        if i < 2:
            path.with_suffix(".txt").write_text(prompt + "\n")  # sidecar prompt
        else:
            jsonl.append(json.dumps({"file": path.name, "prompt": prompt}))
    (videos / "prompts.jsonl").write_text("\n".join(jsonl) + "\n")
    tp.build_tiny_wan_pipeline(str(root / "model"))
    return root


def make_config(root: Path, out: str, **overrides) -> rl.RadialLoRAConfig:
    kwargs = dict(
        pretrained_model=root / "model", video_dir=root / "videos", output_dir=root / out,
        num_frames=9, height=64, width=64, max_sequence_length=16, cache_dir=root / "cache",
        rank=4, alpha=8.0, learning_rate=5e-3, steps=STEPS, batch_size=2, seed=3,
        eval_every=1, eval_samples=4, checkpoint_every=5, keep_checkpoints=3, progress=False, device="cpu", dtype="float32",
        # 2-block model: block 0 dense, block 1 sparse; 9x64x64 -> 3 latent frames x 16 tokens = 3 blocks of 16
        radial_options=dict(block_size=16, dense_layers=1),
    )
    kwargs.update(overrides)
    return rl.RadialLoRAConfig(**kwargs)


@pytest.fixture(scope="module")
def trained(workspace):
    """The uninterrupted run, recording every block-sparse kernel call (the radial path)."""
    calls = []
    original = block_masked.block_sparse_attention

    def recording(q, k, v, mask, **kw):
        out = original(q, k, v, mask, **kw)
        calls.append(
            {"grad": q.requires_grad and out.requires_grad, "density": mask.float().mean().item(), "tokens": q.shape[2]}
        )
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(block_masked, "block_sparse_attention", recording)
        out = rl.train_radial_lora(make_config(workspace, "run"))
    return out, calls


def test_geometry_gives_a_sparse_mask():
    mask = radial_mask(3, 16, block_size=16, decay_factor=0.2, sink=True)
    assert mask.shape == (3, 3)
    assert mask.float().mean().item() < 1.0


def test_loss_falls_on_the_fixed_eval_batch(trained):
    out, _ = trained
    rows = rl.read_loss_log(out / "loss.csv")
    assert [r["step"] for r in rows] == list(range(STEPS + 1))
    evals = [r["eval_loss"] for r in rows]
    assert all(e is not None for e in evals)
    first, last = np.mean(evals[:5]), np.mean(evals[-5:])
    # The eval batch (videos, noise, timesteps) is fixed, so this is deterministic; the margin is a real decrease.
    assert last < 0.85 * first, (first, last)
    assert rows[0]["loss"] is None and all(r["loss"] is not None and np.isfinite(r["loss"]) for r in rows[1:])


def test_training_runs_the_sparse_kernel_with_gradients(trained):
    out, calls = trained
    expected = radial_mask(3, 16, block_size=16, decay_factor=0.2, sink=True).float().mean().item()
    train_calls = [c for c in calls if c["grad"]]
    # one sparse layer (block 1) per training forward, at 48 video tokens, with the sparse mask
    assert len(train_calls) == STEPS
    assert all(c["tokens"] == 48 and c["density"] == pytest.approx(expected) for c in train_calls)
    info = json.loads((out / "lora_config.json").read_text())
    assert info["radial_mask"]["density"] == pytest.approx(expected) and expected < 1.0
    assert info["rank"] == 4 and info["alpha"] == 8.0 and info["radial"]["dense_layers"] == 1
    assert info["radial"]["dense_timesteps"] == 0 and info["radial"]["block_size"] == 16
    lora = load_file(str(out / "pytorch_lora_weights.safetensors"))
    # lora_B starts at zero; the q projection of the sparse block only gets gradients through the kernel's dQ
    for name in ("to_q", "to_k", "to_v", "to_out.0"):
        b = lora[f"transformer.blocks.1.attn1.{name}.lora_B.weight"]
        assert b.abs().max().item() > 1e-4, name
    assert any(".attn2." in k for k in lora), "the default targets cover cross-attention too"


def test_checkpoint_layout(trained):
    out, _ = trained
    assert [s for s, _ in rl._checkpoints(out)] == [20, 25, 30]  # keep_checkpoints=3
    for step in (20, 25, 30):
        ckpt = out / f"checkpoint-{step}"
        assert (ckpt / "pytorch_lora_weights.safetensors").exists()
        assert (ckpt / "training_state.pt").exists()
        assert json.loads((ckpt / "lora_config.json").read_text())["step"] == step
    final = load_file(str(out / "pytorch_lora_weights.safetensors"))
    last = load_file(str(out / "checkpoint-30" / "pytorch_lora_weights.safetensors"))
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(workspace, trained, monkeypatch):
    out, _ = trained
    cfg = make_config(workspace, "crashed")
    original = rl._flow_loss
    count = {"train": 0}

    def crashing(*args, **kwargs):
        if torch.is_grad_enabled():
            count["train"] += 1
            if count["train"] == 8:  # after checkpoint-5, which is mid-epoch (10 of 4 videos drawn)
                raise SimulatedCrash("at step 8")
        return original(*args, **kwargs)

    monkeypatch.setattr(rl, "_flow_loss", crashing)
    with pytest.raises(SimulatedCrash):
        rl.train_radial_lora(cfg)
    monkeypatch.setattr(rl, "_flow_loss", original)
    assert [s for s, _ in rl._checkpoints(cfg.output_dir)] == [5]
    assert rl.read_loss_log(cfg.output_dir / "loss.csv")[-1]["step"] == 7  # rows 6, 7 are past the checkpoint

    with pytest.raises(ValueError, match="already holds checkpoints"):
        rl.train_radial_lora(cfg)  # refuses to overwrite a run without resume=True
    resumed = rl.train_radial_lora(make_config(workspace, "crashed", resume=True))

    assert rl.read_loss_log(resumed / "loss.csv") == rl.read_loss_log(out / "loss.csv")
    a = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    b = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_saved_lora_loads_with_diffusers_and_changes_outputs(workspace, trained):
    from diffusers import WanPipeline

    out, _ = trained
    pipe = WanPipeline.from_pretrained(workspace / "model")
    pipe.set_progress_bar_config(disable=True)
    base = tp.run_tiny_wan(pipe, steps=2)
    pipe.load_lora_weights(out)
    to_q = pipe.transformer.blocks[1].attn1.to_q
    assert list(to_q.scaling.values()) == [2.0], "alpha 8 / rank 4 must survive saving and loading"
    saved = load_file(str(out / "pytorch_lora_weights.safetensors"))
    (adapter,) = to_q.lora_B.keys()
    assert torch.equal(to_q.lora_B[adapter].weight, saved["transformer.blocks.1.attn1.to_q.lora_B.weight"])
    with_lora = tp.run_tiny_wan(pipe, steps=2)
    assert (with_lora - base).abs().max().item() > 1e-3
    pipe.unload_lora_weights()
    again = tp.run_tiny_wan(pipe, steps=2)
    assert (again - base).abs().max().item() <= 1e-6


def test_load_radial_lora_installs_the_training_mask(workspace, trained):
    import diffattn
    from diffusers import WanPipeline

    out, _ = trained
    pipe = WanPipeline.from_pretrained(workspace / "model")
    rl.load_radial_lora(pipe, out)
    try:
        state = diffattn.api.installed(pipe.transformer)
        assert state.method == "radial"
        assert state.options["block_size"] == 16 and state.options["dense_layers"] == 1
        assert state.options["dense_timesteps"] is None  # back to the inference default
        assert list(pipe.transformer.blocks[0].attn1.to_q.scaling.values()) == [2.0]
    finally:
        diffattn.remove(pipe)


def test_gradient_checkpointing_gives_the_same_training(workspace):
    # diffattn's context is cleared after the forward; recomputation in backward must still see the token grid.
    common = dict(steps=3, eval_samples=0, checkpoint_every=0)
    plain = rl.train_radial_lora(make_config(workspace, "gc_off", **common))
    ckpt = rl.train_radial_lora(make_config(workspace, "gc_on", gradient_checkpointing=True, **common))
    la, lb = rl.read_loss_log(plain / "loss.csv"), rl.read_loss_log(ckpt / "loss.csv")
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], rel=1e-6)
    a, b = load_file(str(plain / "pytorch_lora_weights.safetensors")), load_file(str(ckpt / "pytorch_lora_weights.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_cli_trains_and_reports_bad_arguments(workspace, capsys):
    args = [
        "--pretrained-model", str(workspace / "model"), "--video-dir", str(workspace / "videos"),
        "--output-dir", str(workspace / "cli"), "--num-frames", "9", "--height", "64", "--width", "64",
        "--max-sequence-length", "16", "--rank", "2", "--steps", "2", "--eval-samples", "2",
        "--checkpoint-every", "0", "--device", "cpu", "--dtype", "float32", "--no-progress",
        "--radial", "block_size=16", "--radial", "dense_layers=1", "--target-modules", "attn1.to_q,attn1.to_v",
    ]
    assert rl.main(args) == 0
    lora = load_file(str(workspace / "cli" / "pytorch_lora_weights.safetensors"))
    assert {k.split(".")[4] for k in lora} == {"to_q", "to_v"} and all(".attn1." in k for k in lora)
    assert rl.main(args[:-2] + ["--rank", "0"]) == 2
    assert "RadialLoRAConfig.rank" in capsys.readouterr().err
    assert rl.main(args[:-2] + ["--radial", "dense_timesteps=4"]) == 2
    assert "dense_timesteps" in capsys.readouterr().err


@pytest.mark.parametrize(
    "field, value",
    [
        ("rank", 0), ("num_frames", 10), ("height", 60), ("width", 0), ("alpha", -1.0), ("learning_rate", 0.0),
        ("target_modules", []), ("dtype", "int8"), ("device", "nonsense"), ("timestep_sampling", "beta"),
        ("batch_size", 1.5), ("lora_dropout", 1.0), ("resume", "yes"), ("checkpoint_every", -1),
    ],
)
def test_config_rejects_bad_values(tmp_path, field, value):
    kwargs = dict(pretrained_model=tmp_path, video_dir=tmp_path, output_dir=tmp_path, **{field: value})
    with pytest.raises(ValueError, match=f"RadialLoRAConfig.{field}"):
        rl.RadialLoRAConfig(**kwargs)


@pytest.mark.parametrize("options, word", [({"dense_timesteps": 2}, "dense_timesteps"), ({"bogus": 1}, "bogus"), ({"block_size": 17}, "block_size")])
def test_config_rejects_bad_radial_options(tmp_path, options, word):
    with pytest.raises(ValueError, match=word):
        rl.RadialLoRAConfig(tmp_path, tmp_path, tmp_path, radial_options=options)


def test_target_modules_match_wan_attention():
    transformer = tp.build_tiny_wan_pipeline().transformer
    default = rl._lora_target_names(transformer, rl.DEFAULT_TARGETS)
    assert len(default) == 2 * 2 * 4  # 2 blocks x (attn1, attn2) x (q, k, v, out)
    assert rl._lora_target_names(transformer, ["attn1.to_q"]) == ["blocks.0.attn1.to_q", "blocks.1.attn1.to_q"]


def test_data_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no videos"):
        rl.find_videos(empty)
    with pytest.raises(ValueError, match="existing folder"):
        rl.find_videos(tmp_path / "missing")

    folder = tmp_path / "v"
    folder.mkdir()
    write_video(folder / "short.mp4", COLORS[0], 0, frames=5)
    with pytest.raises(ValueError, match="no prompt for video .*short.mp4"):
        rl.find_videos(folder)
    (folder / "short.txt").write_text("a red square")
    (item,) = rl.find_videos(folder)
    assert item.prompt == "a red square"
    with pytest.raises(ValueError, match="short.mp4.* too short: it has 5"):
        rl.read_video(item.path, 9, 64, 64)
    with pytest.raises(ValueError, match="short.mp4.* too short: it has 3 .*frame_stride=2"):
        rl.read_video(item.path, 5, 64, 64, frame_stride=2)

    broken = folder / "broken.webm"
    broken.write_bytes(b"this is not a video" * 10)
    with pytest.raises(ValueError, match="broken.webm"):
        rl.read_video(broken, 5, 64, 64)
    (folder / "prompts.jsonl").write_text("{not json}\n")
    with pytest.raises(ValueError, match="prompts.jsonl:1"):
        rl.find_videos(folder)


def numbered(frames: list[np.ndarray]) -> list[np.ndarray]:
    """Make frames distinct (one corner pixel), or the GIF writer merges identical frames into one."""
    out = []
    for i, f in enumerate(frames):
        f = f.copy()
        f[0, 0] = (i * 20, i * 20, i * 20)
        out.append(f)
    return out


def test_read_video_resizes_covers_and_centre_crops(tmp_path):
    # 9 frames of 32x96: left third red, middle green, right third blue; to 32x32 the crop keeps the middle.
    frame = np.zeros((32, 96, 3), np.uint8)
    frame[:, :32] = (255, 0, 0)
    frame[:, 32:64] = (0, 255, 0)
    frame[:, 64:] = (0, 0, 255)
    path = tmp_path / "stripes.gif"
    imageio.mimwrite(path, numbered([frame] * 9), duration=0.1, loop=0)
    clip = rl.read_video(path, 9, 32, 32)
    assert clip.shape == (3, 9, 32, 32) and clip.min() >= -1 and clip.max() <= 1
    assert torch.allclose(clip[:, :, 4:28, 4:28].mean(dim=(1, 2, 3)), torch.tensor([-1.0, 1.0, -1.0]), atol=0.05)
    # upscaling: 16x48 -> height 32 needs scale 2, then the crop keeps the green middle
    small = tmp_path / "small.gif"
    imageio.mimwrite(small, numbered([frame[::2, ::2]] * 9), duration=0.1, loop=0)
    clip = rl.read_video(small, 9, 32, 32)
    assert clip.shape == (3, 9, 32, 32)
    assert torch.allclose(clip[:, :, 4:28, 4:28].mean(dim=(1, 2, 3)), torch.tensor([-1.0, 1.0, -1.0]), atol=0.05)


def test_read_video_webm_and_frame_stride(tmp_path):
    # frame i is uniformly grey level 20*i; stride 2 must read frames 0, 2, 4, 6, 8
    frames = [np.full((48, 80, 3), 20 * i, np.uint8) for i in range(11)]
    path = tmp_path / "grey.webm"
    imageio.mimwrite(path, frames, fps=8, codec="libvpx-vp9")
    clip = rl.read_video(path, 5, 32, 48, frame_stride=2)
    assert clip.shape == (3, 5, 32, 48)
    levels = ((clip.mean(dim=(0, 2, 3)) + 1) * 127.5).tolist()
    assert levels == pytest.approx([0, 40, 80, 120, 160], abs=4)
    with pytest.raises(ValueError, match="grey.webm.* too short: it has 6 .*frame_stride=2"):
        rl.read_video(path, 9, 32, 48, frame_stride=2)
