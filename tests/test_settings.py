"""`diffattn.settings` without a model run: validation messages, fitting to a pipeline's VAE and patch, the token
grid, limits, and the methods' `effective_options` / `notices` hooks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from diffattn.methods.base import RunPlan
from diffattn.registry import build_method
from diffattn.settings import (
    GenerationSettings,
    Limits,
    SettingError,
    app_box,
    fit_to_pipeline,
    token_grid,
    validate,
)


class FakeVideoPipe:
    """What the settings read from a Wan-like pipeline: VAE factors, the transformer's patch, the call signature."""

    vae_scale_factor_temporal = 4
    vae_scale_factor_spatial = 8

    def __init__(self) -> None:
        self.transformer = SimpleNamespace(config=SimpleNamespace(patch_size=(1, 2, 2)))

    def __call__(self, prompt=None, height=480, width=832, num_frames=81, num_inference_steps=50, guidance_scale=5.0):
        raise AssertionError("not run here")


class FakeImagePipe:
    vae_scale_factor = 8
    default_sample_size = 128

    def __init__(self) -> None:
        self.transformer = SimpleNamespace(config=SimpleNamespace(patch_size=2))

    def __call__(self, prompt=None, height=None, width=None, num_inference_steps=28, guidance_scale=7.0):
        raise AssertionError("not run here")


def test_validate_names_the_setting_in_the_callers_words():
    with pytest.raises(SettingError, match=r"^--max-sequence-length must be an integer >= 1") as info:
        validate(GenerationSettings("a", max_sequence_length=0))
    assert info.value.setting == "max_sequence_length"
    with pytest.raises(SettingError, match=r"^max sequence length must be"):
        validate(GenerationSettings("a", max_sequence_length=0), app_box)
    with pytest.raises(SettingError, match="steps must be an integer"):
        validate(GenerationSettings("a", steps=True))  # a bool is not a step count
    checked = validate(GenerationSettings("  a fox  ", negative_prompt="  ", steps=3))
    assert checked.prompt == "a fox" and checked.negative_prompt is None and checked.steps == 3


def test_fit_rounds_frames_with_a_notice_and_refuses_sizes():
    pipe = FakeVideoPipe()
    fitted = fit_to_pipeline(pipe, GenerationSettings("a", frames=18))
    assert fitted.settings.frames == 17 and fitted.requested == {"frames": 18}
    assert fitted.notices == ["--frames 18 is not 4k+1, which FakeVideoPipe's video VAE needs; generating 17 frames"]
    assert fit_to_pipeline(pipe, GenerationSettings("a", frames=17)).notices == []
    with pytest.raises(SettingError, match="--width 100 is not a multiple of 16 for FakeVideoPipe.*96 or 112"):
        fit_to_pipeline(pipe, GenerationSettings("a", width=100))
    with pytest.raises(SettingError, match="--height 8 is not a multiple of 16.*nearest: 16$"):
        fit_to_pipeline(pipe, GenerationSettings("a", height=8))
    image = fit_to_pipeline(FakeImagePipe(), GenerationSettings("a", frames=5))
    assert image.settings.frames is None and image.notices == ["--frames ignored: FakeImagePipe makes images"]


def test_effective_settings_and_token_grid_fill_in_the_pipeline_defaults():
    video = fit_to_pipeline(FakeVideoPipe(), GenerationSettings("a", steps=4))
    effective = video.effective(FakeVideoPipe())
    assert effective == {"steps": 4, "height": 480, "width": 832, "guidance": 5.0, "frames": 81}
    assert token_grid(FakeVideoPipe(), effective) == (21, 30, 52)  # Wan 480p: 21 x 30 x 52 tokens
    image = fit_to_pipeline(FakeImagePipe(), GenerationSettings("a")).effective(FakeImagePipe())
    assert image["height"] == image["width"] == 1024 and token_grid(FakeImagePipe(), image) == (1, 64, 64)


def test_limits_check_and_validation():
    limits = Limits(max_steps=10, max_frames=17, max_pixels=64 * 64, max_grid_tokens=1000)
    limits.check({"steps": 10, "frames": 17, "height": 64, "width": 64})
    with pytest.raises(SettingError, match="frames 21 is over this server's limit of 17"):
        limits.check({"frames": 21})
    with pytest.raises(SettingError, match="grid 10x10x11 is 1100 tokens, over this server's limit of 1000"):
        limits.check_grid((10, 10, 11))
    with pytest.raises(ValueError, match="limit max_steps must be an integer >= 1"):
        Limits(max_steps=0)


# ---- the methods' hooks ----------------------------------------------------------------------------------------
def test_default_hooks_report_the_config_and_no_notice():
    dense = build_method("dense")
    assert dense.effective_options("wan") == dense.config.to_dict()
    assert dense.notices(RunPlan("wan", 1, (1, 2, 2), 1)) == []


def test_radial_effective_options_are_the_family_defaults_under_the_options():
    from diffattn.methods.radial import FAMILY_DEFAULTS

    radial = build_method("radial", decay_factor=0.5)
    for family in ("wan", "hunyuan_video", "cogvideox"):
        eff = radial.effective_options(family)
        assert eff["decay_factor"] == 0.5
        assert {k: eff[k] for k in ("dense_timesteps", "dense_layers", "sink")} == {
            k: FAMILY_DEFAULTS[family][k] for k in ("dense_timesteps", "dense_layers", "sink")}


def test_radial_notices():
    radial = build_method("radial", block_size=16)
    wan_720p = (21, 45, 80)
    assert radial.notices(RunPlan("wan", 50, wan_720p, 40)) == []
    warm = radial.notices(RunPlan("wan", 12, wan_720p, 40))
    assert len(warm) == 1 and warm[0].startswith("radial: all 12 steps run dense (dense_timesteps=12")
    assert build_method("radial", dense_timesteps=2, dense_last_steps=1).notices(RunPlan("wan", 3, wan_720p, 40))
    assert any("single latent frame" in n for n in radial.notices(RunPlan("wan", 50, (1, 45, 80), 40)))
    assert any("covers all 1 layers" in n for n in radial.notices(RunPlan("wan", 50, wan_720p, 1)))
    assert any("keeps every block" in n for n in radial.notices(RunPlan("wan", 50, (2, 2, 2), 40)))


def test_gna_and_freeswim_notices_for_windows_covering_the_grid():
    gna = build_method("gna", kernel_size=(3, 5, 5))
    assert gna.notices(RunPlan("wan", 10, (21, 30, 52), 30)) == []
    whole = gna.notices(RunPlan("wan", 10, (3, 5, 5), 30))
    assert whole == ["gna: the window 3x5x5 covers the whole 3x5x5 token grid; this is dense attention (no speed-up)"]
    assert build_method("gna", kernel_size=(3, 5, 5), is_causal=(True, False, False)).notices(
        RunPlan("wan", 10, (3, 5, 5), 30)) == []  # causal along time: not dense
    assert build_method("gna", kernel_size=3, dense_timesteps=4).notices(RunPlan("wan", 4, (21, 30, 52), 30))
    freeswim = build_method("freeswim")  # base 480x832: a 31x53 window on Wan
    assert freeswim.notices(RunPlan("wan", 10, (21, 68, 120), 30)) == []  # 1088x1920
    assert "covers the whole 30x52 token grid" in freeswim.notices(RunPlan("wan", 10, (21, 30, 52), 30))[0]
