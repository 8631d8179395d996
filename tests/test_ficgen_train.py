"""FICGen's trainable modules and training entry point on a tiny UNet demo pipeline (real classes, random weights)."""

from __future__ import annotations

import pytest
import torch

import diffattn
from diffattn.api import apply, installed, remove
from diffattn.layout import Layout
from diffattn.methods.ficgen_modules import FICGenModules, load_modules
from diffattn.pipelines.ficgen_train import Trainer, TrainConfig, scene_data, write_card
from diffattn.pipelines.layout import LayoutPipeline, ShapesReferenceBank, build_inputs

SIZES = dict(reference_size=16, encoder_width=4, resampler_depth=1)


@pytest.fixture(scope="module")
def pipe():
    from diffattn.pipelines.demo_unet import DemoUNetConfig, build_demo_unet_pipeline

    return build_demo_unet_pipeline(DemoUNetConfig(size=32, channels=(32, 64), layers_per_block=1))


@pytest.fixture(scope="module")
def bank():
    return ShapesReferenceBank(size=16, scenes=80, image_size=32)


def _trainer(pipe, bank, out, steps, data=None, **cfg):
    config = TrainConfig(steps=steps, batch=2, size=32, lr=3e-3, checkpoint_every=2, **cfg)
    return Trainer(pipe, out, config, data=data, references=bank, device="cpu", module_sizes=SIZES)


def _eval_loss(trainer, step=0):
    apply(trainer.pipe.unet, "ficgen", layers=trainer.cfg.layers, cfg=False)
    installed(trainer.pipe.unet).runtime.attach_modules(trainer.modules)
    try:
        with torch.no_grad():
            return float(trainer.loss_at(step))
    finally:
        remove(trainer.pipe.unet)


def test_loss_falls_on_tiny_data(pipe, bank, tmp_path):
    base = scene_data(32)

    def fixed(batch, g, device):  # the same two scenes every step (timesteps and noise still vary per step)
        return base(batch, torch.Generator().manual_seed(0), device)

    trainer = _trainer(pipe, bank, tmp_path, 24, data=fixed)
    before = _eval_loss(trainer)
    trainer.run()
    after = _eval_loss(trainer)
    assert after < before, (before, after)
    assert all(not p.requires_grad for p in pipe.unet.parameters())  # the UNet stayed frozen


def test_checkpoint_resume_is_exact(pipe, bank, tmp_path):
    straight = _trainer(pipe, bank, tmp_path / "a", 4)
    straight.run()
    first = _trainer(pipe, bank, tmp_path / "b", 2)
    first.run()
    resumed = _trainer(pipe, bank, tmp_path / "b", 4, workers=2)  # prefetching data workers draw the same batches
    assert resumed.step == 2
    resumed.run()
    assert [e["loss"] for e in resumed.log] == [e["loss"] for e in straight.log]
    for (name, a), (_, b) in zip(straight.modules.state_dict().items(), resumed.modules.state_dict().items()):
        assert torch.equal(a, b), name


def test_saved_weights_reload_and_apply(pipe, bank, tmp_path):
    trainer = _trainer(pipe, bank, tmp_path, 2)
    record = trainer.run()
    folder = trainer.export(tmp_path / "export")
    write_card(folder, {**record, "training": {"layers": "mid,up1"}})
    loaded = load_modules(folder)
    for name, value in trainer.modules.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value.half().float(), atol=0, rtol=0)
    size = sum(p.stat().st_size for p in (tmp_path / "export").glob("ficgen_modules.*"))
    assert size < 3 * 2**20
    layout = Layout.from_dict({"instances": [{"phrase": "a red circle at the top left", "box": [0.05, 0.05, 0.4, 0.4]},
                                             {"phrase": "a blue square on the right", "box": [0.6, 0.3, 0.95, 0.7]}]})
    prompt = "a red circle at the top left and a blue square on the right on a gray background"
    kwargs = dict(num_inference_steps=2, output_type="latent", height=32, width=32)
    stock = pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs).images
    through_option = LayoutPipeline(pipe, weights=str(folder), references=bank)(
        prompt, layout, generator=torch.Generator().manual_seed(0), **kwargs).images
    free = LayoutPipeline(pipe)(prompt, layout, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (through_option - stock).abs().max() > 1e-5 and (through_option - free).abs().max() > 1e-5
    # diffattn.apply(pipe, "ficgen", weights=...) with the layout option gives the same as attaching the modules
    diffattn.apply(pipe, "ficgen", layout=layout, weights=str(folder))
    try:
        via_apply = pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs).images
    finally:
        diffattn.remove(pipe)
    diffattn.apply(pipe, "ficgen", layout=layout)
    installed(pipe.unet).runtime.attach_modules(loaded)
    try:
        via_attach = pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs).images
    finally:
        diffattn.remove(pipe)
    torch.testing.assert_close(via_apply, via_attach)
    assert torch.equal(pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs).images, stock)


def test_modules_shapes_and_errors(pipe, bank):
    modules = FICGenModules.for_unet(pipe.unet, "mid,up1", **SIZES)
    assert set(modules.cfg.layers) == {p for p in modules.cfg.layers if ("mid_block" in p or "up_blocks.1" in p)}
    with pytest.raises(ValueError, match="no cross-attention layer"):
        FICGenModules.for_unet(pipe.unet, "down3")
    layouts = [Layout.from_dict({"instances": [{"phrase": "a red circle", "box": [0, 0, 0.5, 0.5]}]}),
               Layout.from_dict({"instances": [{"phrase": "a green square", "box": [0, 0, 0.5, 0.5]},
                                               {"phrase": "a blue triangle", "box": [0.5, 0.5, 1, 1]}]})]
    inputs = build_inputs(pipe, layouts, ["a red circle on a gray background", "x"], references=bank)
    assert inputs.phrase_embeds.shape[:2] == (2, 2) and inputs.valid.tolist() == [[True, False], [True, True]]
    assert inputs.patches.shape == (2, 2, 3, 16, 16) and inputs.patches[0, 0].abs().sum() > 0
    assert inputs.patches[0, 1].abs().sum() == 0 and inputs.exemplar[0].abs().sum() > 0
    with pytest.raises(FileNotFoundError, match="not found"):
        load_modules("/no/such/folder")


def test_shipped_weights_fit_the_demo_unet():
    """assets/ficgen-demo-unet (trained on the GPU) loads, names the demo UNet's mid/up1 cross-attentions and runs."""
    from pathlib import Path

    from diffattn.demo import assets_dir
    from diffattn.generate import load_pipeline

    folder = assets_dir() / "ficgen-demo-unet"
    assert sum(p.stat().st_size for p in Path(folder).iterdir()) < 3 * 2**20
    pipe = load_pipeline(str(assets_dir() / "demo-unet"))
    modules = load_modules(folder)
    expected = FICGenModules.for_unet(pipe.unet, "mid,up1").cfg.layers
    assert modules.cfg.layers == expected and len(expected) == 4  # mid (1 block) + up_blocks.1 (3 blocks)
    layout = Layout.from_dict({"instances": [{"phrase": "a red circle", "box": [0.1, 0.1, 0.5, 0.5]}]})
    inputs = build_inputs(pipe, [layout], ["a red circle on a gray background"], references=ShapesReferenceBank(scenes=40),
                          cond_rows=slice(0, 1))
    text = pipe.encode_prompt(prompt=["a red circle on a gray background"], device="cpu", num_images_per_prompt=1,
                              do_classifier_free_guidance=False)[0]
    x = torch.randn(1, 12, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stock = pipe.unet(x, torch.tensor(500), encoder_hidden_states=text).sample
        diffattn.apply(pipe.unet, "ficgen", weights=str(folder))
        try:
            out = pipe.unet(x, torch.tensor(500), encoder_hidden_states=text,
                            cross_attention_kwargs={"ficgen": inputs}).sample
        finally:
            diffattn.remove(pipe.unet)
    assert out.shape == stock.shape and torch.isfinite(out).all() and (out - stock).abs().max() > 1e-4
