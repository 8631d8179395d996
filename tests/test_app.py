"""The Gradio app: controls generated from method configs, the runner (model family, cache, difference picture) and,
in a real headless Chromium driven by Playwright, the served app on tiny Wan and SD3 pipelines: generation with
a method, Compare, errors shown in the page, the Mask explorer. Screenshots go to test-artifacts/."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from diffattn.app.controls import (
    DEFAULT_CHOICE,
    control_kind,
    control_value,
    dropdown_choices,
    option_value,
    options_from_values,
)
from diffattn.app.runner import (
    PipelineCache,
    check_method_supports,
    difference,
    methods_for_family,
    model_family,
)

from diffattn.config import OptionSpec
from diffattn.registry import available_methods, get_method


def spec_of(method: str, name: str) -> OptionSpec:
    return next(s for s in get_method(method).config_cls.option_specs() if s.name == name)


# ---- controls from configs (no browser) -----------------------------------------------------------------------
def test_control_kinds_follow_the_declared_types():
    assert control_kind(spec_of("radial", "block_size")) == "dropdown"  # choices
    assert dropdown_choices(spec_of("radial", "block_size")) == ["16", "32", "64", "128"]
    assert control_kind(spec_of("radial", "sink")) == "dropdown"  # bool | None: default / True / False
    assert dropdown_choices(spec_of("radial", "sink")) == [DEFAULT_CHOICE, "True", "False"]
    assert control_kind(spec_of("radial", "decay_factor")) == "textbox"  # float | None: empty box = None
    assert control_kind(spec_of("radial", "dense_last_steps")) == "number"  # int with a default
    assert control_kind(spec_of("freeswim", "dual_path")) == "checkbox"
    assert control_kind(spec_of("gna", "kernel_size")) == "textbox"  # structured
    assert control_kind(spec_of("softpag", "u")) == "number"
    assert dropdown_choices(spec_of("gna", "preset"))[0] == DEFAULT_CHOICE


@pytest.mark.parametrize("method", available_methods())
def test_every_default_round_trips_through_its_widget(method):
    cfg = get_method(method).config_cls
    for spec in cfg.option_specs():
        assert option_value(cfg, spec, control_value(spec)) == spec.default, spec.name


@pytest.mark.parametrize("method", ["dense", "radial", "freeswim"])
def test_untouched_controls_give_no_options(method):
    specs = get_method(method).config_cls.option_specs()
    assert options_from_values(method, [control_value(s) for s in specs]) == {}


def radial_values(**changed):
    specs = get_method("radial").config_cls.option_specs()
    return [changed.get(s.name, control_value(s)) for s in specs]


def test_widget_values_become_typed_options():
    opts = options_from_values("radial", radial_values(block_size="64", sink="False", decay_factor="0.5",
                                                       dense_timesteps="3", dense_last_steps=2.0))
    assert opts == {"block_size": 64, "sink": False, "decay_factor": 0.5, "dense_timesteps": 3, "dense_last_steps": 2}
    gna = get_method("gna").config_cls
    assert option_value(gna, spec_of("gna", "kernel_size"), "3,5,5") == (3, 5, 5)
    assert option_value(gna, spec_of("gna", "layers"), "0,2") == (0, 2)
    assert option_value(gna, spec_of("gna", "preset"), "flux-4k") == "flux-4k"


def test_bad_values_raise_the_method_message():
    with pytest.raises(ValueError, match=r"decay_factor.*radial.*> 0\.0"):
        options_from_values("radial", radial_values(decay_factor="-1"))
    with pytest.raises(ValueError, match="dense_last_steps"):
        options_from_values("radial", radial_values(dense_last_steps=-2))
    with pytest.raises(ValueError, match="dense_last_steps"):
        options_from_values("radial", radial_values(dense_last_steps=1.5))  # an int option
    with pytest.raises(ValueError, match="kernel_size=.*or preset"):  # gna needs a window or a preset
        options_from_values("gna", [control_value(s) for s in get_method("gna").config_cls.option_specs()])


# ---- runner pieces (no browser) -------------------------------------------------------------------------------
def test_family_filter_and_support_check(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "SD3Transformer2DModel"]}))
    assert model_family(str(folder)) == ("sd3", "SD3Transformer2DModel")
    assert model_family(str(tmp_path / "missing")) == (None, None)
    sd3 = methods_for_family("sd3")
    assert "dense" in sd3 and "gna" in sd3 and "radial" not in sd3 and "freeswim" not in sd3
    assert methods_for_family(None) == available_methods()
    with pytest.raises(ValueError, match="radial.*does not support.*sd3"):
        check_method_supports("radial", "sd3")


def test_pipeline_cache_loads_once_per_key_and_drops_the_oldest():
    calls = []
    cache = PipelineCache(capacity=2, loader=lambda model, dtype, device: calls.append((model, device, dtype)) or model)
    assert cache.get("a", "cpu", "fp32")[0] == "a"
    cache.get("a", "cpu", "fp32")
    cache.get("b", "cpu", "fp32")
    cache.get("a", "cpu", "bf16")  # another dtype is another pipeline; "a"/fp32 is now the oldest... but was used
    cache.get("a", "cpu", "fp32")
    assert calls == [("a", "cpu", "fp32"), ("b", "cpu", "fp32"), ("a", "cpu", "bf16"), ("a", "cpu", "fp32")]


def test_difference_numbers_and_picture():
    a = np.zeros((2, 4, 4, 3), np.float32)
    b = a.copy()
    b[:, 1, 2, 0] = 0.5  # one pixel differs by 0.5 in one channel in both frames
    d = difference(a, b, min_side=8)
    assert d.max_abs == pytest.approx(0.5)
    assert d.mean_abs == pytest.approx(0.5 * 2 / a.size)
    assert d.psnr_db == pytest.approx(10 * np.log10(1 / (0.25 * 2 / a.size)))
    assert d.image.shape == (8, 8, 3) and d.image.dtype == np.uint8
    assert d.image[2:4, 4:6, :2].min() == 255 and d.image[0:2, 0:2].max() == 0  # the differing pixel is the bright one
    assert difference(a, a).psnr_db == float("inf")
    with pytest.raises(ValueError, match="different shapes"):
        difference(a, a[:1])


def test_missing_demo_model_gives_the_training_hint(tmp_path, monkeypatch):
    from diffattn.app import runner

    from diffattn import demo

    monkeypatch.setattr(demo, "assets_dir", lambda: tmp_path)
    monkeypatch.setattr(runner, "assets_dir", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match="demo model is missing.*demo_train"):
        runner.resolve_model(runner.default_model("video"))


def test_mask_tab_option_parsing():
    from diffattn.app.mask_tab import mask_options_from_values, parse_grid

    assert parse_grid("21,45,80") == (21, 45, 80) and parse_grid("64x64") == (64, 64) and parse_grid(" ") is None
    with pytest.raises(ValueError, match="custom grid"):
        parse_grid("a,b")
    entries = [("decay_factor", None, spec_of("radial", "decay_factor")), ("block_size", None, spec_of("radial", "block_size"))]
    assert mask_options_from_values("radial", entries, ("0.5", "128")) == {"decay_factor": 0.5}


# ---- the served app in Chromium -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    from app_server import AppServer
    from tiny_image_pipelines import build_tiny_sd3_pipeline
    from tiny_pipelines import build_tiny_wan_pipeline

    root = tmp_path_factory.mktemp("app")
    build_tiny_wan_pipeline(str(root / "wan"))
    build_tiny_sd3_pipeline(str(root / "sd3"))
    server = AppServer(str(root / "wan"), str(root / "sd3"), str(root / "out"), str(root / "app.log"))
    try:
        server.wait()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser():
    from app_server import CHROMIUM_ARGS, require_chromium
    from playwright.sync_api import sync_playwright

    executable = require_chromium()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, app_url):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(30000)
    pg.goto(app_url.url)
    pg.wait_for_selector("#video-generate")
    yield pg
    context.close()


TINY_VIDEO = {"steps": "2", "height": "32", "width": "48", "frames": "5"}


def fill_settings(page, prefix, values):
    from app_server import fill

    for name, value in values.items():
        fill(page, f"{prefix}-{name}", value)


def sidecar(path_text: str) -> dict:
    return json.loads(Path(path_text).read_text())


def test_video_tab_generates_with_a_method_then_shows_a_bad_option(page, app_url):
    from app_server import choose, click_and_wait, fill, screenshot

    assert "wan" in page.locator("#video-family").inner_text()
    choose(page, "video-method", "radial")
    page.locator("#video-opt-radial-decay_factor").wait_for(state="visible")  # radial's generated controls
    page.locator("#video-opt-dense").wait_for(state="hidden") if page.locator("#video-opt-dense").count() else None
    assert "Radial Attention" in page.locator("#video-summary").inner_text()
    assert not page.locator("#video-opt-gna-kernel_size").is_visible()
    assert "> 0.0 and <= 16.0" in page.locator("#video-opt-radial-decay_factor").inner_text()  # range in the help
    choose(page, "video-opt-radial-block_size", "16")
    fill_settings(page, "video", TINY_VIDEO)
    text = click_and_wait(page, "video-generate", "video-status")
    screenshot(page, "video-radial")
    assert "radial:" in text and " s (5 frames of 48x32" in text, text
    src = page.locator("#video-result video").get_attribute("src")
    assert src and ".mp4" in src
    files = page.locator("#video-files").inner_text()
    assert ".mp4" in files and ".json" in files
    sidecars = [sidecar(p) for p in Path(app_url.out_dir).glob("*radial*.json")]
    assert any(s["attn"] == "radial" and s["attn_options"] == {"block_size": 16} and s["output"]["frames"] == 5
               for s in sidecars), sidecars

    fill(page, "video-opt-radial-decay_factor", "-1")
    text = click_and_wait(page, "video-generate", "video-status")
    screenshot(page, "video-bad-option")
    assert "Error:" in text and "decay_factor" in text and "> 0.0" in text, text
    assert page.locator("#video-generate").is_enabled()  # the page still works


def test_image_tab_generates_and_a_missing_model_is_an_error_in_the_page(page):
    from app_server import click_and_wait, dropdown_options, fill, open_tab, screenshot

    open_tab(page, "Image")
    assert "sd3" in page.locator("#image-family").inner_text()
    options = dropdown_options(page, "image-method")
    assert "radial" not in options and "freeswim" not in options and "gna" in options, options  # family filter
    fill_settings(page, "image", {"steps": "2", "height": "32", "width": "32"})
    text = click_and_wait(page, "image-generate", "image-status")
    screenshot(page, "image-dense")
    assert "dense:" in text and "32x32" in text, text
    assert page.locator("#image-result img").count() == 1

    fill(page, "image-model", "/no/such/model/folder")
    text = click_and_wait(page, "image-generate", "image-status")
    assert "Error:" in text and "does not exist" in text, text


def test_compare_tab_shows_both_results_times_and_difference(page):
    from app_server import (
        choose,
        click_and_wait,
        fill,
        open_tab,
        screenshot,
        status_text,
    )

    open_tab(page, "Compare")
    choose(page, "compare-method", "radial")
    choose(page, "compare-opt-radial-block_size", "16")
    fill(page, "compare-opt-radial-dense_timesteps", "0")  # sparse from the first step, so the results differ
    fill(page, "compare-opt-radial-dense_layers", "0")
    # 9 frames of 64x96: a 3x4x6 token grid, 5 blocks of 16 tokens, of which radial keeps 64%
    fill_settings(page, "compare", {**TINY_VIDEO, "frames": "9", "height": "64", "width": "96"})
    text = click_and_wait(page, "compare-run", "compare-status", timeout_ms=90000)
    screenshot(page, "compare")
    assert "radial vs dense" in text and "PSNR" in text, text
    max_diff = float(text.split("max |diff| ")[1].split(",")[0])
    assert max_diff > 0.01, text  # a sparse mask changes the video (float noise would be ~1e-6)
    assert page.locator("#compare-dense-video video").count() == 1
    assert page.locator("#compare-method-video video").count() == 1
    assert "dense:" in status_text(page, "compare-dense-time")
    assert "radial:" in status_text(page, "compare-method-time")
    assert page.locator("#compare-diff img").count() == 1


def test_mask_explorer_shows_picture_density_and_speedup(page):
    from app_server import choose, click_and_wait, fill, open_tab, screenshot

    open_tab(page, "Mask explorer")
    choose(page, "mask-method", "radial")
    fill(page, "mask-custom", "8,16,16")
    text = click_and_wait(page, "mask-show", "mask-numbers")
    screenshot(page, "mask-radial")
    assert "density" in text and "speed-up" in text and "8x16x16" in text, text
    assert page.locator("#mask-image img").count() == 1

    fill(page, "mask-opt-radial-decay_factor", "-1")
    text = click_and_wait(page, "mask-show", "mask-numbers")
    assert "Error:" in text and "decay_factor" in text, text

    # gna at a named geometry: its own generated controls, the geometry from the dropdown
    choose(page, "mask-method", "gna")
    page.locator("#mask-opt-gna-kernel_size").wait_for(state="visible")
    assert not page.locator("#mask-opt-radial-decay_factor").is_visible()
    fill(page, "mask-custom", "")
    page.locator("#mask-geometry input").click()
    page.locator('li[role="option"][aria-label^="demo-video:"]').click()
    fill(page, "mask-opt-gna-kernel_size", "5,7,7")
    text = click_and_wait(page, "mask-show", "mask-numbers")
    screenshot(page, "mask-gna")
    assert text.startswith("gna at demo-video (5x32x32 tokens): density"), text  # the model's grid, from its config
    assert '"kernel_size":"5x7x7"' in page.locator("#mask-info").inner_text().replace("\n", "").replace(" ", "")


def test_runner_reports_each_step_and_writes_file_and_sidecar(tmp_path):
    from diffattn.app.runner import Runner, Settings
    from tiny_pipelines import build_tiny_wan_pipeline

    build_tiny_wan_pipeline(str(tmp_path / "wan"))
    runner = Runner(tmp_path / "out", device="cpu", dtype="fp32")
    seen = []
    settings = Settings(str(tmp_path / "wan"), "a red circle", "radial", {"block_size": 16}, steps=3, height=32,
                        width=48, frames=5)
    gen = runner.generate(settings, lambda fraction, desc: seen.append((round(fraction, 3), desc)))
    assert seen[0][1].startswith("loading")
    assert seen[1:] == [(0.333, "step 1/3"), (0.667, "step 2/3"), (1.0, "step 3/3")]
    assert gen.kind == "video" and gen.pixels.shape == (5, 32, 48, 3) and Path(gen.path).suffix == ".mp4"
    record = sidecar(gen.sidecar)
    assert record["attn"] == "radial" and record["attn_options"] == {"block_size": 16} and record["steps"] == 3
    runner.generate(Settings(str(tmp_path / "wan"), "a red circle", None, steps=1, height=32, width=48, frames=5))
    assert runner.cache.loads == 1  # the second run reuses the loaded pipeline
    with pytest.raises(ValueError, match="softpag.*heads"):  # validated before anything runs
        runner.generate(Settings(str(tmp_path / "wan"), "a red circle", "softpag", {}))


def test_two_users_at_once_both_get_their_result(browser, app_url):
    """The queue runs one generation at a time; two pages clicking together both get a result, each its own."""
    from app_server import status_text

    pages = []
    for seed in ("1", "2"):
        context = browser.new_context(viewport={"width": 1200, "height": 900})
        pg = context.new_page()
        pg.goto(app_url.url)
        pg.wait_for_selector("#video-generate")
        fill_settings(pg, "video", {**TINY_VIDEO, "seed": seed})
        pages.append(pg)
    for pg in pages:
        pg.locator("#video-generate").click()
    texts = []
    for pg in pages:
        pg.wait_for_selector("#video-status .diffattn-ok:has-text('dense:'), #video-status .diffattn-error",
                             timeout=60000)
        texts.append(status_text(pg, "video-status"))
        assert pg.locator("#video-result video").count() == 1
    assert all(t.startswith("dense:") for t in texts), texts
    sources = [pg.locator("#video-result video").get_attribute("src") for pg in pages]
    assert sources[0] != sources[1]
    for pg in pages:
        pg.context.close()


def test_compare_on_the_image_model_shows_images(page):
    from app_server import (
        choose,
        click_and_wait,
        dropdown_options,
        fill,
        open_tab,
        screenshot,
    )

    open_tab(page, "Compare")
    page.locator("#compare-use-image").click()
    page.wait_for_function("() => document.querySelector('#compare-model textarea').value.endsWith('sd3')")
    assert dropdown_options(page, "compare-method") == [m for m in methods_for_family("sd3") if m != "dense"]
    choose(page, "compare-method", "gna")
    fill(page, "compare-opt-gna-kernel_size", "3,3")
    fill_settings(page, "compare", {"steps": "2", "height": "64", "width": "64"})
    text = click_and_wait(page, "compare-run", "compare-status")
    screenshot(page, "compare-image")
    assert "gna vs dense" in text, text
    assert page.locator("#compare-dense-image img").count() == 1 and page.locator("#compare-method-image img").count() == 1
    assert not page.locator("#compare-dense-video").is_visible()
    assert not page.locator("#compare-frames").is_visible()  # video-only settings hidden for the image model
