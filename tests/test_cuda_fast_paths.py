"""The GPU fast paths compute what the plain path computes (run by `make gpu-check`).

Flash and memory-efficient SDPA against the math kernel, bf16 autocast against float32 (with
float32 master weights), fused AdamW against the per-parameter loop, channels-last U-Net,
torch.compile'd DiT, its training steps replayed as CUDA graphs, a training step with no
host-device synchronisation, and the profile accounting (each kernel counted once).

Every test is marked `cuda` and skipped without a CUDA device. No fixtures and no parameters:
where pytest is missing (a bare GPU machine), `dit_bench.gpu_check` calls these as plain
functions. Imports: torch and dit_bench's backbones, objectives and bench only.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from dit_bench.backbones import Cond, build_backbone
from dit_bench.bench import profile_step
from dit_bench.fast import allow_tf32, compile_backbone
from dit_bench.objectives import build_objective

try:
    import pytest

    pytestmark = [
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ]
except ImportError:  # called as plain functions by the GPU check
    pytestmark = []

DEV = "cuda"


def _net(name: str, size: int = 16, channels: int = 4, learn_sigma: bool = True):
    """A backbone with every weight perturbed: the zero init would make outputs trivially equal."""
    torch.manual_seed(0)
    with torch.device(DEV):
        net = build_backbone(
            name, image_size=size, in_channels=channels, num_classes=10, learn_sigma=learn_sigma
        )
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def _inputs(batch: int = 4, size: int = 16, channels: int = 4):
    g = torch.Generator(device=DEV).manual_seed(1)
    x = torch.randn(batch, channels, size, size, device=DEV, generator=g)
    t = torch.randint(0, 1000, (batch,), device=DEV, generator=g).float()
    y = torch.randint(0, 10, (batch,), device=DEV, generator=g)
    return x, t, Cond(labels=y)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def test_sdpa_flash_and_efficient_match_math():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device=DEV).manual_seed(0)
    # DiT-XL/2's attention: 16 heads of 72, 256 tokens
    q, k, v = (
        torch.randn(4, 16, 256, 72, device=DEV, generator=g, dtype=torch.bfloat16).requires_grad_()
        for _ in range(3)
    )
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())  # fp32 math reference
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q, k, v)
        assert out.dtype == torch.bfloat16
        assert _rel(out, ref) < 1e-2, backend
    # float32: the memory-efficient kernel against math, forward and gradients
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    outs, grads = [], []
    for backend in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        with sdpa_kernel(backend), allow_tf32(False):
            out = F.scaled_dot_product_attention(qf, kf, vf)
            (g_q,) = torch.autograd.grad(out.square().sum(), qf)
        outs.append(out)
        grads.append(g_q)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-3)


def test_bf16_autocast_matches_fp32_with_fp32_master_weights():
    net = _net("dit-xs/2")
    x, t, cond = _inputs()
    with allow_tf32(False):
        ref = net(x, t, cond)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = net(x, t, cond)
    assert _rel(out, ref) < 3e-2
    loss = build_objective("ddpm").loss
    with torch.autocast("cuda", dtype=torch.bfloat16):
        value = loss(net, x, cond, generator=torch.Generator(DEV).manual_seed(0))["loss"].mean()
    value.backward()
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert all(p.grad.dtype == torch.float32 for p in net.parameters() if p.grad is not None)


def test_fused_adamw_matches_unfused():
    a = _net("dit-xs/4")
    b = copy.deepcopy(a)
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-3, weight_decay=0.01, fused=False)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-3, weight_decay=0.01, fused=True)
    x, t, cond = _inputs()
    for _ in range(4):
        for net, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad(set_to_none=True)
            with allow_tf32(False):
                net(x, t, cond).square().mean().backward()
        # identical gradients, so only the update differs
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            if pa.grad is not None:
                pb.grad.copy_(pa.grad)
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)


def test_channels_last_unet_matches():
    net = _net("unet-xs", size=16, channels=3)
    x, t, cond = _inputs(channels=3)
    with allow_tf32(False):
        ref = net(x, t, cond)
        fast = copy.deepcopy(net).to(memory_format=torch.channels_last)
        out = fast(x.contiguous(memory_format=torch.channels_last), t, cond)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_compiled_dit_matches_eager():
    net = _net("dit-xs/2")
    fast = compile_backbone(copy.deepcopy(net))
    x, t, cond = _inputs()
    with allow_tf32(False):
        ref = net(x, t, cond)
        out = fast(x, t, cond)
        ref.square().mean().backward()
        out.square().mean().backward()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for p, q in zip(net.parameters(), fast.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-3)


def test_cudagraph_training_steps_match_the_compiled_ones():
    """`train.cudagraphs`: the blocks compiled in mode reduce-overhead, each step begun as the
    training module begins it (gradients dropped, `cudagraph_mark_step_begin`), then forward,
    backward, gradient clipping (it reads the gradients the graphs wrote) and the update. Four
    steps under bf16 autocast (the graphs are recorded on the second call, replayed after;
    each step draws new noise and times, so a replay of stale inputs would repeat a loss) give
    the losses and weights of the same compiled net without CUDA graphs. SGD: an update
    proportional to the gradient (AdamW's first steps are about sign(grad), which rounding can
    flip where it is near 0)."""
    objective = build_objective("ddpm")
    x, _, cond = _inputs()
    runs = {}
    for mode in (None, "reduce-overhead"):
        net = compile_backbone(_net("dit-xs/2"), mode)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        g = torch.Generator(DEV).manual_seed(0)
        losses = []
        for _ in range(4):
            opt.zero_grad(set_to_none=True)
            if mode:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = objective.loss(net, x, cond, generator=g)["loss"].mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 0.1)
            opt.step()
            losses.append(loss.detach().clone())
        runs[mode] = (torch.stack(losses), [p.detach().clone() for p in net.parameters()])
    (plain, plain_w), (graphed, graphed_w) = runs[None], runs["reduce-overhead"]
    assert len(set(plain.tolist())) == 4  # every step computed a loss of its own
    torch.testing.assert_close(graphed, plain, atol=0, rtol=1e-2)
    for p, q in zip(plain_w, graphed_w, strict=True):
        torch.testing.assert_close(q, p, atol=1e-4, rtol=1e-3)


def _assert_training_steps_do_not_sync(objective, learn_sigma: bool) -> None:
    """Backbone + `objective`'s loss + backward + fused AdamW, under bf16 autocast: no
    operation waits for the GPU (torch.cuda.set_sync_debug_mode raises on one)."""
    net = _net("dit-xs/2", learn_sigma=learn_sigma)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    x, _, cond = _inputs()
    g = torch.Generator(DEV).manual_seed(0)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = objective.loss(net, x, cond, generator=g)["loss"].mean()
        loss.backward()
        opt.step()
        return loss.detach()

    step()  # warm-up: coefficient tables move to the device once, optimiser state is created
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step() for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(torch.stack(losses)).all()


def test_training_step_has_no_host_sync():
    """DDPM with learned sigma (the hybrid loss): a training step never syncs."""
    _assert_training_steps_do_not_sync(build_objective("ddpm"), learn_sigma=True)


def test_flow_training_step_has_no_host_sync():
    """Flow matching with the velocity target (its flow-path check once read the device)."""
    _assert_training_steps_do_not_sync(build_objective("flow"), learn_sigma=False)


def test_profile_counts_each_kernel_once():
    """`profile_step`'s busy time is the kernels' time, not also the record_function ranges
    that span them (they show on the GPU timeline too): a step of 8 large matrix products
    inside a named range reports about the time those products take alone."""
    a = torch.randn(4096, 4096, device=DEV, dtype=torch.bfloat16)
    out = torch.empty_like(a)

    def step():
        with torch.profiler.record_function("step#range"):
            for _ in range(8):
                torch.mm(a, a, out=out)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    end.synchronize()
    alone_ms = start.elapsed_time(end)
    prof = profile_step(step, torch.device(DEV))
    assert not any("range" in k["name"] for k in prof["top"])
    assert prof["groups"]["matmul"]["share"] > 0.95
    assert 0.7 * alone_ms < prof["busy_ms_per_step"] < 1.3 * alone_ms
