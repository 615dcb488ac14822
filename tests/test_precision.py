"""Mixed precision in training: gradient clipping under every precision (with the fused AdamW
the harness defaults to), and `train.bf16_stream`, the residual stream kept in bf16."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from dit_bench import fast
from dit_bench.backbones import Cond, build_backbone
from dit_bench.config import ExperimentConfig, build_config
from dit_bench.train.run import train

# Tiny models run in-process outside train() (which sets train.threads): on one thread, as
# train() runs them; on two shared cores OpenMP's barriers cost more than the second thread
# saves (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "experiment=tiny",
    "data.name=digits",
    "backbone.name=dit-xs/4",
    "train.steps=4",
    "train.batch_size=8",
    "train.log_every=2",
    "train.val_every=4",
    "train.checkpoint_every=4",
    "train.threads=1",
    "eval.val_images=16",
    "eval.samples_per_class=1",
    "eval.sample_steps=2",
]


def off_zero_init(net: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))


class GradNormAfterStep(L.Callback):
    """The total gradient norm each optimiser step used (clipped, and unscaled under 16-mixed):
    Lightning zeroes the gradients at the start of the next step, not after this one."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        grads = [p.grad.norm() for p in pl_module.net.parameters() if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack(grads)).item())


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_gradients_are_clipped_under_every_precision_with_fused_adamw(tmp_path, precision):
    """Lightning's mixed-precision plugin refuses to clip for an optimiser that unscales its own
    gradients (fused AdamW), bf16 included: every bf16-mixed run failed at its first step.
    (16-mixed is bf16-mixed on the CPU, in Lightning: its loss scaling is tested below.)"""
    clip = 1e-3  # far below the tiny DiT's gradient norm: every step clips
    cfg = build_config(None, [*TINY, f"train.precision={precision}", f"optim.grad_clip={clip}"])
    assert cfg.optim.fused is None  # the default: fused on the CPU
    seen = GradNormAfterStep()
    train(cfg, tmp_path, progress=False, callbacks=[seen])
    assert len(seen.norms) == cfg.train.steps
    for norm in seen.norms:
        assert norm == pytest.approx(clip, rel=1e-3)


class _FsdpRoot:
    """What the clip sees of Lightning's FSDP-wrapped root: a `clip_grad_norm_` over every
    parameter (one process: NO_SHARD, torch's global-norm clip)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)


@pytest.mark.parametrize("fsdp", [False, True], ids=["plain", "fsdp"])
def test_clipping_unscales_first_under_loss_scaling(fsdp):
    """16-mixed (CUDA): the scaler multiplies the loss by 2^16 and fused AdamW would unscale in
    its step, after the clipping: the clipping unscales first, and the scaler's step then
    passes no scale to the kernel. The update equals that of the unscaled, clipped gradients.
    Under train.strategy=fsdp too, whose clip is the wrapped root's own (it clipped the
    gradients times 2^16 before it unscaled: every step to a norm of clip / 2^16)."""
    from dit_bench.data import data_info
    from dit_bench.train.module import DiffusionModule

    cfg = build_config(None, [*TINY, "optim.grad_clip=1e-3"])
    info = data_info(cfg.data)
    module = DiffusionModule(cfg, info)
    off_zero_init(module.net)  # gradients for every block
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    module._trainer = SimpleNamespace(
        precision_plugin=SimpleNamespace(scaler=scaler),
        model=_FsdpRoot(module) if fsdp else module,
    )
    opt = module.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    reference = copy.deepcopy(module.net)
    d = opt.defaults
    ref_opt = torch.optim.AdamW(
        reference.parameters(), lr=d["lr"], betas=d["betas"], weight_decay=d["weight_decay"]
    )
    assert d["fused"] and not ref_opt.defaults["fused"]
    x = torch.randn(4, info.channels, info.image_size, info.image_size)
    t, cond = torch.tensor([1.0, 200.0, 500.0, 900.0]), Cond(labels=torch.tensor([0, 1, 2, 3]))

    scaler.scale(module.net(x, t, cond).square().mean()).backward()
    module.configure_gradient_clipping(opt, gradient_clip_val=1e-3)
    grads = [p.grad for p in module.net.parameters() if p.grad is not None]
    assert len(grads) > 10
    assert torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) == pytest.approx(1e-3)
    scaler.step(opt)
    scaler.update()

    reference(x, t, cond).square().mean().backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1e-3)
    ref_opt.step()
    for p, q in zip(module.net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_bf16_stream_config_rules_and_hash():
    stream = ["train.precision=bf16-mixed", "train.bf16_stream=true"]
    with pytest.raises(ValueError, match="train.bf16_stream needs train.precision=bf16-mixed"):
        build_config(None, ["train.bf16_stream=true"])
    with pytest.raises(ValueError, match="train.bf16_stream applies to transformers.*unet-xs"):
        build_config(None, [*stream, "backbone.name=unet-xs", "backbone.conditioning=adagn"])
    on = build_config(None, stream)
    off = build_config(None, stream[:1])
    assert on.hash != off.hash  # it changes the numbers: another run
    # A key added later must not rename (and so orphan) the runs made before it: the default
    # experiment's directory hash, as it was before train.bf16_stream existed.
    assert ExperimentConfig().hash == "73efcba81d"


def _block_token_dtypes(net: torch.nn.Module, *inputs) -> list[tuple]:
    """The dtypes of each block's tensor inputs, as the block receives them."""
    seen: list[tuple] = []
    for block in fast.blocks_of(net):  # registered after bf16_stream's hook: runs after it
        block.register_forward_pre_hook(
            lambda m, args: seen.append(
                tuple((a.ndim, a.dtype) for a in args if isinstance(a, torch.Tensor))
            )
        )
    with torch.no_grad():
        net(*inputs)
    return seen


@pytest.mark.parametrize(
    "name,conditioning",
    [
        ("dit-xs/4", "adaln_zero"),
        ("dit-xs/4", "cross_attn"),
        ("mmdit-d2/4", "joint_attn"),
        ("uvit-xs/4", "in_context"),
    ],
)
def test_bf16_stream_casts_the_token_streams_only_under_autocast(name, conditioning):
    """Every token tensor a block gets, (B, T, D) (DiT's stream and its cross-attention context,
    MMDiT's image and context streams, U-ViT's long skips), is bf16 under autocast, where it
    was float32; the conditioning vectors (B, D) keep their dtype; outside autocast nothing
    changes."""
    torch.manual_seed(0)
    kw = dict(image_size=16, in_channels=1, num_classes=10, conditioning=conditioning)
    net = build_backbone(name, **kw).eval()
    off_zero_init(net)  # its output is zero whatever the stream
    plain = build_backbone(name, **kw).eval()
    plain.load_state_dict(net.state_dict())
    fast.bf16_stream(net)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10.0, 900.0])
    cond = Cond(labels=torch.tensor([3, 7]))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        seen = _block_token_dtypes(net, x, t, cond)
        before = _block_token_dtypes(plain, x, t, cond)
        out, ref = net(x, t, cond).float(), plain(x, t, cond).float()
    assert seen and len(seen) == len(before)
    for got, was in zip(seen, before, strict=True):
        assert [ndim for ndim, _ in got] == [ndim for ndim, _ in was]
        assert [dtype for ndim, dtype in got if ndim == 3] == [torch.bfloat16] * sum(
            ndim == 3 for ndim, _ in got
        )
        assert [dtype for ndim, dtype in got if ndim != 3] == [
            dtype for ndim, dtype in was if ndim != 3
        ]
    assert any(dtype == torch.float32 for ndim, dtype in before[0] if ndim == 3)
    # a rounding change, within bf16's precision
    assert not torch.equal(out, ref)
    assert (out - ref).norm() / ref.norm() < 3e-2
    # ...and in the backward: the cast is part of the graph, so every weight before a block
    # (patch and context embedders, earlier blocks, skip sources) still learns; a stream cut
    # from its graph changed neither the forward above nor a 4-step loss by more than 1e-5
    out.square().mean().backward()
    ref.square().mean().backward()
    pairs = zip(net.named_parameters(), plain.parameters(), strict=True)
    grads = [(name, p.grad, q.grad) for (name, p), q in pairs]
    assert [name for name, g, w in grads if (g is None) != (w is None)] == []
    grads = [(name, g, w) for name, g, w in grads if w is not None]
    got = torch.cat([g.flatten() for _, g, _ in grads])
    want = torch.cat([w.flatten() for _, _, w in grads])
    assert (got - want).norm() / want.norm() < 3e-2
    for name, g, w in grads:  # each weight that learns at all, within bf16's rounding
        if w.norm() > 1e-3 * want.norm():
            assert (g - w).norm() / w.norm() < 0.2, name

    fp32 = _block_token_dtypes(net, x, t, cond)
    assert all(dtype == torch.float32 for inputs in fp32 for _, dtype in inputs)
    assert torch.equal(net(x, t, cond), plain(x, t, cond))


def test_bf16_stream_trains_and_ema_keeps_the_hook(tmp_path):
    cfg = build_config(None, [*TINY, "train.precision=bf16-mixed", "train.bf16_stream=true"])
    run = train(cfg, tmp_path, progress=False)
    assert (run / "summary.json").exists()

    from dit_bench.data import data_info
    from dit_bench.train.module import DiffusionModule

    module = DiffusionModule(cfg, data_info(cfg.data))
    for net in (module.net, module.ema):  # EMA validates and samples the same way
        assert all(block._forward_pre_hooks for block in net.blocks)
