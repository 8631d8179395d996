"""`diffattn bench quality`: metrics against independent expectations, the energy-decay probe against a brute-force
loop, the demo option rules, and the whole bench end to end on tiny Wan and SD3 pipeline folders."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from diffattn.call import AttentionCall, LayerInfo
from diffattn.context import TokenGrid
from diffattn.bench.energy import EnergyDecay, EnergyProbe, plot_energy_decay
from diffattn.methods.base import dense_attention
from diffattn.bench.metrics import psnr, ssim
from diffattn.bench.quality import Geometry, demo_options, parse_method_opts


def _image(seed: int, shape=(16, 20, 3)) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.2, 0.8, size=shape)


# ---- metrics ---------------------------------------------------------------------------------------------------

def test_identical_inputs_give_inf_and_one():
    img = _image(0)
    video = np.stack([_image(1), _image(2)])
    assert psnr(img, img) == math.inf and psnr(video, video.copy()) == math.inf
    assert ssim(img, img) == pytest.approx(1.0, abs=1e-12)
    assert ssim(video, torch.from_numpy(video)) == pytest.approx(1.0, abs=1e-12)


def test_psnr_of_a_constant_offset_is_the_formula():
    img = _image(3)
    for c in (0.1, 0.01):
        assert psnr(img + c, img) == pytest.approx(10 * math.log10(1 / c**2), abs=1e-9)  # 20 dB, 40 dB
    assert psnr(img * 255 + 25.5, img * 255, data_range=255.0) == pytest.approx(20.0, abs=1e-9)


def _ssim_loop(a: np.ndarray, b: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """Wang et al.'s SSIM written out: every valid window position, every channel, explicit Gaussian weights."""
    r = size // 2
    w = np.array([[math.exp(-((i - r) ** 2 + (j - r) ** 2) / (2 * sigma**2)) for j in range(size)] for i in range(size)])
    w /= w.sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    h, wd, ch = a.shape
    for c in range(ch):
        for y in range(h - size + 1):
            for x in range(wd - size + 1):
                pa, pb = a[y:y + size, x:x + size, c], b[y:y + size, x:x + size, c]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
                cov = (w * (pa - ma) * (pb - mb)).sum()
                values.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_ssim_matches_a_per_window_loop():
    a = _image(4, (15, 18, 3))
    b = np.clip(a + np.random.default_rng(5).normal(0, 0.1, a.shape), 0, 1)
    expected = _ssim_loop(a, b)
    assert 0.2 < expected < 0.99
    assert ssim(a, b) == pytest.approx(expected, abs=1e-10)


def test_ssim_of_a_video_is_the_mean_over_frames():
    frames_a = [_image(10 + i) for i in range(3)]
    frames_b = [np.clip(f + 0.05 * np.random.default_rng(i).normal(size=f.shape), 0, 1) for i, f in enumerate(frames_a)]
    per_frame = [_ssim_loop(x, y) for x, y in zip(frames_a, frames_b)]
    assert ssim(np.stack(frames_a), np.stack(frames_b)) == pytest.approx(float(np.mean(per_frame)), abs=1e-10)


def test_metrics_are_symmetric_and_fall_with_noise():
    a = _image(6)
    rng = np.random.default_rng(7)
    noisy = [np.clip(a + s * rng.normal(size=a.shape), 0, 1) for s in (0.01, 0.05, 0.2)]
    for b in noisy:
        assert psnr(a, b) == pytest.approx(psnr(b, a), rel=1e-12)
        assert ssim(a, b) == pytest.approx(ssim(b, a), rel=1e-12)
    p = [psnr(a, b) for b in noisy]
    s = [ssim(a, b) for b in noisy]
    assert p[0] > p[1] > p[2] and s[0] > s[1] > s[2]
    assert s[0] < 1.0


def test_metrics_reject_bad_shapes():
    with pytest.raises(ValueError, match="same shape"):
        psnr(_image(0), _image(0, (16, 21, 3)))
    with pytest.raises(ValueError, match="image"):
        ssim(np.zeros((4, 4)), np.zeros((4, 4)))


# ---- energy decay ----------------------------------------------------------------------------------------------

def _call(grid: TokenGrid, text: int = 0, heads: int = 2, batch: int = 2, seed: int = 0) -> AttentionCall:
    gen = torch.Generator().manual_seed(seed)
    s = grid.num_tokens + text
    q, k, v = (torch.randn(batch, heads, s, 8, generator=gen) for _ in range(3))
    role = "joint" if text else "self"
    layer = LayerInfo(index=0, slot="attn", path="blocks.0.attn", role=role, num_layers=1)
    return AttentionCall(q, k, v, layer, role, None, grid=grid, text_len=text, text_first=False)


def _brute_force(call: AttentionCall) -> tuple[dict[tuple[int, int], float], dict[tuple[int, int], int], float]:
    """Mass and key counts per (|dt|, rounded spatial distance), over every query, by explicit loops."""
    _, h, w = call.grid
    n = call.num_visual
    probs = torch.softmax(call.q.double() @ call.k.double().transpose(-1, -2) / math.sqrt(call.q.shape[-1]), dim=-1)
    mass: dict[tuple[int, int], float] = {}
    keys: dict[tuple[int, int], int] = {}
    text = 0.0
    pos = [(i // (h * w), (i // w) % h, i % w) for i in range(n)]
    for b in range(probs.shape[0]):
        for hd in range(probs.shape[1]):
            for i in range(n):
                for j in range(n):
                    d = (abs(pos[i][0] - pos[j][0]), round(math.dist(pos[i][1:], pos[j][1:])))
                    mass[d] = mass.get(d, 0.0) + probs[b, hd, i, j].item()
                    keys[d] = keys.get(d, 0) + 1
                text += probs[b, hd, i, n:].sum().item()
    return mass, keys, text


@pytest.mark.parametrize("text", [0, 3])
def test_energy_probe_matches_brute_force_and_sums_to_one(text):
    grid = TokenGrid(3, 3, 4)
    call = _call(grid, text=text)
    probe = EnergyProbe(queries=1000)  # more than the tokens: every query, so the sample does not matter
    out = probe.attend(call)
    assert torch.equal(out, dense_attention(call))
    (decay,) = probe.results()
    mass, keys, text_mass = _brute_force(call)
    for (dt, ds), m in mass.items():
        assert decay.mass[dt][ds] == pytest.approx(m, rel=1e-5)
        assert decay.keys[dt][ds] == keys[(dt, ds)]
    assert sum(map(sum, decay.mass)) == pytest.approx(sum(mass.values()), rel=1e-5)
    assert decay.queries == 2 * 2 * grid.num_tokens
    assert decay.text_mass == pytest.approx(text_mass, rel=1e-5, abs=1e-9)
    assert (text_mass > 0) == (text > 0)
    assert decay.total_mass() == pytest.approx(1.0, abs=1e-6)
    profile = decay.by_temporal()
    assert sum(p["mass"] for p in profile) + decay.text_mass / decay.queries == pytest.approx(1.0, abs=1e-6)
    assert sum(p["keys_per_query"] for p in profile) == pytest.approx(grid.num_tokens)
    back = EnergyDecay.from_dict(json.loads(json.dumps(decay.to_dict())))
    assert back.total_mass() == pytest.approx(decay.total_mass())


def test_energy_probe_samples_queries_and_leaves_global_rng_alone():
    call = _call(TokenGrid(2, 4, 4), seed=1)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    probe = EnergyProbe(queries=5)
    probe.attend(call)
    probe.attend(call)
    assert torch.equal(torch.rand(1), expected_next)
    (decay,) = probe.results()
    assert decay.queries == 2 * 2 * 2 * 5 and decay.calls == 2
    assert decay.total_mass() == pytest.approx(1.0, abs=1e-6)


def test_energy_plot_writes_a_png(tmp_path):
    from PIL import Image

    probe = EnergyProbe(queries=8)
    probe.attend(_call(TokenGrid(3, 4, 4)))
    probe.attend(_call(TokenGrid(1, 5, 6), text=2))
    decays = {f"m{i}": d for i, d in enumerate(probe.results())}
    path = plot_energy_decay(decays, tmp_path / "sub" / "decay.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width == 1200
        colors = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colors) > 10  # lines, text and grid were drawn, not a blank canvas


# ---- demo options ----------------------------------------------------------------------------------------------

def test_demo_options_fit_the_demo_grids():
    from diffattn.methods.freeswim import FreeSwimConfig, FreeSwimMethod

    video = Geometry("wan", TokenGrid(17, 16, 16), steps=30, num_layers=6)
    radial = demo_options("radial", video)
    assert radial == {"block_size": 64, "dense_timesteps": 7}  # 4 blocks per 256-token frame; 12/50 of 30 steps
    assert demo_options("gna", video) == {"kernel_size": (9, 9, 9)}
    fs = demo_options("freeswim", video)
    assert FreeSwimMethod(FreeSwimConfig.from_options(**fs)).window(video.grid) == (17, 9, 9)
    assert demo_options("softpag", video) == {"heads": "L3"}
    demo = Geometry("wan", TokenGrid(5, 32, 32), steps=12, num_layers=6)  # diffattn/pipelines/demo.py's video model
    assert demo_options("radial", demo) == {"block_size": 128, "dense_timesteps": 3}
    assert demo_options("gna", demo) == {"kernel_size": (3, 17, 17)}
    fs = demo_options("freeswim", demo)
    assert FreeSwimMethod(FreeSwimConfig.from_options(**fs)).window(demo.grid) == (5, 17, 17)
    image = Geometry("sd3", TokenGrid(1, 64, 64), steps=30, num_layers=8)
    assert demo_options("gna", image) == {"kernel_size": (33, 33)}
    assert demo_options("dense", image) == {}
    assert demo_options("radial", video, {"block_size": 32})["block_size"] == 32
    with pytest.raises(ValueError, match="block_size"):
        demo_options("radial", video, {"block_size": 48})


def test_method_opt_parsing():
    opts = parse_method_opts(["radial:block_size=32", "gna:kernel_size=5,7,7", "radial:decay_factor=0.5"])
    assert opts == {"radial": {"block_size": 32, "decay_factor": 0.5}, "gna": {"kernel_size": (5, 7, 7)}}
    with pytest.raises(ValueError, match="METHOD:key=value"):
        parse_method_opts(["radial.block_size=32"])
    with pytest.raises(ValueError, match="unknown method"):
        parse_method_opts(["nope:x=1"])


# ---- the bench end to end --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    from tiny_image_pipelines import build_tiny_sd3_pipeline
    from tiny_pipelines import build_tiny_wan_pipeline

    root = tmp_path_factory.mktemp("quality")
    build_tiny_wan_pipeline(str(root / "wan"))
    build_tiny_sd3_pipeline(str(root / "sd3"))
    return root


def test_bench_end_to_end(tiny_folders, tmp_path, capsys):
    from PIL import Image

    from diffattn.cli import main

    md, js, png = tmp_path / "q.md", tmp_path / "q.json", tmp_path / "img" / "decay.png"
    rc = main([
        "bench", "quality", "--video-model", str(tiny_folders / "wan"), "--image-model", str(tiny_folders / "sd3"),
        "--steps", "2", "--seeds", "0,1", "--video-size", "5x32x48", "--image-size", "24x32",
        "--max-sequence-length", "8", "--warmup", "0", "--prompts", "a red circle", "--device", "cpu",
        "--md", str(md), "--json", str(js), "--plot", str(png), "--no-progress",
    ])
    assert rc == 0
    report = json.loads(js.read_text())
    assert set(report["models"]) == {"video", "image"}
    video, image = report["models"]["video"], report["models"]["image"]
    assert video["family"] == "wan" and image["family"] == "sd3"
    assert list(video["methods"]) == ["dense (reference)", "dense (rerun)", "radial", "rectified", "freeswim", "gna", "softpag"]
    assert list(image["methods"]) == ["dense (reference)", "dense (rerun)", "gna", "agent", "softpag"]
    assert set(image["skipped"]) == {"radial", "rectified", "freeswim", "ficgen"}  # ficgen: UNet only
    for model in (video, image):
        rows = model["methods"]
        assert not [label for label, r in rows.items() if "error" in r]
        rerun = rows["dense (rerun)"]
        assert rerun["psnr"] == ["inf", "inf"] and rerun["psnr_mean"] == "inf"
        assert rerun["ssim_min"] == pytest.approx(1.0, abs=1e-12)
        gna = rows["gna"]  # a window smaller than the grid changes the output
        assert all(isinstance(p, float) and 10 < p < 200 for p in gna["psnr"])
        assert gna["ssim_min"] < 1.0
        assert rows["softpag"]["role"] == "guidance" and isinstance(rows["softpag"]["psnr_mean"], float)
        assert len(gna["seconds"]) == 2 and rows["dense (reference)"]["seconds_median"] > 0
        energy = model["energy"]
        assert energy["total_mass"] == pytest.approx(1.0, abs=1e-5)
        binned = sum(p["mass"] for p in energy["by_temporal"])
        assert binned + energy["text_mass"] == pytest.approx(1.0, abs=1e-5)
        assert sum(p["mass"] for p in energy["by_spatial"]) == pytest.approx(binned, abs=1e-9)
    assert video["grid"] == [2, 2, 3] and image["grid"] == [1, 6, 8]
    assert video["size"] == [5, 32, 48] and image["size"] == [24, 32] and video["steps"] == 2
    assert video["energy"]["text_mass"] == 0 and image["energy"]["text_mass"] > 0
    text = md.read_text()
    assert text.strip() == capsys.readouterr().out.strip()
    assert "| method | options | PSNR dB mean / min | SSIM mean / min | seconds | speed-up vs dense |" in text
    assert "| dense (rerun) |  | inf / inf | 1.0000 / 1.0000 |" in text
    assert "Guidance, not an approximation" in text and "| softpag | heads=L1 |" in text
    assert text.index("Guidance, not an approximation") < text.index("| softpag |")
    assert "temporal distance (frames)" in text and report["device"] in text
    with Image.open(png) as im:
        assert im.format == "PNG"


def test_bench_methods_subset_and_opts(tiny_folders, tmp_path):
    from diffattn.bench.quality import main

    js = tmp_path / "q.json"
    rc = main([
        "--models", "image", "--image-model", str(tiny_folders / "sd3"), "--methods", "gna",
        "--method-opt", "gna:kernel_size=5,5", "--seeds", "3", "--image-size", "24x32",
        "--max-sequence-length", "8", "--warmup", "0", "--device", "cpu", "--plot", "none", "--json", str(js),
        "--no-progress",
    ])
    assert rc == 0
    report = json.loads(js.read_text())
    rows = report["models"]["image"]["methods"]
    assert list(rows) == ["dense (reference)", "dense (rerun)", "gna"]
    assert rows["gna"]["options"] == {"kernel_size": [5, 5]}
    assert "plot" not in report
    # No --steps: the pipeline's default (StableDiffusion3Pipeline: 28), read back from the dense run.
    assert report["steps"] == "pipeline default" and report["models"]["image"]["steps"] == 28
    assert report["models"]["image"]["size"] == [24, 32]


def test_bench_errors_are_one_line(monkeypatch, tmp_path, capsys):
    import diffattn.demo
    from diffattn.bench.quality import main

    monkeypatch.setattr(diffattn.demo, "assets_dir", lambda: tmp_path)
    assert main(["--models", "video", "--no-progress"]) == 2
    assert "demo model is missing" in capsys.readouterr().err
    assert main(["--models", "audio"]) == 2
    assert "--models" in capsys.readouterr().err
    assert main(["--models", "image", "--image-model", str(tmp_path), "--methods", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["--models", "image", "--image-model", str(tmp_path), "--methods", "gna",
                 "--method-opt", "radial:block_size=32"]) == 2
    assert "not among --methods" in capsys.readouterr().err
