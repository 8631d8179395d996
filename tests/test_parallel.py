"""Context parallelism on CPU: 2 processes, gloo, Diffusers' own `enable_parallelism` (its `_cp_plan` sharding and
gather hooks) with diffattn's methods; outputs equal the single-process outputs (fp32).

One spawn runs every case (process start and imports dominate the time). Workaround, test only: Diffusers 0.42.1's
`_resolve_parallel_config` computes `rank % torch.accelerator.device_count()`, which is 0 on a CPU-only build; the
workers report one device. Nothing else of Diffusers' CP is patched. Diffusers' own Ring on CPU cannot run (its native
backend has no log-sum-exp), so the reference is the single-process output, not stock Ring.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)

RADIAL = dict(block_size=16, dense_timesteps=0, dense_layers=0, decay_factor=0.5, sink=True)
GNA3 = dict(kernel_size=(3, 3, 3))
SOFTPAG_WAN = dict(heads="L0H1,L1", u=0.7)

# (model, cp mode, route, method, options); every case is compared with the single-process output (adapter route;
# LTX-Video, which has no adapter: the dispatcher route)
CASES = [
    *[("wan", mode, "adapter", m, o) for mode in ("ulysses", "ring") for m, o in (("dense", {}), ("radial", RADIAL))],
    ("wan", "ulysses", "adapter", "gna", GNA3),
    ("wan", "ring", "adapter", "gna", GNA3),
    ("wan", "ring", "dispatcher", "gna", dict(kernel_size=(3, 5, 3), stride=(1, 2, 2))),
    ("wan", "ulysses", "adapter", "softpag", SOFTPAG_WAN),
    ("wan", "ring", "adapter", "softpag", SOFTPAG_WAN),
    ("wan", "ulysses", "dispatcher", "radial", RADIAL),
    ("wan", "ring", "dispatcher", "radial", RADIAL),
    ("wan", "ring", "adapter-after", "radial", RADIAL),
    ("wan3", "ring", "adapter", "radial", RADIAL),
    ("wan3", "ring", "adapter", "gna", GNA3),
    ("wan3", "ring", "adapter", "gna", dict(kernel_size=(1, 3, 5))),
    ("wan3", "ulysses", "adapter", "radial", RADIAL),  # diffattn.apply after enable_parallelism
    *[("hunyuan", mode, "adapter", m, o)
      for mode in ("ulysses", "ring") for m, o in (("dense", {}), ("radial", RADIAL))],
    ("hunyuan", "ulysses", "adapter", "gna", GNA3),
    ("hunyuan", "ring", "adapter", "gna", GNA3),
    ("hunyuan", "ring", "dispatcher", "radial", RADIAL),
    ("flux", "ulysses", "adapter", "dense", {}),
    ("flux", "ulysses", "adapter", "gna", dict(kernel_size=(3, 3))),
    ("flux", "ulysses", "adapter", "softpag", dict(heads="L0H1,L2", u=0.7)),
    ("flux", "ring", "adapter", "softpag", dict(heads="L0H1,L2", u=0.7, target="mean_q")),
    ("flux", "ulysses", "dispatcher", "gna", dict(kernel_size=(3, 3))),
    ("flux", "ring", "adapter", "dense", {}),
    ("flux", "ring", "adapter", "gna", dict(kernel_size=(3, 3))),
    # LTX-Video: no adapter; its plan shards the text (cross-attention keys) and its padding mask too
    ("ltx", "ulysses", "dispatcher", "radial", RADIAL),
    ("ltx", "ring", "dispatcher", "radial", RADIAL),
    ("ltx", "ring", "dispatcher", "gna", GNA3),
]
REFUSED = [
    ("wan", "ring", "adapter", "gna", dict(kernel_size=(3, 3, 3), dilation=(2, 1, 1)), "stride 1, dilation 1"),
    ("wan", "ulysses", "adapter", "freeswim", dict(dual_path=False, base_height=64, base_width=64), "freeswim"),
]


def _case_id(case) -> str:
    extra = "-".join(f"{k}{v}" for k, v in case[4].items() if k in ("kernel_size", "stride", "dilation"))
    return "-".join(str(x) for x in case[:4]) + (f"-{extra}".replace(" ", "") if extra else "")


def _models():
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    from tiny import tiny_flux, tiny_hunyuan_video, tiny_wan

    # HunyuanVideo has no _cp_plan in Diffusers 0.42.1: shard the joint streams at the first block and the RoPE
    # tables, gather after proj_out (the text too: 10 tokens, 5 per rank, its padding differing per batch element).
    hunyuan_plan = {
        "transformer_blocks.0": {
            "hidden_states": ContextParallelInput(split_dim=1, expected_dims=3),
            "encoder_hidden_states": ContextParallelInput(split_dim=1, expected_dims=3),
        },
        "rope": {
            0: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
            1: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
        },
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }
    wan, wan_in = tiny_wan()
    hun, hun_in = tiny_hunyuan_video()
    flux, flux_in = tiny_flux()
    from test_dispatch import tiny_ltx

    ltx, ltx_in = tiny_ltx()
    return {
        "wan": (wan, wan_in(batch=2, frames=4, height=10, width=14), None),
        # 3x5x6 tokens: the 45-token shards end mid-frame and mid-row
        "wan3": (wan, wan_in(batch=1, frames=3, height=10, width=12), None),
        "hunyuan": (hun, hun_in(batch=2, frames=4, height=10, width=14, text=10), hunyuan_plan),
        "flux": (flux, flux_in(batch=1, height=6, width=7, text=6), None),
        "ltx": (ltx, ltx_in(batch=2, frames=4, height=6, width=5, text=8), None),
    }


def _worker(rank: int, world: int, port: int, queue) -> None:
    import copy

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.accelerator.device_count = lambda: 1  # see the module docstring: the one Diffusers line that needs a device
    # a rank that fails inside a case leaves the other waiting in a collective: time out instead of hanging
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    import diffattn
    from diffusers import ContextParallelConfig

    results = {}
    try:
        models = _models()
        reference = {}
        for name, mode, route, method, options in CASES + [c[:5] for c in REFUSED]:
            model, inputs, _ = models[name]
            if (name, method, repr(options)) not in reference:
                diffattn.apply(model, method, via="dispatcher" if name == "ltx" else "adapter", **options)
                with torch.no_grad():
                    reference[name, method, repr(options)] = model(**inputs, return_dict=False)[0]
                diffattn.remove(model)
        for case in CASES + REFUSED:
            name, mode, route, method, options = case[:5]
            model, inputs, plan = models[name]
            m = copy.deepcopy(model)
            config = ContextParallelConfig(**{f"{mode}_degree": world})
            try:
                if route == "adapter-after":
                    m.enable_parallelism(config=config, cp_plan=plan)
                    diffattn.apply(m, method, **options)
                else:
                    diffattn.apply(m, method, via="dispatcher" if route == "dispatcher" else "adapter", **options)
                    m.enable_parallelism(config=config, cp_plan=plan)
                with torch.no_grad():
                    out = m(**inputs, return_dict=False)[0]
                results[_case_id(case)] = float((out - reference[name, method, repr(options)]).abs().max())
            except Exception as exc:  # reported to the test, which decides
                results[_case_id(case)] = f"{type(exc).__name__}: {exc}"
    except Exception:
        results["worker"] = traceback.format_exc()
    if rank == 0:
        queue.put(results)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results():
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = mp.start_processes(_worker, args=(2, _free_port(), queue), nprocs=2, start_method="spawn", join=False)
    try:
        deadline = time.monotonic() + 300
        while not procs.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail("the context-parallel workers did not finish within 300 s")
    except mp.ProcessExitedException as exc:
        pytest.fail(f"a context-parallel worker died: {exc}")
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.terminate()
    assert not queue.empty(), "the context-parallel workers returned no results"
    out = queue.get()
    assert "worker" not in out, out["worker"]
    return out


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_context_parallel_equals_single_process(results, case):
    value = results[_case_id(case)]
    assert isinstance(value, float), value
    assert value <= 1e-5, f"{_case_id(case)}: max abs difference {value}"


@pytest.mark.parametrize("case", REFUSED, ids=_case_id)
def test_context_parallel_refusals(results, case):
    value = results[_case_id(case)]
    assert isinstance(value, str) and value.startswith("NotImplementedError") and case[5] in value, value
