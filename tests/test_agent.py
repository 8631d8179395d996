"""AgentSD: the merge/agent kernels against their references, and the method on tiny SD1.5/SDXL UNets, SD3, FLUX."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffattn.kernels.agent import (
    agent_attention,
    agent_attention_reference,
    bipartite_partition,
    merge,
    merge_assignment,
    merge_reference,
    pool_agents,
    unmerge,
)
from diffattn.methods.agent import AgentConfig

import diffattn
from tiny import BUILDERS, output_of

# ------------------------------------------------------------------------------------------------ kernels


@pytest.mark.parametrize("h,w,sx,sy", [(8, 8, 2, 2), (7, 10, 4, 4), (5, 3, 2, 2), (6, 9, 3, 2)])
def test_partition_one_destination_per_full_cell(h, w, sx, sy):
    dst, src = bipartite_partition(h, w, sx, sy, generator=torch.Generator().manual_seed(0))
    assert dst.numel() == (h // sy) * (w // sx) and dst.numel() + src.numel() == h * w
    assert torch.equal(torch.sort(torch.cat([dst, src])).values, torch.arange(h * w))
    rows, cols = dst // w, dst % w
    cells = (rows // sy) * (w // sx) + cols // sx
    assert sorted(cells.tolist()) == list(range(dst.numel())) and (rows < (h // sy) * sy).all()
    again, _ = bipartite_partition(h, w, sx, sy, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dst, again)
    top_left, _ = bipartite_partition(h, w, sx, sy, randomize=False)
    assert ((top_left // w) % sy == 0).all() and ((top_left % w) % sx == 0).all()


@pytest.mark.parametrize("batch,heads", [(1, 1), (3, 2)])
def test_merge_matches_reference_and_unmerge_round_trips(batch, heads):
    g = torch.Generator().manual_seed(1)
    h, w = 6, 10
    metric = torch.randn(batch, h * w, 12, generator=g)
    dst, src = bipartite_partition(h, w, 2, 2, generator=g)
    x = torch.randn(batch, heads, h * w, 5, generator=g)
    (a0, s0), (a1, s1), (a2, s2) = merge_assignment(metric, dst, src, [0, 17, src.numel()])
    assert (s0, s1, s2) == (h * w, h * w - 17, dst.numel())
    for a, s in ((a0, s0), (a1, s1), (a2, s2)):
        merged = merge(x, a, s)
        torch.testing.assert_close(merged, merge_reference(x, a, s), rtol=1e-5, atol=1e-6)
        assert (torch.bincount(a[0], minlength=s) > 0).all()  # every slot holds at least its destination
        # Round trip: a merged tensor unmerged and merged again is unchanged; nothing merged is the identity.
        torch.testing.assert_close(merge(unmerge(merged, a), a, s), merged, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(unmerge(merge(x, a0, s0), a0), x)
    # Merged sources are the best-matching ones: the merged set for r=17 is a subset of the one for r=30.
    more, _ = merge_assignment(metric, dst, src, [30])[0]
    merged17 = (a1[:, src] < dst.numel())
    merged30 = (more[:, src] < dst.numel())
    assert (merged30 | ~merged17).all() and int(merged17.sum()) == 17 * batch


def test_merge_groups_similar_tokens():
    # Tokens that are copies of a destination merge into it first.
    h, w = 4, 4
    dst, src = bipartite_partition(h, w, 2, 2, randomize=False)
    base = torch.randn(1, dst.numel(), 8)
    metric = torch.randn(1, h * w, 8)
    metric[:, dst] = base
    twin = src[:3]
    metric[0, twin] = base[0, 0] * 2.0  # same direction as destination 0
    (assign, _), = merge_assignment(metric, dst, src, [3])
    assert (assign[0, twin] == 0).all()


@pytest.mark.parametrize("extra", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_agent_attention_matches_materialised_reference(extra, dtype, tol):
    g = torch.Generator().manual_seed(2)
    b, h, n, na, d, t = 2, 3, 37, 5, 16, 4
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    agents = torch.randn(b, h, na, d, generator=g)
    ek, ev = (torch.randn(b, h, t, d, generator=g) for _ in range(2)) if extra else (None, None)
    ref = agent_attention_reference(q, k, v, agents, broadcast_power=0.3, shortcut=0.075, extra_k=ek, extra_v=ev)
    cast = [x.to(dtype) if x is not None else None for x in (q, k, v, agents, ek, ev)]
    out = agent_attention(*cast[:4], broadcast_power=0.3, shortcut=0.075, extra_k=cast[4], extra_v=cast[5])
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    out32 = agent_attention(*cast[:4], extra_k=cast[4], extra_v=cast[5], fp32=True)
    assert out32.dtype == dtype


def test_agents_equal_to_all_tokens_with_power_one_is_softmax_attention_composition():
    # With scale 1 on both softmaxes and agents = keys, agent attention is two chained softmax attentions.
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=g) for _ in range(3))
    out = agent_attention(q, k, v, k, broadcast_power=1.0, shortcut=0.0)
    s = 8**-0.5
    chained = F.scaled_dot_product_attention(q, k, F.scaled_dot_product_attention(k, k, v, scale=s), scale=s)
    torch.testing.assert_close(out, chained)


def test_pool_agents_is_average_pooling_on_the_grid():
    q = torch.arange(2 * 1 * 12 * 1, dtype=torch.float32).view(2, 1, 12, 1)
    pooled = pool_agents(q, 3, 4, (1, 2))
    expect = torch.tensor([[0, 1, 4, 5, 8, 9], [2, 3, 6, 7, 10, 11]], dtype=torch.float32).mean(1)
    torch.testing.assert_close(pooled[0, 0, :, 0], expect)
    with pytest.raises(ValueError, match="grid"):
        pool_agents(q, 3, 5, (1, 2))


# ------------------------------------------------------------------------------------------------ options


def test_options_are_validated_and_the_schedule_is_data():
    stages = AgentConfig().stages()
    assert [(s.start, s.sx, s.sy, s.agent_ratio, s.ratio) for s in stages] == [(0.0, 4, 4, 0.95, 0.4), (0.4, 2, 2, 0.5, 0.4)]
    assert len(AgentConfig(schedule="none").stages()) == 1
    custom = AgentConfig(schedule=[{"start": 0.5, "ratio": 0.2}, {"start": 0.2, "sx": 2}]).stages()
    assert [(s.start, s.sx, s.ratio) for s in custom] == [(0.0, 4, 0.4), (0.2, 2, 0.4), (0.5, 2, 0.2)]
    for bad in ({"ratio": 1.0}, {"sx": 0}, {"attn_precision": "fp16"}, {"schedule": "later"},
                {"schedule": [{"start": 2}]}, {"schedule": [{"start": 0.5, "sxx": 2}]}, {"schedule": [{"start": 0.5, "sx": 0}]},
                {"agent_ratio": 1.5}, {"k_scale2": -1}):
        with pytest.raises(ValueError):
            diffattn.registry.build_method("agent", **bad)
    with pytest.raises(ValueError, match="unknown option"):
        diffattn.registry.build_method("agent", agents=3)


# ------------------------------------------------------------------------------------------------ UNets


def _unet():
    model, make_inputs = BUILDERS["unet"]()
    return model, make_inputs


def test_nothing_merged_and_no_agents_equals_stock():
    model, make_inputs = _unet()
    inputs = make_inputs(batch=3)
    stock = output_of(model, inputs)
    diffattn.apply(model, "agent", ratio=0.0, agent_ratio=0.0, schedule="none")
    torch.testing.assert_close(output_of(model, inputs), stock, rtol=0, atol=1e-6)
    diffattn.remove(model)
    assert torch.equal(output_of(model, inputs), stock)


def _spy(model):
    """Record, per attention call of the method, (layer path, q tokens, whether it ran merged)."""
    method = diffattn.api.installed(model).runtime
    seen = []
    original = method._unet

    def spy(call):
        seen.append((call.layer.path, call.q.shape[2], method.stage(call.context)))
        return original(call)

    method._unet = spy
    return method, seen


def test_only_top_level_self_attention_changes_and_output_is_finite():
    model, make_inputs = _unet()
    inputs = make_inputs(batch=2)
    stock = output_of(model, inputs)
    diffattn.apply(model, "agent", sx=2, sy=2, schedule="none")
    method, seen = _spy(model)
    out = output_of(model, inputs)
    assert torch.isfinite(out).all() and not torch.allclose(out, stock)
    paths = {p for p, _, _ in seen}
    assert all(p.endswith("attn1") for p in paths)
    top = [n for p, n, _ in seen if p.startswith("down_blocks.0") or p.startswith("up_blocks.1")]
    assert top and all(n == 12 * 20 for n in top)
    # max_downsample=2 also patches the level below (but never cross-attention): the output changes again.
    diffattn.apply(model, "agent", sx=2, sy=2, schedule="none", max_downsample=2)
    assert not torch.allclose(output_of(model, inputs), out)
    diffattn.remove(model)


def test_metric_is_the_block_pre_norm_input(monkeypatch):
    import diffattn.methods.agent as agent_mod

    model, make_inputs = _unet()
    diffattn.apply(model, "agent", sx=2, sy=2, schedule="none")
    method = diffattn.api.installed(model).runtime
    seen = {}
    real = agent_mod.merge_plans

    def capture(metric, dst, src, counts):
        seen.setdefault("metric", metric)
        return real(metric, dst, src, counts)

    monkeypatch.setattr(agent_mod, "merge_plans", capture)
    block = model.down_blocks[0].attentions[0].transformer_blocks[0]
    captured = {}
    handle = block.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    output_of(model, make_inputs(batch=1))
    handle.remove()
    assert torch.equal(seen["metric"], captured["x"])
    assert method._handles == [] and method._metrics == {}  # hooks live only during a forward
    diffattn.remove(model)


def test_schedule_switches_by_step_in_a_pipeline():
    from tiny_image_pipelines import build_tiny_sd_pipeline, run_tiny_sd

    pipe = build_tiny_sd_pipeline()
    diffattn.apply(pipe, "agent", sx=2, sy=2)
    method, seen = _spy(pipe.unet)
    run_tiny_sd(pipe, steps=5)
    per_step = [s.sx for _, _, s in seen]
    assert per_step[0] == 2 and set(per_step) == {2}  # stage 2 also uses 2x2 cells; check agent_ratio instead
    ratios = [s.agent_ratio for _, _, s in seen]
    calls_per_step = len(ratios) // 5
    assert ratios[: 2 * calls_per_step] == [0.95] * (2 * calls_per_step)  # steps 0, 1 < 40% of 5
    assert ratios[2 * calls_per_step:] == [0.5] * (3 * calls_per_step)
    diffattn.remove(pipe)


def test_random_destinations_reproducible_by_seed():
    model, make_inputs = _unet()
    inputs = make_inputs(batch=1)
    outs = []
    for seed in (3, 3, 4):
        diffattn.apply(model, "agent", sx=2, sy=2, schedule="none", seed=seed, ratio=0.5)
        outs.append(output_of(model, inputs))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    diffattn.remove(model)


def test_batched_cfg_rows_are_independent_of_batch_size():
    # Odd batch sizes work, and each row's output does not depend on the other rows (shared destinations).
    model, make_inputs = _unet()
    inputs = make_inputs(batch=3)
    diffattn.apply(model, "agent", sx=2, sy=2, schedule="none", seed=0)
    full = output_of(model, inputs)
    one = output_of(model, {k: v[:1] if torch.is_tensor(v) and v.shape[0] == 3 else v for k, v in inputs.items()})
    torch.testing.assert_close(full[:1], one, rtol=1e-4, atol=1e-5)
    diffattn.remove(model)


def _tiny_sdxl_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=24, attention_head_dim=(2, 4), norm_num_groups=8, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=12 + 6 * 8,
        use_linear_projection=True,
    ).eval()


def test_sdxl_added_cond_kwargs_and_its_attention_level():
    model = _tiny_sdxl_unet()
    g = torch.Generator().manual_seed(0)
    inputs = {
        "sample": torch.randn(2, 4, 12, 16, generator=g), "timestep": torch.full((2,), 400.0),
        "encoder_hidden_states": torch.randn(2, 7, 24, generator=g),
        "added_cond_kwargs": {"text_embeds": torch.randn(2, 12, generator=g), "time_ids": torch.randn(2, 6, generator=g)},
    }
    stock = output_of(model, inputs)
    # SDXL has no attention at the top level: max_downsample=1 changes nothing; 2 patches the 6x8 level.
    diffattn.apply(model, "agent", sx=2, sy=2, schedule="none")
    torch.testing.assert_close(output_of(model, inputs), stock, rtol=0, atol=1e-6)
    diffattn.apply(model, "agent", sx=2, sy=2, schedule="none", max_downsample=2, agent_ratio=0.8)
    out = output_of(model, inputs)
    assert torch.isfinite(out).all() and not torch.allclose(out, stock)
    diffattn.remove(model)


def test_tiny_sd15_pipeline_end_to_end_and_sdxl_pipeline():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from tiny_image_pipelines import _clip, _vae, build_tiny_sd_pipeline, run_tiny_sd, tiny_word_tokenizer

    pipe = build_tiny_sd_pipeline()
    dense = run_tiny_sd(pipe, steps=3)
    diffattn.apply(pipe, "agent", sx=2, sy=2, attn_precision="fp32", seed=0)
    out = run_tiny_sd(pipe, steps=3)
    assert out.shape == dense.shape and torch.isfinite(out).all()
    diffattn.remove(pipe)

    unet = _tiny_sdxl_unet()
    sdxl = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=_clip(8), text_encoder_2=_clip(16, projection=12), tokenizer=tiny_word_tokenizer(),
        tokenizer_2=tiny_word_tokenizer(), unet=unet, scheduler=EulerDiscreteScheduler(),
    )
    sdxl.set_progress_bar_config(disable=True)
    diffattn.apply(sdxl, "agent", sx=2, sy=2, max_downsample=2, seed=1)
    img = sdxl("a photo of a cat", height=48, width=64, num_inference_steps=2, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert img.shape == (1, 3, 48, 64) and torch.isfinite(img).all()
    diffattn.remove(sdxl)


# ------------------------------------------------------------------------------------------------ DiTs


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_dit_variant_pools_agents_and_keeps_text_exact(family):
    model, make_inputs = BUILDERS[family]()
    inputs = make_inputs(batch=2)
    stock = output_of(model, inputs)
    diffattn.apply(model, "agent", agent_num=4)
    out = output_of(model, inputs)
    assert out.shape == stock.shape and torch.isfinite(out).all() and not torch.allclose(out, stock)
    diffattn.remove(model)
    assert torch.equal(output_of(model, inputs), stock)


def test_dit_variant_matches_reference_on_one_joint_call():
    from diffattn.call import AttentionCall, LayerInfo

    from diffattn.methods.agent import AgentMethod

    g = torch.Generator().manual_seed(5)
    b, h, hh, ww, t, d = 2, 2, 4, 6, 3, 8
    q, k, v = (torch.randn(b, h, hh * ww + t, d, generator=g) for _ in range(3))
    from diffattn.geometry import TokenGrid

    call = AttentionCall(q, k, v, LayerInfo(0, "attn", "x.attn", "joint", 1), "joint", None,
                         grid=TokenGrid(1, hh, ww), text_len=t, text_first=True)
    method = AgentMethod(AgentConfig(agent_num=6, schedule="none"))
    out = method.attend(call)
    vis = slice(t, None)
    agents = pool_agents(q[:, :, vis], hh, ww, (2, 3))
    ref_v = agent_attention_reference(q[:, :, vis], k[:, :, vis], v[:, :, vis], agents, extra_k=k[:, :, :t], extra_v=v[:, :, :t])
    torch.testing.assert_close(out[:, :, vis].double(), ref_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, :, :t], F.scaled_dot_product_attention(q[:, :, :t], k, v))


def test_triton_kernels_under_interpreter():
    """Runs tests/test_agent_triton.py (the fused best-match kernel) in a fresh process with TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    from interpreter import run_under_interpreter

    run_under_interpreter("test_agent_triton.py")


def test_best_match_backends_agree_on_cpu():
    # Outside the interpreter the CPU runs the reference; the explicit backends are validated.
    from diffattn.kernels.bipartite import best_match, best_match_reference

    g = torch.Generator().manual_seed(0)
    metric = torch.randn(2, 30, 8, generator=g)
    dst, src = bipartite_partition(5, 6, 2, 2, generator=g)
    ref = best_match_reference(metric, dst, src)
    for backend in ("blocked", "reference"):
        best, idx = best_match(metric, dst, src, backend=backend)
        assert torch.equal(best, ref[0]) and torch.equal(idx, ref[1])
    best, idx = best_match(metric, dst, src)  # auto: the reference, or the kernel under TRITON_INTERPRET=1
    torch.testing.assert_close(best, ref[0]) and torch.equal(idx, ref[1])
    with pytest.raises(ValueError, match="backend"):
        best_match(metric, dst, src, backend="cuda")


@pytest.mark.parametrize("shape", [(2, 3, 35, 6), (3, 35, 7)])
def test_merge_many_matches_the_reference_per_tensor(shape):
    from diffattn.kernels.agent import merge_many, slot_weights

    g = torch.Generator().manual_seed(7)
    batch, n = shape[0], shape[-2]
    dst, src = bipartite_partition(5, 7, 2, 2, generator=g)
    metric = torch.randn(batch, n, 4, generator=g)
    (assign, slots), = merge_assignment(metric, dst, src, [9])
    xs = [torch.randn(*shape, generator=g).to(torch.float16) for _ in range(3)]
    weights = slot_weights(assign, slots)
    counts = torch.stack([torch.bincount(a, minlength=slots) for a in assign]).float()
    torch.testing.assert_close(weights, 1.0 / counts)  # every slot holds its destination or its source
    for got, x in zip(merge_many(xs, assign, slots, weights), xs):
        assert got.dtype == torch.float16 and got.shape == (*shape[:-2], slots, shape[-1])
        torch.testing.assert_close(got, merge_reference(x, assign, slots), rtol=1e-3, atol=1e-3)
    assert merge_many([], assign, slots) == []


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_blocked_similarity_by_chunks_matches_the_reference(dtype, tol):
    from diffattn.kernels.bipartite import best_match_blocked, best_match_reference

    g = torch.Generator().manual_seed(8)
    metric = torch.randn(2, 63, 10, generator=g).to(dtype)
    dst, src = bipartite_partition(7, 9, 3, 2, generator=g)
    ref_best, ref_idx = best_match_reference(metric, dst, src)
    for limit in (2**28, 50, 1):  # one chunk, several, one source row at a time
        best, idx = best_match_blocked(metric, dst, src, max_scores=limit)
        torch.testing.assert_close(best, ref_best, rtol=tol, atol=tol)
        if dtype == torch.float32:
            assert torch.equal(idx, ref_idx)


def test_bench_agent_projection_and_kernel_buckets():
    from diffattn.bench.agent import EARLY, LATE, TOME, kernel_category, project

    times = {"dense": 10.0, EARLY: 4.0, LATE: 7.0, TOME: 7.5, "dense, CUDA graph": 5.0}
    # 50 steps: round(0.4 * 50) = 20 early + 30 late; 7 steps: round(2.8) = 3 early + 4 late
    assert project(times, 50) == {"dense": 500.0, "agent (schedule)": 20 * 4.0 + 30 * 7.0, "tome": 375.0}
    assert project(times, 7)["agent (schedule)"] == 3 * 4.0 + 4 * 7.0
    assert project(times, 50, ", CUDA graph") == {"dense": 250.0}  # agent graph rows missing: no agent total
    assert kernel_category("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>") == "attention"
    assert kernel_category("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert kernel_category("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc") == "convolution"
    assert kernel_category("_assign_slots_kernel") == "merge/similarity"
    assert kernel_category("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel") == "normalization"
    assert kernel_category("softmax_warp_forward") == "elementwise"  # not a merge kernel for its "max"
    assert kernel_category("nchwToNhwcKernel") == "other"
