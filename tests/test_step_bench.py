"""`diffattn bench step` pieces that run without a GPU: the pipeline schedule (step index advancing through
`cache_context`, whole FreeSwim cache periods, CFG passes), variant parsing, option handling and the tables."""

from __future__ import annotations

import statistics

import pytest
import tiny
import torch

import diffattn
from diffattn.bench import step as step_bench

# base 32x48 pixels with VAE 8 and patch 2: window (T, 3, 3) on tiny Wan's 3x5x7 token grid
BASE = {"base_height": 32, "base_width": 48}


@pytest.fixture(scope="module")
def wan():
    model, make_inputs = tiny.tiny_wan()
    model.requires_grad_(False)
    cond = make_inputs(1, torch.Generator().manual_seed(1))
    uncond = make_inputs(1, torch.Generator().manual_seed(2))
    return model, cond, uncond


@pytest.mark.parametrize("cache_steps,device", [(3, "cpu"), (2, "same")])
def test_freeswim_periods_follow_the_pipeline_schedule(wan, cache_steps, device):
    model, cond, uncond = wan
    options = {**BASE, "cache_steps": cache_steps, "cache_device": device}
    r = step_bench.time_pipeline(model, cond, uncond, "freeswim", "freeswim", options, periods=2, num_steps=50)
    # each period: the full branch on its first step, the cache reused on the others; uncond is the window alone
    period = [["dual", "window"]] + [["cached", "window"]] * (cache_steps - 1)
    assert r.period == cache_steps
    assert r.schedule == period * 2
    assert set(r.forwards) == {"dual", "cached", "window"}
    # per-step time = a whole period's forwards / its steps, median over periods; cond-only counts the first pass
    sums = [sum(sum(t) for t in r.step_times[p * cache_steps:(p + 1) * cache_steps]) / cache_steps for p in (0, 1)]
    conds = [sum(t[0] for t in r.step_times[p * cache_steps:(p + 1) * cache_steps]) / cache_steps for p in (0, 1)]
    assert r.step_s == pytest.approx(statistics.median(sums))
    assert r.cond_step_s == pytest.approx(statistics.median(conds))
    # the cache holds one [1, tokens, dim] cross-attention output per layer, where it was asked to live
    tokens, dim, layers = 3 * 5 * 7, model.config.num_attention_heads * model.config.attention_head_dim, 2
    assert r.cache_bytes == layers * tokens * dim * 4
    assert r.cache_device == "cpu"
    assert r.peak_bytes is None  # CPU run: no CUDA memory statistics
    assert diffattn.api.installed(model) is None  # removed afterwards


def test_the_cache_does_not_outlive_the_generation(wan):
    """After the last step's conditional pass nothing reads the cache: FreeSwim frees it there (the method object
    itself may live on, e.g. in a reference cycle after `remove`, until the garbage collector runs)."""
    model, cond, uncond = wan
    options = {**BASE, "cache_steps": 2}
    r = step_bench.time_pipeline(model, cond, uncond, "freeswim", "freeswim", options, periods=1, num_steps=5)
    assert r.schedule == [["dual", "window"], ["cached", "window"]] and r.cache_bytes > 0  # steps 2, 3 of 5
    r = step_bench.time_pipeline(model, cond, uncond, "freeswim", "freeswim", options, periods=1, num_steps=4)
    assert r.schedule == [["dual", "window"], ["cached", "window"]] and r.cache_bytes == 0  # steps 2, 3 of 4


def test_no_cache_is_held_when_every_step_runs_the_full_branch(wan):
    model, cond, _ = wan
    r = step_bench.time_pipeline(model, cond, None, "freeswim", "freeswim", {**BASE, "cache_steps": 1}, periods=2)
    assert r.schedule == [["dual"], ["dual"]]
    assert r.cache_bytes == 0
    assert r.cond_step_s == pytest.approx(r.step_s)


def test_dense_variant(wan):
    model, cond, uncond = wan
    r = step_bench.time_pipeline(model, cond, uncond, "dense-cudnn", "freeswim", {}, periods=1)
    assert r.period == 1 and r.schedule == [["dense", "dense"]] and r.cache_bytes == 0
    assert r.attention_s > 0 and r.cross_s > 0


def test_variants_and_options():
    assert step_bench.parse_variant("freeswim", "cache_steps=2 cache_device=cpu") == {
        "cache_steps": 2, "cache_device": "cpu"
    }
    with pytest.raises(ValueError, match="key=value"):
        step_bench.parse_variant("freeswim", "cache_steps")
    with pytest.raises(ValueError, match="unknown option 'window'"):
        step_bench.parse_variant("freeswim", "window=3")
    # methods without a dense warm-up option keep their options as given (FreeSwim has none to switch off)
    assert step_bench.method_options("freeswim", {"cache_steps": 2}) == {"cache_steps": 2}
    assert step_bench.method_options("radial", {})["dense_timesteps"] == 0
    assert step_bench.schedule_period("freeswim", {"cache_steps": 5}) == 5
    assert step_bench.schedule_period("freeswim", {}) == 2  # the method's default
    assert step_bench.schedule_period("radial", {}) == 1


def test_pipeline_table():
    def res(step, cond, period, forwards, peak, cache=0, where=""):
        return {"step_s": step, "cond_step_s": cond, "period": period, "forwards": forwards, "attention_s": 1.0,
                "cross_s": 0.01, "peak_bytes": peak, "cache_bytes": cache, "cache_device": where}

    report = {
        "model": "wan2.1-1.3b", "method": "freeswim", "settings": {}, "device": "GPU", "torch": "x", "date": "d",
        "mode": "pipeline", "cfg": True, "steps": 50,
        "shapes": [{
            "shape": "1088x1920x81", "tokens": 171360,
            "results": {
                "dense-cudnn": res(20.0, 10.0, 1, {"dense": 10.0}, 20 * 2**30),
                "freeswim cache_steps=2": res(10.0, 6.0, 2, {"dual": 9.0, "cached": 3.0, "window": 4.0}, 2**34,
                                              2**33, "cpu"),
            },
        }],
    }
    e = report["shapes"][0]
    e["projected"] = {k: 50 * v["step_s"] for k, v in e["results"].items()}
    e["speedup"] = {k: 20.0 / v["step_s"] for k, v in e["results"].items()}
    e["speedup_cond_only"] = {k: 10.0 / v["cond_step_s"] for k, v in e["results"].items()}
    text = step_bench.render(report)
    row = next(line for line in text.splitlines() if "freeswim cache_steps=2" in line)
    assert "| 2.00x | 1.67x |" in row and "| 16.0 (—) | 8.0 (cpu) | 500 |" in row
    assert "dual 9.00, cached 3.00, window 4.00" in row


def test_cli_needs_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert step_bench.main(["--shape", "480x832x81", "--method", "freeswim", "--pipeline"]) == 2
    assert "CUDA" in capsys.readouterr().err


TINY_WAN = {
    "class": "WanTransformer3DModel",
    "config": {
        "patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 16,
        "out_channels": 16, "text_dim": 24, "freq_dim": 16, "ffn_dim": 48, "num_layers": 2, "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None, "added_kv_proj_dim": None,
        "rope_max_seq_len": 64,
    },
    "vae": (4, 8),
    "text_len": 7,
    "text_dim": 24,
}


def test_run_end_to_end_on_cpu(monkeypatch, tmp_path):
    """The whole `run` (bf16 tiny Wan on the CPU): pipeline mode with dense and two FreeSwim variants, then the
    bare-forward mode with gna, and the JSON report."""
    import json

    monkeypatch.setitem(step_bench.MODELS, "tiny-wan", TINY_WAN)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "cpu")
    out = tmp_path / "r.json"
    args = step_bench.parse_args([
        "--model", "tiny-wan", "--shape", "64x112x9", "--method", "freeswim", "--pipeline", "--dense", "cudnn",
        "--opt", "base_height=32", "--opt", "base_width=48", "--variant", "cache_steps=2 cache_device=cpu",
        "--variant", "cache_steps=1", "--repeats", "1", "--json", str(out),
    ])
    report = step_bench.run(args, device="cpu")
    e = report["shapes"][0]
    assert e["grid"] == [3, 4, 7]
    assert list(e["results"]) == ["dense-cudnn", "freeswim cache_steps=2 cache_device=cpu", "freeswim cache_steps=1"]
    two = e["results"]["freeswim cache_steps=2 cache_device=cpu"]
    assert two["schedule"] == [["dual", "window"], ["cached", "window"]] and two["cache_device"] == "cpu"
    assert e["results"]["freeswim cache_steps=1"]["schedule"] == [["dual", "window"]]
    assert e["speedup"]["dense-cudnn"] == 1.0
    assert json.loads(out.read_text())["shapes"][0]["results"].keys() == e["results"].keys()
    assert "freeswim cache_steps=1" in step_bench.render(report)

    with pytest.raises(SystemExit):  # freeswim's schedule needs --pipeline
        step_bench.parse_args(["--shape", "64x112x9", "--method", "freeswim"])
    args = step_bench.parse_args([
        "--model", "tiny-wan", "--shape", "64x112x9", "--method", "gna", "--opt", "kernel_size=3,3,3",
        "--dense", "cudnn", "--repeats", "1",
    ])
    report = step_bench.run(args, device="cpu")
    e = report["shapes"][0]
    assert list(e["results"]) == ["dense-cudnn", "gna"]
    err = e["errors"]["self-attention video queries"]
    assert 0 < err < 2  # a 3x3x3 window on a 3x4x7 grid differs from dense, but is no garbage
    assert "| gna |" in step_bench.render(report)
