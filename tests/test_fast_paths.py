"""Each fast path computes what the plain path computes, on the CPU (GPU versions:
tests/test_cuda_fast_paths.py): SDPA's fused kernel against the math kernel, the
short-sequence attention and the sigmoid form of GELU(tanh) that compiled CPU code runs
(each with a hand-written backward), fused AdamW against the loop, channels-last
U-Net, bf16 autocast, torch.compile of the backbone (slow), activation checkpointing per
block, and the training module applying them from the config (EMA eager, checkpoints
unchanged)."""

from __future__ import annotations

import contextlib
import copy
import os
import time
from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from dit_bench.backbones import Cond, build_backbone
from dit_bench.backbones.layers import GELUTanhAsSigmoid, ShortAttention
from dit_bench.fast import blocks_of, checkpoint_blocks, compile_backbone, fused_adamw_default


def _net(name: str, size: int = 8, channels: int = 2, learn_sigma: bool = True):
    """Every weight perturbed: at init DiT predicts exactly 0, which any path would match."""
    torch.manual_seed(0)
    net = build_backbone(
        name, image_size=size, in_channels=channels, num_classes=10, learn_sigma=learn_sigma
    )
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def _inputs(batch: int = 3, size: int = 8, channels: int = 2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, channels, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g).float()
    y = torch.randint(0, 11, (batch,), generator=g)  # 10 is the null class
    return x, t, Cond(labels=y)


def _compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def _recorder(graphs: list):
    """A torch.compile backend that keeps each FX graph Dynamo hands it and runs it as is."""

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend


@pytest.mark.parametrize("name", ["dit-xs/2", "mmdit-d2/2", "uvit-xs/2"])
def test_sdpa_default_kernel_matches_math(name):
    net = _net(name)
    x, t, cond = _inputs()
    out = net(x, t, cond)
    with sdpa_kernel(SDPBackend.MATH):
        ref = net(x, t, cond)
    assert out.abs().max() > 1e-3  # not the trivial zero output
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("s", [16, 5])  # self-attention; cross-attention to 5 keys
def test_short_attention_matches_sdpa(s):
    g = torch.Generator().manual_seed(0)
    q = (3 * torch.randn(2, 3, 16, 8, generator=g)).requires_grad_()  # peaked softmax rows
    k, v = (torch.randn(2, 3, s, 8, generator=g).requires_grad_() for _ in range(2))
    out = ShortAttention.apply(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads, strict=True):
        assert b.abs().max() > 1e-2
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # the hand-written backward against finite differences, from non-contiguous views as
    # the attention layers pass them (slices of one fused qkv projection)
    qkv = torch.randn(2, 6, 3, 2, 4, dtype=torch.float64, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: ShortAttention.apply(*t.permute(2, 0, 3, 1, 4).unbind(0)), (qkv,)
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gelu_sigmoid_form_is_gelu_tanh(dtype):
    # Wide range: the tails (sigmoid saturating to 0 and 1) are where a rewrite would break.
    x = torch.linspace(-12, 12, 20001, dtype=dtype).requires_grad_()
    y = GELUTanhAsSigmoid.apply(x)
    (grad,) = torch.autograd.grad(y.sum(), x)
    ref = torch.nn.functional.gelu(x, approximate="tanh")
    (ref_grad,) = torch.autograd.grad(ref.sum(), x)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(y, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(grad, ref_grad, atol=tol, rtol=tol)
    # and not the exact (erf) GELU, which differs by up to ~5e-4
    exact = torch.nn.functional.gelu(x.detach())
    assert (y.detach() - exact).abs().max() > 1e-4
    if dtype == torch.float64:  # the hand-written backward against finite differences
        assert torch.autograd.gradcheck(
            GELUTanhAsSigmoid.apply, (x[::400].detach().requires_grad_(),)
        )


def test_fused_adamw_matches_unfused():
    a = _net("dit-xs/4")
    b = copy.deepcopy(a)
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-3, weight_decay=0.01, fused=False)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-3, weight_decay=0.01, fused=True)
    x, t, cond = _inputs()
    for _ in range(4):
        for net, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad(set_to_none=True)
            net(x, t, cond).square().mean().backward()
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            if pa.grad is not None:
                pb.grad.copy_(pa.grad)  # identical gradients: only the update rule differs
        opt_a.step()
        opt_b.step()
    start = _net("dit-xs/4")
    pairs = zip(a.parameters(), start.parameters(), strict=True)
    moved = max((p - p0).abs().max() for p, p0 in pairs)
    assert moved > 1e-4  # the updates did something
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["dit-xs/4", "mmdit-d2/2", "uvit-xs/2", "unet-xs"])
def test_deterministic_training_without_the_nan_fill_is_the_same_bit_for_bit(name):
    # What the harness trains under (Lightning's deterministic mode, its NaN fill of new tensors
    # off): the learned-sigma DDPM loss, fused AdamW and the EMA give the same numbers as with
    # the fill, so no op reads memory it did not write.
    from dit_bench.fast import ema_update, no_nan_fill
    from dit_bench.objectives import build_objective

    objective = build_objective("ddpm")
    x, _, cond = _inputs(batch=4)
    finals = []
    for fill in (True, False):
        net, ema = _net(name), _net(name).requires_grad_(False)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True)
        with contextlib.ExitStack() as stack:
            before = torch.are_deterministic_algorithms_enabled()
            warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
            stack.callback(torch.use_deterministic_algorithms, before, warn_only=warn_only)
            torch.use_deterministic_algorithms(True)
            if not fill:
                stack.enter_context(no_nan_fill())
            assert torch.utils.deterministic.fill_uninitialized_memory is fill
            for step in range(2):
                g = torch.Generator().manual_seed(step)
                objective.loss(net, x, cond, generator=g)["loss"].mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                ema_update(ema, net, 0.9)
        finals.append([*net.parameters(), *ema.parameters()])
    assert torch.utils.deterministic.fill_uninitialized_memory  # restored
    for a, b in zip(*finals, strict=True):
        assert torch.equal(a, b)


def test_fused_default_where_torch_has_it():
    assert fused_adamw_default("cuda") and fused_adamw_default("cpu")
    assert not fused_adamw_default("meta")


def test_channels_last_unet_matches():
    net = _net("unet-xs", size=16, channels=3)
    x, t, cond = _inputs(size=16, channels=3)
    ref = net(x, t, cond)
    ref.square().mean().backward()
    fast = _net("unet-xs", size=16, channels=3).to(memory_format=torch.channels_last)
    out = fast(x.contiguous(memory_format=torch.channels_last), t, cond)
    out.square().mean().backward()
    assert fast.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for p, q in zip(net.parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-3)


def test_bf16_autocast_close_to_fp32():
    net = _net("dit-xs/2")
    x, t, cond = _inputs()
    ref = net(x, t, cond)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t, cond)
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 3e-2  # bf16 keeps 8 mantissa bits: about 0.4% per rounding
    assert all(p.dtype == torch.float32 for p in net.parameters())  # master weights


def test_compile_backbone_is_regional_for_block_stacks():
    dit = compile_backbone(_net("dit-xs/2"))
    assert all(_compiled(b) for b in dit.blocks) and not _compiled(dit)
    unet = compile_backbone(_net("unet-xs", size=16, channels=3))  # widths change: whole net
    assert _compiled(unet)
    mmdit = compile_backbone(_net("mmdit-d2/2"))  # the last block differs: two block graphs
    assert all(_compiled(b) for b in mmdit.blocks) and not _compiled(mmdit)
    uvit = compile_backbone(_net("uvit-xs/2"))  # skip blocks differ; the middle block too
    blocks = [*uvit.in_blocks, uvit.mid_block, *uvit.out_blocks]
    assert all(_compiled(b) for b in blocks) and not _compiled(uvit)
    assert list(dit.state_dict()) == list(_net("dit-xs/2").state_dict())


def test_compile_backbone_compiles_each_new_model_for_its_own_shapes():
    # Dynamo compiles a shape it has seen change as a dynamic one: without the reset in
    # compile_backbone the second width would get symbolic sizes, not its own static ones.
    graphs = []

    def dynamic(gm) -> bool:
        values = [n.meta["example_value"] for n in gm.graph.find_nodes(op="placeholder")]
        sizes = [s for v in values if isinstance(v, torch.Tensor) for s in v.shape]
        return any(isinstance(s, torch.SymInt) for s in sizes)

    x, t, cond = _inputs()
    for name in ("dit-xs/2", "dit-s/2", "dit-xs/2"):
        compile_backbone(_net(name), backend=_recorder(graphs))(x, t, cond)
    assert [dynamic(g) for g in graphs] == [False] * 3  # one block graph per model, static
    for name in ("mmdit-d2/2", "uvit-xs/2"):  # a second block graph: the last, the skip blocks
        graphs.clear()
        compile_backbone(_net(name), backend=_recorder(graphs))(x, t, cond)
        assert [dynamic(g) for g in graphs] == [False] * 2, name  # no dynamic recompile
    torch.compiler.reset()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dit-xs/2"])  # unet-xs passes too, in 7 minutes on 2 CPUs
def test_compiled_backbone_matches_eager(name):
    size, channels = (16, 3) if name == "unet-xs" else (8, 2)
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    net = _net(name, size=size, channels=channels)
    fast = compile_backbone(copy.deepcopy(net))
    x, t, cond = _inputs(size=size, channels=channels)
    ref, out = net(x, t, cond), fast(x, t, cond)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    # one graph: DiT's identical blocks share one (regional), the U-Net is compiled whole
    assert counters["stats"]["unique_graphs"] == 1
    ref.square().mean().backward()
    out.square().mean().backward()
    for p, q in zip(net.parameters(), fast.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-3)


# -- activation checkpointing: the same numbers, less memory held for the backward ------------


def _saved_bytes(fn, net: torch.nn.Module) -> tuple[int, torch.Tensor]:
    """(bytes of the tensors autograd saves for the backward over `fn()`, not counting the
    net's parameters, each storage once; fn's output). A checkpointed block's own saves go
    to the checkpoint's hooks (and are dropped): this count sees what the graph keeps."""
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = (s.nbytes(), t)  # kept: no address reused while counted
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(n for n, _ in storages.values()), out


def _net_with_inputs(name: str):
    size, channels = (16, 3) if name == "unet-xs" else (8, 2)
    return _net(name, size=size, channels=channels), _inputs(size=size, channels=channels)


@pytest.mark.parametrize("name", ["dit-xs/2", "mmdit-d2/2", "uvit-xs/2", "unet-xs"])
def test_checkpointed_blocks_same_loss_and_gradients(name, monkeypatch):
    """Exactly equal, float32 on the CPU: the recomputation runs the same kernels on the same
    inputs, and the backward is the same graph. And every block's forward runs once more in
    the backward (the recomputation; U-Net: its groups, each layer inside once, not twice)."""
    net, (x, t, cond) = _net_with_inputs(name)
    ref = net(x, t, cond).square().mean()
    ref.backward()
    fast, _ = _net_with_inputs(name)
    checkpoint_blocks(fast)
    in_backward, recomputed = [False], []
    for cls in {type(b) for b in blocks_of(fast)}:
        forward = cls.forward

        def counted(self, *args, _forward=forward, **kwargs):
            if in_backward[0]:
                recomputed.append(self)
            return _forward(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", counted)
    loss = fast(x, t, cond).square().mean()
    in_backward[0] = True
    loss.backward()
    blocks = {id(b) for b in blocks_of(fast)}  # (the U-Net's layers inside its groups: not)
    assert sorted(id(b) for b in recomputed if id(b) in blocks) == sorted(blocks)
    assert ref > 1e-3 and torch.equal(loss, ref)
    for (n, p), q in zip(net.named_parameters(), fast.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), n
        assert p.grad is None or torch.equal(q.grad, p.grad), n


def test_checkpointing_every_other_block_recomputes_those_and_keeps_between():
    """`every=2` (train.activation_checkpointing_every): blocks 0, 2, ... recomputed in the
    backward, the others keep their activations; the same loss and gradients; the bytes saved
    for the backward between none and all checkpointed."""
    net, (x, t, cond) = _net("dit-s/4", size=16, channels=4), _inputs(size=16, channels=4)
    plain, ref = _saved_bytes(lambda: net(x, t, cond).square().mean(), net)
    ref.backward()
    saved = {}
    for every in (1, 2):
        fast = _net("dit-s/4", size=16, channels=4)
        checkpoint_blocks(fast, every)
        patched = [i for i, b in enumerate(fast.blocks) if "forward" in vars(b)]
        assert patched == list(range(0, len(fast.blocks), every))
        saved[every], loss = _saved_bytes(lambda f=fast: f(x, t, cond).square().mean(), fast)
        loss.backward()
        assert torch.equal(loss, ref)
        for p, q in zip(net.parameters(), fast.parameters(), strict=True):
            assert p.grad is None or torch.equal(q.grad, p.grad)
    # half the blocks keep their activations: about half way, well above all checkpointed
    assert saved[1] < 0.6 * saved[2] and 0.35 * plain < saved[2] < 0.7 * plain, (saved, plain)
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="every must be an int >= 1"):
            checkpoint_blocks(_net("dit-xs/2"), bad)


def test_checkpointed_blocks_keep_a_fraction_of_the_activations():
    """What the graph holds for the backward after one forward of a DiT: without, every op's
    saved inputs; with, each block's inputs (the stream, the conditioning) and what lies
    outside the blocks."""
    net, (x, t, cond) = _net("dit-s/4", size=16, channels=4), _inputs(size=16, channels=4)
    plain, _ = _saved_bytes(lambda: net(x, t, cond), net)
    checkpoint_blocks(net)
    kept, _ = _saved_bytes(lambda: net(x, t, cond), net)
    assert plain > 2**20  # 12 blocks x 3 images x 16 tokens x 384 channels, many tensors each
    assert kept < plain / 3
    # in evaluation (grad still on; and under no_grad) the blocks run plainly: as before
    net.eval()
    assert _saved_bytes(lambda: net(x, t, cond), net)[0] == plain


def test_checkpoint_blocks_keeps_keys_and_hooks_and_refuses_a_net_without_blocks():
    from dit_bench.fast import bf16_stream

    net = _net("dit-xs/2")
    keys = list(net.state_dict())
    assert checkpoint_blocks(net) is net and list(net.state_dict()) == keys
    twin = copy.deepcopy(net)  # as the EMA copy is made: each block runs its own weights
    assert all(b.forward.__self__ is b for b in twin.blocks)
    # bf16_stream's pre-hooks, either order: the block (and its recomputation) gets bf16
    x, t, cond = _inputs()
    for nets in (
        (bf16_stream(_net("dit-xs/2")), checkpoint_blocks(bf16_stream(_net("dit-xs/2")))),
        (bf16_stream(_net("dit-xs/2")), bf16_stream(checkpoint_blocks(_net("dit-xs/2")))),
    ):
        losses = []
        for n in nets:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                losses.append(n(x, t, cond).float().square().mean())
            losses[-1].backward()
        assert torch.equal(*losses)
        for p, q in zip(*(n.parameters() for n in nets), strict=True):
            assert p.grad is None or torch.equal(p.grad, q.grad)
    with pytest.raises(ValueError, match="checkpoint_blocks needs a net made of blocks.*Linear"):
        checkpoint_blocks(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_compiled_checkpointed_backbone_matches_eager():
    """compile_backbone and checkpoint_blocks, in either order: the eager gradients (within
    compilation's rounding, as test_compiled_backbone_matches_eager), one block graph, and
    the checkpoint kept through compilation (the compiled forward saves a fraction)."""
    from torch._dynamo.utils import counters

    net = _net("dit-xs/2")
    x, t, cond = _inputs()
    ref = net(x, t, cond).square().mean()
    ref.backward()
    saved = {}
    for order in ("checkpoint first", "compile first"):
        counters.clear()
        fast = _net("dit-xs/2")
        if order == "checkpoint first":
            compile_backbone(checkpoint_blocks(fast))
        else:
            checkpoint_blocks(compile_backbone(fast))
        saved[order], loss = _saved_bytes(lambda f=fast: f(x, t, cond).square().mean(), fast)
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], order
        torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-5)
        loss.backward()
        for p, q in zip(net.parameters(), fast.parameters(), strict=True):
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-3)
    fast = compile_backbone(_net("dit-xs/2"))
    plain, _ = _saved_bytes(lambda: fast(x, t, cond), fast)
    assert max(saved.values()) < plain / 3
    torch.compiler.reset()


def test_step_variant_checkpoint_times_the_shipped_step_checkpointed():
    """`python -m dit_bench.step_variants --variants regional,checkpoint` (its ms and
    peak_mem_gb on a GPU): the compiled step with its blocks checkpointed, the same losses."""
    from test_step_variants import CPU, TINY

    from dit_bench import step_variants

    with step_variants.variant_settings("checkpoint", backend="eager"):
        net, _, _ = step_variants.build_variant(
            "checkpoint", "dit-xs/4", TINY, CPU, backend="eager"
        )
    assert all("forward" in vars(b) and _compiled(b) for b in net.blocks)
    with step_variants.variant_settings("checkpoint-half", backend="eager"):
        net, _, _ = step_variants.build_variant(
            "checkpoint-half", "dit-xs/4", TINY, CPU, backend="eager"
        )
    patched = [i for i, b in enumerate(net.blocks) if "forward" in vars(b)]
    assert patched == list(range(0, len(net.blocks), 2))  # train.activation_checkpointing_every=2
    with pytest.raises(ValueError, match="exclude each other"):
        step_variants.parse_variant("checkpoint+checkpoint-half")
    variants = ("regional", "checkpoint", "checkpoint-half")
    rows = step_variants.run_variants(variants, "dit-xs/4", TINY, CPU, rows=[], backend="eager")
    assert [r["loss_last"] for r in rows] == [rows[0]["loss_last"]] * 3, rows


# -- the training module applies the fast paths from the config --------------------------------


def _module(*overrides):
    from dit_bench.config import build_config
    from dit_bench.data import data_info
    from dit_bench.train.module import DiffusionModule

    cfg = build_config(
        None,
        [
            "data.name=shapes",
            "data.image_size=16",
            "backbone.name=dit-xs/4",
            "train.steps=2",
            *overrides,
        ],
    )
    torch.manual_seed(0)
    return cfg, DiffusionModule(cfg, data_info(cfg.data))


def test_module_compiles_backbone_only_and_keeps_checkpoint_keys():
    cfg, fast = _module("train.compile=true", "optim.fused=true")
    plain_cfg, plain = _module()
    assert all(_compiled(b) for b in fast.net.blocks)
    assert not any(_compiled(m) for m in fast.ema.modules())  # the EMA copy stays eager
    assert not _compiled(fast)  # not the LightningModule
    assert list(fast.state_dict()) == list(plain.state_dict())
    for k, v in plain.state_dict().items():  # same init: the compile wrapper changes nothing
        torch.testing.assert_close(fast.state_dict()[k], v)
    opt = fast.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    assert opt.defaults["fused"] is True
    plain_opt = plain.configure_optimizers()
    plain_opt = plain_opt["optimizer"] if isinstance(plain_opt, dict) else plain_opt
    assert plain_opt.defaults["fused"]  # null: fused on the CPU too
    unfused = _module("optim.fused=false")[1].configure_optimizers()
    assert not (unfused["optimizer"] if isinstance(unfused, dict) else unfused).defaults["fused"]
    # execution keys: a run resumes across them
    assert cfg.hash == plain_cfg.hash


def test_module_checkpoints_the_trained_net_only():
    """train.activation_checkpointing: the trained net's blocks, not the EMA copy's (it runs
    under no_grad); with train.compile too; the same checkpoint keys and run directory."""
    plain_cfg, plain = _module()
    for extra in ([], ["train.compile=true"]):
        cfg, m = _module("train.activation_checkpointing=true", *extra)
        assert all("forward" in vars(b) for b in m.net.blocks)
        assert not any("forward" in vars(b) for b in m.ema.blocks)
        assert all(_compiled(b) for b in m.net.blocks) == bool(extra)
        assert list(m.state_dict()) == list(plain.state_dict())
        assert cfg.hash == plain_cfg.hash  # an execution key: a run resumes across it
    assert not any("forward" in vars(b) for b in plain.net.blocks)
    _, m = _module("train.activation_checkpointing=true", "train.activation_checkpointing_every=2")
    assert [i for i, b in enumerate(m.net.blocks) if "forward" in vars(b)] == [0, 2]


def test_cudagraphs_config_rules_and_module(monkeypatch):
    """train.cudagraphs: the backbone compiled in mode reduce-overhead and each training step
    a new CUDA-graph step; refused where it cannot replay (no compile, the CPU, FSDP, the
    trained net sampled); an execution key, like train.compile."""
    from dit_bench.config import ConfigError
    from dit_bench.train import module as module_mod

    for extra, why in (
        ([], "needs train.compile=true"),
        (["train.compile=true", "train.accelerator=cpu"], "accelerator is 'cpu'"),
        (["train.compile=true", "train.strategy=fsdp"], "FSDP gathers and frees"),
        (["train.compile=true", "eval.use_ema=false"], "keep eval.use_ema=true"),
    ):
        with pytest.raises(ConfigError, match=why):
            _module("train.cudagraphs=true", *extra)
    modes = []
    monkeypatch.setattr(module_mod, "compile_backbone", lambda net, mode=None: modes.append(mode))
    cfg, m = _module("train.compile=true", "train.cudagraphs=true")
    plain_cfg, plain = _module("train.compile=true")
    assert modes == ["reduce-overhead", None] and cfg.hash == plain_cfg.hash
    grads_at_step = []
    monkeypatch.setattr(
        torch.compiler,
        "cudagraph_mark_step_begin",
        lambda: grads_at_step.append([p.grad for p in m.net.parameters()]),
    )
    for module in (m, plain):
        module.trainer = SimpleNamespace(global_step=0, global_rank=0, world_size=1)
        module.log = lambda *args, **kwargs: None
        for p in module.net.parameters():  # the last step's gradients (the graphs' pool)
            p.grad = torch.ones_like(p)
        x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
        module.training_step((x, y), 0)
    # the cudagraphs module's step only, its last gradients already dropped (the replay
    # overwrites their memory); the plain one leaves them to Lightning's zero_grad
    assert len(grads_at_step) == 1 and all(g is None for g in grads_at_step[0])
    assert all(p.grad is not None for p in plain.net.parameters())


def test_module_channels_last():
    _, m = _module("backbone.name=unet-xs", "train.channels_last=true")
    conv = m.net.input_blocks[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert m.ema.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 16, 16)
    y = torch.tensor([1, 2])
    out = m.net(x.contiguous(memory_format=torch.channels_last), torch.ones(2), Cond(labels=y))
    assert out.shape == (2, 3, 16, 16)


@pytest.mark.slow
def test_training_run_with_compile_and_fused(tmp_path, capfd):
    """The Lightning run with the backbone compiled and fused AdamW: trains, checkpoints with
    the eager parameter names, and lands near the plain run's loss. With train.cudagraphs too
    (on the CPU: the compiled step without graphs, after a note), the same."""
    import json

    from dit_bench.config import build_config
    from dit_bench.train.run import train

    base = ["data.name=shapes", "data.image_size=8", "data.num_samples=64", "eval.val_images=8"]
    base += ["backbone.name=dit-xs/4", "train.steps=4", "train.batch_size=8", "train.log_every=2"]
    base += ["train.val_every=4", "eval.samples_per_class=1", "eval.sample_steps=2"]
    runs = {}
    fast = ["train.compile=true", "optim.fused=true"]
    for name, extra in (
        ("plain", []),
        ("fast", fast),
        ("graphs", [*fast, "train.cudagraphs=true"]),
    ):
        cfg = build_config(None, [*base, *extra])
        runs[name] = train(cfg, tmp_path / name, progress=False)
    summaries = {k: json.loads((v / "summary.json").read_text()) for k, v in runs.items()}
    assert summaries["fast"]["val_loss"] == pytest.approx(summaries["plain"]["val_loss"], rel=1e-3)
    assert summaries["graphs"]["val_loss"] == pytest.approx(summaries["fast"]["val_loss"], rel=1e-6)
    assert "no CUDA device here, so no CUDA graphs" in capfd.readouterr().err
    state = torch.load(runs["fast"] / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any("_orig_mod" in k for k in state["state_dict"])


def _traced_ops(fn, *args) -> str:
    """The FX graph (with any autograd.Function subgraphs) that torch.compile traces for fn:
    Dynamo only, no Inductor, so it is cheap."""
    import torch._dynamo

    graphs = []
    torch._dynamo.reset()
    torch.compile(fn, backend=_recorder(graphs), fullgraph=True)(*args)
    torch._dynamo.reset()
    return "\n".join(m.print_readable(print_output=False) for m in graphs)


def test_compiled_cpu_code_takes_the_rewrites_eager_code_does_not():
    from dit_bench.backbones.layers import SHORT_ATTENTION_TOKENS, TanhGELU, attention

    short = [torch.randn(2, 3, 16, 8) for _ in range(3)]
    long = [torch.randn(1, 1, SHORT_ATTENTION_TOKENS + 1, 8) for _ in range(3)]
    assert "scaled_dot_product_attention" not in _traced_ops(attention, *short)
    assert "bmm" in _traced_ops(attention, *short)
    assert "scaled_dot_product_attention" in _traced_ops(attention, *long)
    bf16 = [t.bfloat16() for t in short]  # under bf16 autocast: the fused kernel
    assert "scaled_dot_product_attention" in _traced_ops(attention, *bf16)
    x = torch.randn(4, 8)
    assert "sigmoid" in _traced_ops(TanhGELU(), x) and "gelu" not in _traced_ops(TanhGELU(), x)
    # eager: the ATen kernels, exactly
    torch.testing.assert_close(
        attention(*short), torch.nn.functional.scaled_dot_product_attention(*short), atol=0, rtol=0
    )
    torch.testing.assert_close(
        TanhGELU()(x), torch.nn.functional.gelu(x, approximate="tanh"), atol=0, rtol=0
    )


def test_split_heads_same_views_and_gradient_as_permute_unbind():
    """`split_heads` (unbind the chunks, then move the heads forward) gives the very views the
    permute form gives, and the same gradient: only the backward's memory traffic differs."""
    from dit_bench.backbones.layers import split_heads

    torch.manual_seed(0)
    x = torch.randn(2, 5, 3 * 12, requires_grad=True)
    ours = split_heads(x, 3, 4)
    ref = x.reshape(2, 5, 3, 4, 3).permute(2, 0, 3, 1, 4).unbind(0)
    for a, b in zip(ours, ref, strict=True):
        assert a.shape == b.shape == (2, 4, 5, 3)
        assert a.stride() == b.stride() and a.data_ptr() == b.data_ptr()
    w = torch.randn(3, 2, 4, 5, 3)
    (g_ours,) = torch.autograd.grad(sum((o * w[i]).sum() for i, o in enumerate(ours)), x)
    (g_ref,) = torch.autograd.grad(sum((o * w[i]).sum() for i, o in enumerate(ref)), x)
    torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=0)


def test_shared_cores_note_speaks_up_only_when_other_work_keeps_cores_busy(monkeypatch):
    """Torch's default threads, one per core, wait for each other: a taken core slows every
    step (412 against 183 ms a DiT-XS/2 step on the 2-core machine, one core busy). Other
    processes' time counts, not this one's (the load average still counted, for a minute,
    the run this process had just trained)."""
    import subprocess
    import sys
    import threading

    from dit_bench import fast

    monkeypatch.setattr(fast, "_busy_cores_of_others", lambda: 0.2)
    assert fast.shared_cores_note() is None
    monkeypatch.setattr(fast, "_busy_cores_of_others", lambda: 1.3)
    note = fast.shared_cores_note()
    assert note.startswith("other processes keep 1.3 of ") and "train.threads" in note
    monkeypatch.undo()
    # the measurement: this process busy (a thread spinning through the window) is not
    # "others"; a spinning child is. Against what others keep busy already (the test suite
    # may share the machine: a test run beside it once read 0.96 cores "own")
    base = fast._busy_cores_of_others(window=0.5)
    if base > (os.cpu_count() or 1) - 1:
        pytest.skip(f"other processes keep {base:.1f} cores busy: no free core to measure on")
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            pass

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        own = fast._busy_cores_of_others(window=0.5)
    finally:
        stop.set()
        spinner.join()
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = fast._busy_cores_of_others(window=0.5)
    finally:
        child.kill()
    assert own - base < 0.5 < 0.7 < busy - base, (base, own, busy)


def test_cpu_threads_per_worker_shares_the_cores_this_process_may_run_on(monkeypatch):
    """A SLURM job's cpuset or `taskset` leaves the process fewer cores than the machine has;
    torch's own default counts those (1 thread under `taskset -c 0` on the 2-core machine),
    and a worker's share of the machine's cores (64 each of 2 workers on a 128-core node
    holding a job's 8) would run 16 threads a core."""
    from dit_bench import fast

    monkeypatch.setattr(fast.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(fast.os, "cpu_count", lambda: 128)
    monkeypatch.setattr(fast.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert fast.cpu_threads_per_worker(2) == 4
    assert fast.cpu_threads_per_worker(16) == 1
    monkeypatch.delattr(fast.os, "sched_getaffinity")  # macOS, Windows: the machine's cores
    assert fast.cpu_threads_per_worker(2) == 64
