"""`diffattn bench e2e` end to end on the tiny Wan pipeline (CPU): stages, per-step kinds, the projection's
arithmetic, PSNR against the first variant, variant parsing."""

from __future__ import annotations

import math

import pytest

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
