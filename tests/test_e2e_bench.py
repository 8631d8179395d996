"""`diffattn bench e2e` end to end on the tiny Wan pipeline (CPU): stages, per-step kinds, the projection's
arithmetic, PSNR against the first variant, variant parsing."""

from __future__ import annotations

import math

import pytest
import torch

from diffattn.bench import e2e as e2e_bench
from diffattn.bench.e2e import E2ESettings, parse_variant, project

RADIAL = "radial:block_size=16,dense_layers=0"


@pytest.fixture(scope="module")
def report():
    settings = E2ESettings(model="tiny", device="cpu", steps=4, target_steps=50, height=64, width=96, frames=9,
                           variants=("stock", "dense", RADIAL, RADIAL + "+fbc:threshold=10.0"))
    return e2e_bench.run(settings)


def test_rows_stages_and_psnr(report):
    rows = {r["variant"]: r for r in report["rows"]}
    assert list(rows) == ["stock", "dense", RADIAL, RADIAL + "+fbc:threshold=10.0"]
    for r in rows.values():
        assert set(r["stages"]) == set(e2e_bench.STAGES), r["stages"].keys()
        staged = sum(st["seconds"] for st in r["stages"].values())
        assert staged <= r["wall_s"] + 1e-3 and staged >= 0.8 * r["wall_s"]
        assert len(r["steps"]) == 4 and all(s["forwards"] == 2 for s in r["steps"]), "CFG: two forwards per step"
        assert r["finite"]
    assert rows["stock"]["psnr_db"] == math.inf and rows["dense"]["psnr_db"] == math.inf, "dense is stock on CPU"
    assert math.isfinite(rows[RADIAL]["psnr_db"])
    # radial's 12 of 50 dense warm-up steps, scaled to 1 of 4 in the short run
    assert rows[RADIAL]["options"]["radial"]["dense_timesteps"] == 1
    assert [s["dense"] for s in rows[RADIAL]["steps"]] == [True, False, False, False]
    assert rows[RADIAL]["projection"]["dense_steps"] == 12
    cached = [s["cached"] for s in rows[RADIAL + "+fbc:threshold=10.0"]["steps"]]
    assert not cached[0] and any(cached[1:]), "FirstBlockCache at threshold 10 must skip after the first step"
    assert not any(s["cached"] for s in rows[RADIAL]["steps"])


def test_projection_arithmetic():
    steps = [
        {"seconds": 2.0, "dense": True, "cached": False},
        {"seconds": 1.0, "dense": False, "cached": False},
        {"seconds": 1.2, "dense": False, "cached": False},
        {"seconds": 0.1, "dense": False, "cached": True},
    ]
    p = project(steps, dense_at_target={0, 1}, target=10)
    # cached share 1/4: dense steps 2 -> round(0.5) = 0 cached; sparse 8 -> 2 cached, 6 full at median 1.1
    assert p["cached_share"] == 0.25
    assert p["denoise_s"] == pytest.approx(2 * 2.0 + 2 * 0.1 + 6 * 1.1)
    assert not p["substituted"]
    q = project(steps[:1], dense_at_target={0}, target=3)
    assert q["denoise_s"] == pytest.approx(3 * 2.0) and "sparse/full" in q["substituted"]


@pytest.mark.parametrize(
    "text,word",
    [("radial+fbc+pab", "two caches"), ("stock:x=1", "no options"), ("stock+radial", "cannot be combined"),
     ("freeswim+fbc", "cannot be combined with a Diffusers cache"), ("radial:block", "key=value"),
     ("nonesuch", "unknown method")],
)
def test_bad_variants(text, word):
    with pytest.raises(ValueError, match=word):
        parse_variant(text)


def test_cli_prints_the_table(capsys):
    rc = e2e_bench.main(["--model", "tiny", "--device", "cpu", "--steps", "2", "--variants", "stock", RADIAL,
                         "--warmup-steps", "0"])
    out = capsys.readouterr().out
    assert rc == 0 and "| stock |" in out and f"| {RADIAL} |" in out and "50-step projected" in out


@pytest.mark.parametrize("name,option", [("e2e", "--target-steps"), ("prologue", "--whole-step"),
                                         ("freeswim-branch", "--cache-steps")])
def test_bench_help_reaches_the_new_benchmarks(capsys, name, option):
    from diffattn.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: diffattn bench {name}" in out and option in out


def test_cache_rows_record_firstblockcache_decisions(report):
    row = next(r for r in report["rows"] if r["variant"] == RADIAL + "+fbc:threshold=10.0")
    diffs = [st["fbc_diffs"] for st in row["steps"]]
    # one decision per forward (cond, uncond); the first of each cache context has nothing to compare with
    assert all(len(d) == 2 for d in diffs) and diffs[0] == [None, None]
    assert all(isinstance(x, float) and x >= 0 for d in diffs[1:] for x in d)
    assert row["skipped_forwards"] == sum(f["forwards"] - f["last_block"] for f in row["steps"]) > 0
    assert row["cached_steps"] == sum(s["cached"] for s in row["steps"])
    # a cache row is also projected without its cache, from its full steps
    assert "projection_without_cache" in row
    assert row["projection_without_cache"]["cached_share"] == 0.0
    plain = next(r for r in report["rows"] if r["variant"] == RADIAL)
    assert all(d == [] for d in (s["fbc_diffs"] for s in plain["steps"])) and plain["skipped_forwards"] == 0


def test_projection_formula_adds_up(report):
    for row in report["rows"]:
        p = row["projection"]
        assert p["total_s"] == pytest.approx(p["text_s"] + p["decode_s"] + sum(t["count"] * t["median_s"]
                                                                            for t in p["terms"]))
        assert sum(t["count"] for t in p["terms"]) == 50
        assert e2e_bench.formula(p).endswith(f"= {p['total_s']:.1f} s")


def test_projection_borrowed_and_assumed_share():
    steps = [{"seconds": 1.0, "dense": False, "cached": False}, {"seconds": 0.1, "dense": False, "cached": True}]
    # no dense step measured: the lender's dense median, not this row's sparse one
    p = project(steps, dense_at_target={0, 1}, target=4, borrowed={"dense/full": 3.0, "dense/cached": None})
    assert p["substituted"]["dense/full"] == "borrowed"
    assert p["denoise_s"] == pytest.approx(2 * 3.0 * 0.5 + 2 * 0.1 * 0.5 + 1 * 1.0 + 1 * 0.1 + 1 * 0.1 - 0.1)
    q = project(steps, dense_at_target=set(), target=10, cached_share=0.2)
    assert q["cached_share_assumed"] and q["measured_cached_share"] == 0.5
    assert q["denoise_s"] == pytest.approx(2 * 0.1 + 8 * 1.0)


def test_variant_syntax_steps_and_bracketed_options():
    v = parse_variant("gna:kernel_size=(-1,3,5),stride=(1,2,2)+fbc:threshold=0.5@3")
    assert v.methods == ["gna"] and v.options["gna"] == {"kernel_size": (-1, 3, 5), "stride": (1, 2, 2)}
    assert v.cache == "fbc" and v.cache_options == {"threshold": 0.5} and v.steps == 3
    assert parse_variant("stock").steps is None
    with pytest.raises(ValueError, match="step count"):
        parse_variant("stock@0")
    with pytest.raises(ValueError, match="step count"):
        parse_variant("stock@x")


def test_decode_first_borrow_and_failures_are_rows(monkeypatch):
    install = e2e_bench._install

    def failing(pipe, variant, options):  # a method that fails on the device (e.g. out of memory) at its run
        if "gna" in variant.methods:
            raise RuntimeError("gna: simulated failure")
        return install(pipe, variant, options)

    monkeypatch.setattr(e2e_bench, "_install", failing)
    settings = E2ESettings(model="tiny", device="cpu", steps=2, target_steps=50, height=64, width=96, frames=5,
                           decode="first", run_dense_timesteps=0, borrow_dense="stock@1", warmup_size="32x48x5",
                           variants=("stock@1", RADIAL + "@2", "gna:kernel_size=(1,3,3)"))
    report = e2e_bench.run(settings)
    stock, radial, bad = report["rows"]
    assert stock["decoded"] and not radial["decoded"] and radial["decode_from"] == "stock@1"
    assert stock["steps_run"] == 1 and radial["steps_run"] == 2
    assert radial["options"]["radial"]["dense_timesteps"] == 0 and not any(s["dense"] for s in radial["steps"])
    p = radial["projection"]
    assert p["decode_s"] == stock["decode_s"] and p["dense_steps"] == 12
    assert p["substituted"]["dense/full"] == "borrowed"
    assert radial["psnr_db"] is None and math.isfinite(radial["latent_psnr_db"])
    assert radial["speedup_measured"] is None, "different step counts: no measured ratio"
    assert bad["error"] == "RuntimeError: gna: simulated failure"
    assert "failed" in e2e_bench.render(report)


def test_settings_validation_and_presets():
    from diffattn.bench.models import MODELS

    assert e2e_bench.e2e_preset("wan2.1-14b").transformer == MODELS["wan2.1-14b"]["config"]
    s = E2ESettings(model="wan2.1-14b", device="cpu", variants=("stock",))
    assert (s.height, s.width, s.frames) == (720, 1280, 81)
    assert E2ESettings(model="tiny", device="cpu", variants=("stock",), decode="none").decode == "none"
    for bad, word in [({"decode": "some"}, "decode"), ({"assume_cached_share": 1.5}, "assume_cached_share"),
                      ({"borrow_dense": "dense"}, "borrow_dense"), ({"warmup_size": "1x2"}, "HxWxF"),
                      ({"run_dense_timesteps": -1}, "run_dense_timesteps")]:
        with pytest.raises(ValueError, match=word):
            E2ESettings(model="tiny", device="cpu", variants=("stock",), **bad)


def test_random_filler_fills_on_the_given_device():
    from diffattn.bench.highres import RandomFiller

    a, b = torch.empty(300, 7), torch.empty(300, 7)
    RandomFiller(3, pool_size=1000, dtype=torch.float32).fill(a, 0.5)
    filler = RandomFiller(3, pool_size=1000, dtype=torch.float32, device="cpu")
    assert filler.pool.device.type == "cpu"
    filler.fill(b, 0.5)
    assert torch.equal(a, b) and a.std() > 0.3


def test_cache_schedule_follows_taylorseer_rule():
    from types import SimpleNamespace

    from diffusers.hooks.taylorseer_cache import TaylorSeerCacheHook, TaylorSeerState

    # the reference is Diffusers' own decision function, stepped through `total` steps of one cache context
    for before, interval, after, total in [(3, 5, None, 50), (1, 2, None, 7), (2, 3, 9, 12), (0, 4, None, 10)]:
        state = TaylorSeerState()
        hook = TaylorSeerCacheHook(interval, before, torch.float32, SimpleNamespace(get_state=lambda s=state: s), after)
        computed = [hook._measure_should_compute()[0] for _ in range(total)]
        expected = {i for i, c in enumerate(computed) if not c}
        opts = {"cache_interval": interval, "disable_cache_before_step": before, "disable_cache_after_step": after}
        assert e2e_bench.cache_schedule("taylorseer", opts, total) == expected, (before, interval, after)
    assert e2e_bench.cache_schedule("fbc", {"threshold": 0.1}, 50) is None
    assert len(e2e_bench.cache_schedule("taylorseer", {}, 50)) == 37  # Diffusers' defaults: 13 full of 50


def test_projection_with_a_fixed_cache_schedule():
    steps = [{"seconds": 2.0, "dense": True, "cached": False}, {"seconds": 1.0, "dense": False, "cached": False},
             {"seconds": 0.1, "dense": False, "cached": True}]
    # target 6: dense steps {0, 1}; the cache skips {1, 3, 4}: 1 dense cached (substituted by the sparse cached
    # median: a cached step runs no attention), 1 dense full, 2 sparse cached, 2 sparse full
    p = project(steps, dense_at_target={0, 1}, target=6, cached_at_target={1, 3, 4})
    assert p["cached_from_schedule"] and not p["cached_share_assumed"] and p["cached_share"] == 0.5
    assert {t["kind"]: t["count"] for t in p["terms"]} == {"dense/cached": 1, "dense/full": 1, "sparse/cached": 2,
                                                          "sparse/full": 2}
    assert p["denoise_s"] == pytest.approx(0.1 + 2.0 + 2 * 0.1 + 2 * 1.0)
    assert p["substituted"] == {"dense/cached": "substituted"}


def test_taylorseer_rows_and_attention_times():
    ts = "taylorseer:use_lite_mode=True,cache_interval=2,disable_cache_before_step=1"
    settings = E2ESettings(model="tiny", device="cpu", steps=5, target_steps=20, height=64, width=96, frames=5,
                           decode="none", attention_times=True, warmup_steps=0,
                           variants=("stock+" + ts, RADIAL + "+" + ts))
    report = e2e_bench.run(settings)
    for row in report["rows"]:
        ran = [s["step"] for s in row["steps"] if s["cached"]]
        assert ran == row["cache_schedule_run"] == [1, 3], "the measured cached steps follow the hook's rule"
        assert row["projection"]["cached_from_schedule"]
        assert sum(t["count"] for t in row["projection"]["terms"] if "cached" in t["kind"]) == len(
            e2e_bench.cache_schedule("taylorseer", row["cache_options"], 20))
    stock, radial = report["rows"]
    assert all(s["attention_s"] is None for s in stock["steps"]), "stock runs Diffusers' processors: not timed"
    for s in radial["steps"]:
        a = s["attention_s"]
        if s["cached"]:
            assert a["self"] == 0.0 and a["cross"] == 0.0, "a cached step runs no attention"
        else:
            assert 0.0 < a["self_layer0"] < a["self"] < s["seconds"] and a["cross"] > 0.0
    assert "attention per step" in e2e_bench.render(report) and "MISMATCH" not in e2e_bench.render(report)
