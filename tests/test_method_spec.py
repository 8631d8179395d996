"""The method spec: declared once in each method's module, read by every tool."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import pytest

from diffattn import registry
from diffattn.adapters import FAMILIES
from diffattn.config import MethodConfig
from diffattn.families import FAMILY_NAMES
from diffattn.methods.base import AttentionMethod
from diffattn.methods.spec import MethodSpec


def test_family_names_are_the_adapters():
    assert tuple(FAMILIES) == FAMILY_NAMES == registry.ALL_FAMILIES


def test_builtins_come_from_their_modules_specs():
    assert registry.available_methods() == list(registry.BUILTIN_METHODS)
    for name in registry.BUILTIN_METHODS:
        spec = importlib.import_module(f"diffattn.methods.{name}").SPEC
        assert registry.get_method(name) is spec and spec.name == name
        assert spec.config_cls.method_name == name  # stamped from the spec, declared nowhere else
        if isinstance(spec.build, type):
            assert spec.build.name == name
    roles = {s.name: s.role for s in registry.method_specs()}
    assert roles["softpag"] == "guidance" and roles["radial"] == "speed"


def test_the_name_is_declared_once():
    @dataclass
    class Config(MethodConfig):
        pass

    class Method(AttentionMethod):
        pass

    spec = MethodSpec("probe_once", "test", Config, ("wan",), Method)
    assert Config.method_name == Method.name == spec.name == "probe_once"

    @dataclass
    class Other(MethodConfig):
        method_name = "elsewhere"

    with pytest.raises(ValueError, match="declare the name only in the spec"):
        MethodSpec("probe_twice", "test", Other, ("wan",), Method)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"families": ("wan", "sdxl")}, "unknown families"),
        ({"role": "quality"}, "role must be one of"),
        ({"cli_flags": ("nope",)}, "cli_flags names options"),
    ],
)
def test_bad_specs_are_refused(kwargs, match):
    @dataclass
    class Config(MethodConfig):
        pass

    base = {"name": "probe_bad", "summary": "x", "config_cls": Config, "families": ("wan",), "build": AttentionMethod}
    with pytest.raises(ValueError, match=match):
        MethodSpec(**{**base, **kwargs})


def test_forward_hooks_are_declared_no_ops():
    m = AttentionMethod(MethodConfig())
    assert m.prepare_forward(None, {"x": 1}) is None
    out = object()
    assert m.finish_forward(None, out) is out
    assert m.bind_pipeline(object()) is None
