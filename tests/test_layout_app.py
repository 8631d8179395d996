"""The app's Layout tab: the handler on a tiny UNet demo pipeline, and in Debian's Chromium through Playwright: draw
two boxes on the canvas, generate (training-free and trained), boxes over the result, files. Screenshots go to
test-artifacts/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffattn.layout import Layout, LayoutError


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from diffattn.methods.ficgen_modules import FICGenModules, save_modules
    from diffattn.pipelines.demo_unet import DemoUNetConfig, build_demo_unet_pipeline

    root = tmp_path_factory.mktemp("layout-app")
    pipe = build_demo_unet_pipeline(DemoUNetConfig(size=32, channels=(32, 64), layers_per_block=1))
    pipe.save_pretrained(str(root / "unet"))
    save_modules(FICGenModules.for_unet(pipe.unet, "mid,up1", reference_size=16, encoder_width=4), root / "weights")
    return root


def test_handler_writes_image_boxes_sidecar_and_layout(models, tmp_path):
    from diffattn.app.layout_tab import generate_layout, parse_layout_text
    from diffattn.app.runner import PipelineCache, Runner

    runner = Runner(tmp_path, device="cpu", dtype="fp32", cache=PipelineCache(1))
    layout = Layout.from_dict({"instances": [{"phrase": "a red circle", "box": [0.1, 0.1, 0.5, 0.5]}]})
    res = generate_layout(runner, model=str(models / "unet"), prompt="a red circle on a gray background",
                          layout=layout, steps=2)
    sidecar = json.loads(Path(res.sidecar).read_text())
    assert sidecar["layout"] == layout.to_dict() and sidecar["attn"] == "ficgen" and sidecar["variant"] == "training-free"
    assert Layout.load(res.layout_path) == layout and Path(res.boxed_path).is_file() and res.pixels.shape == (128, 128, 3)
    with pytest.raises(ValueError, match="folder of the trained FICGen modules"):
        generate_layout(runner, model=str(models / "unet"), prompt="x", layout=layout, variant="trained", weights="")
    with pytest.raises(LayoutError, match="draw at least one box|at least one instance"):
        parse_layout_text('{"instances": []}')
    with pytest.raises(ValueError, match="empty"):
        parse_layout_text("")


@pytest.fixture(scope="module")
def app(models):
    from app_server import AppServer

    server = AppServer(str(models / "unet"), str(models / "unet"), str(models / "out"), str(models / "app.log"))
    try:
        server.wait()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser():
    from app_server import CHROMIUM_ARGS, require_chromium
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=require_chromium(), headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _drag(page, canvas, x0, y0, x1, y1):
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + x0 * box["width"], box["y"] + y0 * box["height"])
    page.mouse.down()
    page.mouse.move(box["x"] + (x0 + x1) / 2 * box["width"], box["y"] + (y0 + y1) / 2 * box["height"], steps=3)
    page.mouse.move(box["x"] + x1 * box["width"], box["y"] + y1 * box["height"], steps=3)
    page.mouse.up()


def test_draw_two_boxes_and_generate_in_chromium(app, browser, models):
    from app_server import click_and_wait, fill, open_tab, screenshot

    context = browser.new_context(viewport={"width": 1400, "height": 1300})
    page = context.new_page()
    page.set_default_timeout(60000)
    try:
        page.goto(app.url)
        page.wait_for_selector("#video-generate")
        open_tab(page, "Layout")
        page.locator("#layout-clear").click()
        page.wait_for_function("() => JSON.parse(document.querySelector('#layout-json textarea').value).instances.length === 0")
        canvas = page.locator("#layout-canvas")
        fill(page, "layout-phrase", "a red circle")
        _drag(page, canvas, 0.1, 0.1, 0.45, 0.5)
        fill(page, "layout-phrase", "a blue square")
        _drag(page, canvas, 0.55, 0.5, 0.9, 0.9)
        data = json.loads(page.locator("#layout-json textarea").input_value())
        assert [i["phrase"] for i in data["instances"]] == ["a red circle", "a blue square"]
        b0, b1 = data["instances"][0]["box"], data["instances"][1]["box"]
        assert b0 == pytest.approx([0.1, 0.1, 0.45, 0.5], abs=0.02) and b1 == pytest.approx([0.55, 0.5, 0.9, 0.9], abs=0.02)
        fill(page, "layout-model", str(models / "unet"))
        fill(page, "layout-prompt", "a red circle and a blue square on a gray background")
        fill(page, "layout-steps", "2")
        text = click_and_wait(page, "layout-generate", "layout-status", timeout_ms=120000)
        assert "ficgen (training-free)" in text and "2 boxes" in text, text
        page.locator("#layout-result img").wait_for()
        assert page.locator("#layout-files a").count() >= 4 or page.locator("#layout-files").inner_text().count(".") >= 4
        screenshot(page, "layout-training-free")
        written = sorted((models / "out").glob("*-layout.json"))
        assert written and Layout.load(written[-1]).phrases == ["a red circle", "a blue square"]
        # the trained variant with the modules folder
        page.get_by_label("trained", exact=True).check()
        fill(page, "layout-weights", str(models / "weights"))
        text = click_and_wait(page, "layout-generate", "layout-status", timeout_ms=120000)
        assert "ficgen (trained)" in text, text
        screenshot(page, "layout-trained")
        # a broken layout is an error in the page
        fill(page, "layout-json", '{"instances": [{"phrase": "", "box": [0, 0, 1, 1]}]}')
        text = click_and_wait(page, "layout-generate", "layout-status")
        assert "non-empty string" in text, text
    finally:
        context.close()


def test_cli_generate_with_layout(models, tmp_path):
    """`diffattn generate --layout layout.json` on the tiny UNet demo pipeline: image + sidecar with the layout;
    a bad layout or another method is a one-line error before the model loads."""
    from diffattn.cli import main

    layout = Layout.from_dict({"instances": [{"phrase": "a red circle", "box": [0.1, 0.1, 0.5, 0.5]}]})
    path = tmp_path / "layout.json"
    layout.save(path)
    out = tmp_path / "out.png"
    assert main(["generate", "--model", str(models / "unet"), "--prompt", "a red circle on a gray background",
                 "--layout", str(path), "--steps", "2", "--out", str(out)]) == 0
    sidecar = json.loads(Path(f"{out}.json").read_text())  # the sidecar is the output's whole name + .json
    assert out.is_file() and sidecar["layout"] == layout.to_dict() and sidecar["attn"] == "ficgen"
    bad = tmp_path / "bad.json"
    bad.write_text('{"instances": [{"phrase": "x", "box": [0.5, 0, 0.2, 1]}]}')
    assert main(["generate", "--model", str(models / "unet"), "--prompt", "x", "--layout", str(bad)]) == 2
    assert main(["generate", "--model", str(models / "unet"), "--prompt", "x", "--layout", str(path),
                 "--attn", "dense"]) == 2
