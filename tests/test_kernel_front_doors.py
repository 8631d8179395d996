"""The two kernel front doors read alike: one registry (`diffattn.kernels.backends`, None = auto), the env override
for both, one device/interpreter test, shared argument checks and one Hopper-fallback scheme
(`diffattn.kernels.common`)."""

from __future__ import annotations

import pytest
import torch

from diffattn.kernels import block_sparse, common, neighborhood
from diffattn.kernels.block_sparse import block_sparse_attention
from diffattn.kernels.neighborhood import neighborhood_attention


def _bs_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g, dtype=dtype) for _ in range(3))
    mask = torch.rand(1, 2, 3, 3, generator=g) < 0.6
    return q, k, v, mask


def _na_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(1, 6, 7, 2, 8, generator=g, dtype=dtype) for _ in range(3))


def test_one_vocabulary_and_one_default():
    from diffattn.kernels import backends

    assert block_sparse.BACKENDS == backends.names("block_sparse") == ("triton", "gluon", "fa4", "flex", "blocked", "reference")
    assert neighborhood.BACKENDS == backends.names("neighborhood") == ("triton", "fa4", "gluon", "blocked", "reference")
    assert block_sparse.default_backend is neighborhood.default_backend is common.default_backend
    assert block_sparse.ENV_BACKEND != neighborhood.ENV_BACKEND


@pytest.mark.parametrize("door", ["block_sparse", "neighborhood"])
def test_auto_is_none_and_the_same_errors(door, monkeypatch):
    monkeypatch.delenv("DIFFATTN_BLOCK_SPARSE_BACKEND", raising=False)
    monkeypatch.delenv("DIFFATTN_NEIGHBORHOOD_BACKEND", raising=False)
    if door == "block_sparse":
        q, k, v, mask = _bs_inputs()
        call = lambda **kw: block_sparse_attention(q, k, v, mask, block_size=16, **kw)  # noqa: E731
    else:
        q, k, v = _na_inputs()
        call = lambda **kw: neighborhood_attention(q, k, v, 3, **kw)  # noqa: E731
    for bad in ("auto", "cuda", "Triton"):
        with pytest.raises(ValueError, match=r"backend must be one of 'triton', .*'blocked', 'reference' or None"):
            call(backend=bad)
    with pytest.raises(ValueError, match="scale must be a finite positive number"):
        call(scale=-1.0)
    if not common.interpreting():
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            call(backend="triton")
    # None on CPU is "blocked": the same result as asking for it
    assert torch.equal(call(), call(backend="blocked"))


@pytest.mark.parametrize("door", ["block_sparse", "neighborhood"])
def test_env_override_for_both(door, monkeypatch):
    if door == "block_sparse":
        q, k, v, mask = (t.double() if t.dtype == torch.float32 else t for t in _bs_inputs())
        call = lambda **kw: block_sparse_attention(q, k, v, mask, block_size=16, **kw)  # noqa: E731
        env = block_sparse.ENV_BACKEND
    else:
        q, k, v = (t.double() for t in _na_inputs())
        call = lambda **kw: neighborhood_attention(q, k, v, 3, **kw)  # noqa: E731
        env = neighborhood.ENV_BACKEND
    monkeypatch.setenv(env, "reference")
    assert torch.equal(call(), call(backend="reference"))  # float64: the PyTorch backends take it
    monkeypatch.setenv(env, "nope")
    with pytest.raises(ValueError, match=env):
        call()
    assert call(backend="blocked").dtype == torch.float64  # an explicit backend wins over the variable


def test_interpreter_flag_is_read_as_triton_reads_it(monkeypatch):
    for value, on in (("1", True), ("true", True), ("ON", True), ("0", False), ("", False), ("false", False)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert common.interpreting() is on
        assert common.default_backend(torch.device("cpu")) == ("triton" if on and common.triton_importable() else "blocked")


def test_fallback_remembers_a_failed_variant_per_key(caplog):
    calls = []

    def fails():
        calls.append("fast")
        raise RuntimeError("PassManager::run failed")

    def works():
        calls.append("plain")
        return 7

    key = ("test", object())  # a key no other test uses
    assert common.run_with_fallbacks("test kernel", key, [("fast", fails), ("plain", works)]) == 7
    assert common.run_with_fallbacks("test kernel", key, [("fast", fails), ("plain", works)]) == 7
    assert calls == ["fast", "plain", "plain"]  # the failed variant is not tried again for this key
    assert sum("could not run the fast variant" in r.message for r in caplog.records) == 1
    with pytest.raises(RuntimeError, match="PassManager"):  # the last variant's error propagates
        common.run_with_fallbacks("test kernel", ("other",), [("plain", fails)])
