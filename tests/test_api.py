"""The public API: registry, option validation, apply/remove on pipelines and models, clear errors."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import diffattn
from diffattn import registry
from diffattn.api import installed
from diffattn.config import MethodConfig, option
from diffattn.methods.dense import DenseMethod

import tiny


@dataclass
class ToyConfig(MethodConfig):
    method_name = "toy"
    decay_factor: float = option(0.5, help="band decay", low=0.0, high=1.0, low_inclusive=False)
    dense_timesteps: int = option(2, help="dense warm-up steps", low=0)
    block_size: int = option(128, help="block size", choices=(64, 128))
    sink: bool = option(True, help="frame-0 sink")
    layers: list | None = option(None, help="layer indices")


@pytest.fixture
def toy(monkeypatch):
    spec = registry.MethodSpec("toy", "test method", ToyConfig, ("wan",), lambda cfg: DenseMethod(cfg))
    monkeypatch.setitem(registry._REGISTRY, "toy", spec)
    return spec


def test_available_methods_in_design_order():
    """The order of DESIGN.md's model matrix: the CLI, the app's dropdowns and `diffattn methods` list them so."""
    methods = diffattn.available_methods()
    assert methods[:8] == ["dense", "radial", "rectified", "freeswim", "gna", "agent", "softpag", "ficgen"]


def test_unknown_and_planned_methods_raise_clearly():
    model, _ = tiny.BUILDERS["wan"]()
    with pytest.raises(ValueError, match="unknown method 'nope'.*available: dense"):
        diffattn.apply(model, "nope")
    for planned in registry.PLANNED:
        if planned not in diffattn.available_methods():
            with pytest.raises(ValueError, match="not available yet"):
                diffattn.apply(model, planned)


def test_options_are_validated_with_names_and_ranges(toy):
    model, _ = tiny.BUILDERS["wan"]()
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'decay'.*accepted options: block_size, decay_factor"):
        diffattn.apply(model, "toy", decay=0.2)
    with pytest.raises(ValueError, match=r"'decay_factor'.*got 1.5; expected float > 0.0 and <= 1.0"):
        diffattn.apply(model, "toy", decay_factor=1.5)
    with pytest.raises(ValueError, match=r"'decay_factor'.*got 0.0"):
        diffattn.apply(model, "toy", decay_factor=0.0)
    with pytest.raises(ValueError, match=r"'block_size'.*one of 64, 128"):
        diffattn.apply(model, "toy", block_size=100)
    with pytest.raises(ValueError, match=r"'dense_timesteps'.*expected int >= 0"):
        diffattn.apply(model, "toy", dense_timesteps=-1)
    with pytest.raises(ValueError, match=r"'dense_timesteps'.*of type str"):
        diffattn.apply(model, "toy", dense_timesteps="3")
    with pytest.raises(ValueError, match=r"'sink'"):
        diffattn.apply(model, "toy", sink="yes")
    assert installed(model) is None, "a failed apply must leave the model untouched"
    diffattn.apply(model, "toy", decay_factor=0.2, block_size=64, layers=[0, 1])
    assert installed(model).options["decay_factor"] == 0.2
    diffattn.remove(model)


def test_cli_style_option_parsing(toy):
    assert ToyConfig.parse_option("decay_factor", "0.25") == 0.25
    assert ToyConfig.parse_option("dense_timesteps", "12") == 12
    assert ToyConfig.parse_option("sink", "false") is False
    assert ToyConfig.parse_option("layers", "none") is None
    with pytest.raises(ValueError, match="cannot parse 'abc'"):
        ToyConfig.parse_option("dense_timesteps", "abc")
    with pytest.raises(ValueError, match="unknown option 'x'"):
        ToyConfig.parse_option("x", "1")


def test_unsupported_family_and_model_raise(toy):
    flux, _ = tiny.BUILDERS["flux"]()
    with pytest.raises(ValueError, match=r"method 'toy' does not support FluxTransformer2DModel \(flux\); it supports the families: wan"):
        diffattn.apply(flux, "toy")
    with pytest.raises(ValueError, match="unsupported model class Linear; diffattn supports: WanTransformer3DModel"):
        diffattn.apply(torch.nn.Linear(2, 2), "dense")
    with pytest.raises(ValueError, match="needs a Diffusers pipeline"):
        diffattn.apply(object(), "dense")
    with pytest.raises(TypeError, match="method must be a name"):
        diffattn.apply(flux, 3)


def test_apply_twice_replaces_and_remove_restores(toy):
    model, make_inputs = tiny.BUILDERS["wan"]()
    stock = dict(model.attn_processors)
    diffattn.apply(model, "dense")
    first = dict(model.attn_processors)
    diffattn.apply(model, "toy", decay_factor=0.3)
    assert installed(model).method == "toy"
    assert all(model.attn_processors[k] is not first[k] for k in first)
    registry_hooks = model._diffusers_hook._hook_order
    assert registry_hooks.count("diffattn_context") == 1, "re-applying must not stack context hooks"
    diffattn.remove(model)
    assert all(model.attn_processors[k] is stock[k] for k in stock)
    assert "diffattn_context" not in model._diffusers_hook._hook_order
    diffattn.remove(model)  # a second remove is a no-op


def test_processor_works_with_diffusers_set_attn_processor():
    """Processors are plain Diffusers processors: usable without diffattn.apply (no context then)."""
    from diffattn.processors import WanProcessor

    model, make_inputs = tiny.BUILDERS["wan"]()
    inputs = make_inputs(batch=1)
    ref = tiny.output_of(model, inputs)
    stock = dict(model.attn_processors)
    model.set_attn_processor(WanProcessor("dense"))
    out = tiny.output_of(model, inputs)
    model.set_attn_processor(stock)
    assert (out - ref).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="grid must be"):
        WanProcessor("dense", grid=(0, 2, 2))
    with pytest.raises(ValueError, match="unknown option"):
        WanProcessor("dense", foo=1)


def test_processor_without_context_explains_how_to_get_a_grid():
    from diffattn.call import AttentionCall, LayerInfo
    from diffattn.methods.base import require_grid

    q = torch.zeros(1, 1, 4, 8)
    call = AttentionCall(q, q, q, LayerInfo(0, "attn1", "blocks.0.attn1", "self", 1), "self", None)
    with pytest.raises(RuntimeError, match=r"diffattn.apply\(pipe_or_model, ...\) or pass grid=\(frames, height, width\)"):
        require_grid(call, "radial")


def test_pipeline_finds_transformer_transformer2_and_unet():
    from diffattn.api import _models_of

    class FakeWan22:
        transformer = torch.nn.Linear(1, 1)
        transformer_2 = torch.nn.Linear(1, 1)
        vae = torch.nn.Linear(1, 1)

    class FakeSD:
        unet = torch.nn.Linear(1, 1)

    assert [n for n, _ in _models_of(FakeWan22())] == ["transformer", "transformer_2"]
    assert [n for n, _ in _models_of(FakeSD())] == ["unet"]


def test_no_folder_of_the_checkout_shadows_an_installed_distribution(tmp_path):
    """Every source folder lives under diffattn/: `diffattn.kernels`, `diffattn.pipelines`, `diffattn.app`. A
    top-level `kernels/` would shadow Hugging Face's kernel-hub package (which transformers >= 5.25 and Diffusers
    import) whenever the checkout is on sys.path, as under `python -m pytest` from the root. Checked in fresh
    interpreters both outside the repository (an installed user) and at its root (a developer)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(diffattn.__file__)))
    code = (
        "import importlib.util, diffattn.kernels, diffattn.pipelines, diffattn.app\n"
        "print(diffattn.kernels.__name__)\n"
        "for top in ('kernels', 'pipelines', 'app', 'bench', 'methods'):\n"
        "    spec = importlib.util.find_spec(top)\n"
        "    print(top, None if spec is None else spec.origin)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for cwd in (tmp_path, root):
        res = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=env,
                             timeout=120)
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        assert lines[0] == "diffattn.kernels"
        for line in lines[1:]:
            top, origin = line.split(" ", 1)
            assert not origin.startswith(os.path.join(root, top)), f"cwd {cwd}: {top} resolves into the checkout: {origin}"


def test_context_parallel_without_support_is_refused_clearly():
    """Context parallelism itself runs (tests/test_parallel.py); a method/mode without support refuses."""
    from types import SimpleNamespace

    from diffattn.processors import WanProcessor

    model, make_inputs = tiny.BUILDERS["wan"]()
    diffattn.apply(model, "freeswim", dual_path=False, base_height=64, base_width=64)
    try:
        cp = SimpleNamespace(ulysses_degree=1, ring_degree=2)
        for proc in model.attn_processors.values():
            proc._parallel_config = SimpleNamespace(context_parallel_config=cp)
        with pytest.raises(NotImplementedError, match="context parallelism with ring_degree"):
            tiny.output_of(model, make_inputs())
    finally:
        diffattn.remove(model)
    assert isinstance(WanProcessor(), WanProcessor)


def test_replace_runtime_routes_every_processor_and_needs_an_installed_method():
    model, make_inputs = tiny.tiny_wan()
    with pytest.raises(ValueError, match="no diffattn method is installed"):
        diffattn.api.replace_runtime(model, object())
    diffattn.apply(model, "dense")
    calls = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def attend(self, call):
            calls.append(call.role)
            return self.inner.attend(call)

    diffattn.api.replace_runtime(model, Counting(diffattn.api.installed(model).runtime))
    tiny.output_of(model, make_inputs())
    assert len(calls) == len(diffattn.api.installed(model).replaced)
    diffattn.remove(model)
