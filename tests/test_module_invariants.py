"""DiffusionModule invariants left open by the end-to-end tests (a second mutation audit).

Each test pins one piece of the module's bookkeeping against numbers worked out by hand or
against the same computation made another way: the EMA decay of the step just taken, the
optimiser the config asks for, the per-rank slice of every random draw, the train-loss window,
the weighting of validation batches, the checkpointed clocks, and fast.allow_tf32's restore.

Runs on the TINY configs of test_train.py, calling module methods directly where it can.
"""

import math
import time
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from test_train import tiny
from test_training_invariants import at_step, fit, make_module
from torch import nn

from dit_bench.fast import allow_tf32, bf16_stream, compile_backbone, regional_blocks
from dit_bench.train.module import VAL_NOISE_SEED

# Tiny models run in-process outside train() (which sets train.threads): on one thread, as
# train() runs them; on two shared cores OpenMP's barriers cost more than the second thread
# saves (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def on_rank(module, step: int, rank: int, world_size: int, reduce=None):
    """`module` as rank `rank` of `world_size` processes sees it at `step`, without a Trainer."""
    at_step(module, step)
    strategy = SimpleNamespace(reduce=reduce or (lambda t, reduce_op: t))
    module.trainer = SimpleNamespace(
        global_step=step, global_rank=rank, world_size=world_size, strategy=strategy
    )
    return module


def images(module, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    shape = (n, module.info.channels, module.info.image_size, module.info.image_size)
    return torch.rand(shape, generator=g) * 2 - 1


def stub_loss(module, per_step: list[list[float]]):
    """The objective's per-sample losses replaced by fixed numbers, one list per call."""
    calls = iter(per_step)
    module.objective.loss = lambda net, x, cond, **kw: {"loss": torch.tensor(next(calls))}


# -- EMA ---------------------------------------------------------------------------------------
class _Weights(L.Callback):
    """The net's and the EMA's weights when training starts and after every step."""

    def __init__(self):
        self.net, self.ema = [], []

    def _record(self, module):
        self.net.append({k: v.clone() for k, v in module.net.state_dict().items()})
        self.ema.append({k: v.clone() for k, v in module.ema.state_dict().items()})

    def on_train_start(self, trainer, pl_module):
        self._record(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._record(pl_module)


@pytest.mark.filterwarnings(r"ignore:Found \d+ module\(s\) in eval mode")
@pytest.mark.filterwarnings(r"ignore:.*isinstance\(treespec, LeafSpec\)")
def test_every_optimiser_step_moves_the_ema_with_the_decay_of_that_step(tmp_path):
    # Step s (0-based) averages with decay (1 + s) / (10 + s): 0.1, 2/11, 3/12 (all below the
    # configured 0.9), towards the weights that step produced.
    seen = _Weights()
    module = fit(tiny("train.steps=3"), tmp_path, callbacks=[seen])
    assert len(seen.net) == 4
    assert module.ema.training is False  # the copy samples and validates: eval mode
    assert not any(p.requires_grad for p in module.ema.parameters())
    ema = dict(seen.net[0])  # the EMA starts as the initial weights
    for k in ema:
        torch.testing.assert_close(seen.ema[0][k], ema[k])
    for s, decay in enumerate([1 / 10, 2 / 11, 3 / 12]):
        w = seen.net[s + 1]
        moved = False
        for k in ema:
            if ema[k].is_floating_point():
                ema[k] = decay * ema[k] + (1 - decay) * w[k]
                moved |= not torch.equal(w[k], seen.net[s][k])
            torch.testing.assert_close(seen.ema[s + 1][k], ema[k], rtol=1e-5, atol=1e-7)
        assert moved  # the step really changed the weights


@pytest.mark.filterwarnings(r"ignore:Found \d+ module\(s\) in eval mode")
@pytest.mark.filterwarnings(r"ignore:.*isinstance\(treespec, LeafSpec\)")
def test_the_ema_parameter_lists_are_made_once_a_fit(tmp_path, monkeypatch):
    """Listing the parameters is host work (0.6 ms a step of DiT-S/4 on this CPU): made at the
    first step and kept; the test above checks every step's average with them."""
    from dit_bench.train import module as module_py

    made = []
    real = module_py.ema_pairs
    monkeypatch.setattr(module_py, "ema_pairs", lambda ema, net: made.append(1) or real(ema, net))
    module = fit(tiny("train.steps=4"), tmp_path)
    assert len(made) == 1
    ema_params, net_params = module._ema_pairs  # the module's own tensors, in step
    assert all(p is q for p, q in zip(ema_params, module.ema.parameters(), strict=True))
    assert all(p is q for p, q in zip(net_params, module.net.parameters(), strict=True))
    module.on_fit_start()  # a later fit of the module lists them again (they may be others)
    assert module._ema_pairs is None


# -- optimiser ---------------------------------------------------------------------------------
def test_the_optimiser_is_adamw_over_the_trained_net_as_configured():
    module = make_module("optim.lr=3e-4", "optim.weight_decay=0.05", "optim.betas=[0.8,0.95]")
    opt = module.configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW)  # no warm-up: no scheduler
    d = opt.defaults
    assert (d["lr"], d["betas"], d["weight_decay"]) == (3e-4, (0.8, 0.95), 0.05)
    assert d["fused"] is True  # the default on the CPU
    # the trained weights, each once; never the EMA copy (a frozen second set of moments)
    (group,) = opt.param_groups
    assert [id(p) for p in group["params"]] == [id(p) for p in module.net.parameters()]
    assert make_module("optim.fused=false").configure_optimizers().defaults["fused"] is False


# -- the training step ---------------------------------------------------------------------------
def test_each_rank_draws_its_rows_of_the_global_batchs_randomness():
    # Two processes with 4 rows each see the labels, times and noise one process sees for the
    # same 8 rows: the per-sample losses and label drops match row for row.
    module = make_module("train.label_dropout=0.5")
    with torch.no_grad():
        for p in module.net.parameters():  # at init DiT predicts 0, whatever the labels
            p.add_(0.05 * torch.randn_like(p))
    seen = {}
    loss = module.objective.loss

    def recording(net, x, cond, **kw):
        out = loss(net, x, cond, **kw)
        seen["labels"], seen["loss"] = cond.labels.clone(), out["loss"].detach().clone()
        return out

    module.objective.loss = recording
    x, y = images(module, 8), torch.arange(8)
    with torch.no_grad():
        on_rank(module, 5, 0, 1).training_step((x, y.clone()), 5)
        whole = dict(seen)
        halves = []
        for rank in (0, 1):
            rows = slice(4 * rank, 4 * rank + 4)
            on_rank(module, 5, rank, 2).training_step((x[rows], y[rows].clone()), 5)
            halves.append(dict(seen))
    dropped = whole["labels"] == module.info.num_classes
    assert 0 < dropped.sum() < 8  # some labels dropped, not all: the slice shows
    assert torch.equal(torch.cat([h["labels"] for h in halves]), whole["labels"])
    torch.testing.assert_close(torch.cat([h["loss"] for h in halves]), whole["loss"])


def test_the_step_draws_follow_the_global_step_not_the_batch_index():
    # batch_idx counts from 0 again every epoch (and after a resume): the draws must not repeat
    module = make_module("train.label_dropout=0.5")
    seen = []

    def loss(net, x, cond, **kw):
        seen.append(cond.labels.clone())
        return {"loss": torch.zeros(len(x))}

    module.objective.loss = loss
    x, y = images(module, 64), torch.arange(64) % module.info.num_classes
    on_rank(module, 7, 0, 1).training_step((x, y.clone()), 7)
    on_rank(module, 7, 0, 1).training_step((x, y.clone()), 0)
    on_rank(module, 0, 0, 1).training_step((x, y.clone()), 0)
    assert torch.equal(seen[0], seen[1])
    assert not torch.equal(seen[0], seen[2])


def test_the_step_loss_is_the_batch_mean_and_the_window_its_mean_over_steps():
    module = on_rank(make_module(), 0, 0, 1)
    stub_loss(module, [[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0], [0.5, 1.5, 1.0, 1.0]])
    x, y = images(module, 4), torch.arange(4)
    x.requires_grad_(True)  # a loss with a graph, as in training
    module.objective.loss = _with_graph(module.objective.loss)
    assert module.training_step((x, y), 0).item() == 3.0  # (1 + 2 + 3 + 6) / 4
    assert module.training_step((x, y), 1).item() == 5.0
    assert not module._loss_sum.requires_grad  # a running sum must not hold every step's graph
    assert module.pop_train_loss() == 4.0  # mean of the steps' means, not of the rows
    # the window starts again after each read
    module.training_step((x, y), 2)
    assert module.pop_train_loss() == 1.0
    assert (module._loss_sum.item(), module._loss_count) == (0.0, 0)


def _with_graph(loss):
    def wrapped(net, x, cond, **kw):
        out = loss(net, x, cond, **kw)
        return {"loss": out["loss"] + 0.0 * x.sum()}

    return wrapped


def test_the_window_is_averaged_over_ranks():
    # Strategy.reduce(t, reduce_op="mean") on two ranks whose other rank's window averages 8
    def reduce(t, reduce_op):
        other = torch.tensor(8.0, dtype=t.dtype)
        return {"mean": (t + other) / 2, "sum": t + other}[reduce_op]

    module = on_rank(make_module(), 0, 0, 2, reduce=reduce)
    stub_loss(module, [[2.0, 2.0, 2.0, 2.0]])
    module.training_step((images(module, 4), torch.arange(4)), 0)
    assert module.pop_train_loss() == 5.0  # (2 + 8) / 2


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_a_non_finite_window_stops_the_run(bad):
    module = on_rank(make_module(), 3, 0, 1)
    stub_loss(module, [[1.0, bad]])
    module.training_step((images(module, 2), torch.arange(2)), 3)
    with pytest.raises(FloatingPointError, match="non-finite training loss before step 3"):
        module.pop_train_loss()


# -- validation --------------------------------------------------------------------------------
def test_val_metrics_weight_batches_by_their_images_and_give_each_its_own_noise():
    module = make_module()
    seen = []
    # batch 0: 3 images, per-level losses (1, 2); batch 1: 1 image, (5, 10)
    per_batch = {3: [1.0, 2.0], 1: [5.0, 10.0]}

    def val_loss(net, x, cond, *, seed, **kw):
        seen.append((net, seed))
        per_level = torch.tensor(per_batch[len(x)])
        return {"loss": per_level.mean(), "per_level": per_level}

    module.objective.val_loss = val_loss
    loader = [(images(module, 3), torch.arange(3)), (images(module, 1), torch.arange(1))]
    metrics = module.validation_metrics(loader)
    # level 0: (3 * 1 + 5) / 4 = 2; level 1: (3 * 2 + 10) / 4 = 4; their mean 3
    assert metrics == pytest.approx({"val/loss": 3.0, "val/loss_l0": 2.0, "val/loss_l1": 4.0})
    assert seen == [(module.ema, VAL_NOISE_SEED), (module.ema, VAL_NOISE_SEED + 1)]


# -- checkpoint bookkeeping ----------------------------------------------------------------------
def test_checkpoint_round_trip_keeps_clocks_loss_window_and_fd():
    module = make_module()
    module.train_seconds, module.data_seconds, module.wall_seconds = 30.0, 4.0, 100.0
    module.steady_seconds, module.steady_steps = 20.0, 90
    module.last_train_loss = 0.25
    module.wall_start = time.perf_counter() - 5.0  # this session has run 5 s so far
    module._loss_sum, module._loss_count = torch.tensor(6.5, dtype=torch.float64), 2
    module.last_fd = {"fd": 12.5, "step": 8}
    module.last_val = {"val/loss": 0.5, "step": 8}
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    # the earlier sessions' 100 s plus this one's 5 s
    assert 105.0 <= checkpoint["wall_seconds"] < 110.0
    resumed = make_module()
    resumed.on_load_checkpoint(checkpoint)
    assert (resumed.train_seconds, resumed.data_seconds) == (30.0, 4.0)
    assert (resumed.steady_seconds, resumed.steady_steps, resumed.steady_known) == (20.0, 90, True)
    assert resumed.last_train_loss == 0.25  # the progress bar shows it again on resume
    assert resumed.wall_seconds == checkpoint["wall_seconds"]
    assert (resumed._loss_sum.item(), resumed._loss_count) == (6.5, 2)
    assert resumed.last_fd == {"fd": 12.5, "step": 8}
    assert resumed.last_val == {"val/loss": 0.5, "step": 8}  # the progress lines show it again


def test_a_checkpoint_from_before_the_steady_count_leaves_it_unknown():
    """Its train_seconds are earlier sessions' steps, not warm-up: the summary's steady img/s and
    warm-up seconds are unknown (None), not those of the last session alone."""
    module = make_module()
    module.on_load_checkpoint({"train_seconds": 30.0})
    assert (module.steady_seconds, module.steady_steps, module.steady_known) == (0.0, 0, False)
    fresh = make_module()
    fresh.on_load_checkpoint({"train_seconds": 0.0})  # saved before any step was timed
    assert fresh.steady_known


def test_an_unknown_steady_count_stays_unknown_through_later_checkpoints():
    """A run resumed from a checkpoint before the steady count saves it as unknown: a second
    resume does not take the later sessions' count for the whole run's. A checkpoint with the
    count but not the flag (seconds, steps: written before the flag) knew it."""
    module = make_module()
    module.on_load_checkpoint({"train_seconds": 30.0})
    module.steady_seconds, module.steady_steps = 4.0, 10  # the resumed session's steps
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    resumed = make_module()
    resumed.on_load_checkpoint(checkpoint)
    assert (resumed.steady_seconds, resumed.steady_steps, resumed.steady_known) == (4.0, 10, False)
    two_fields = make_module()
    two_fields.on_load_checkpoint({"train_seconds": 30.0, "steady": (20.0, 90)})
    assert (two_fields.steady_seconds, two_fields.steady_steps) == (20.0, 90)
    assert two_fields.steady_known


def test_a_checkpoint_from_before_the_wall_clock_leaves_it_unknown_through_later_ones():
    """A checkpoint of an older version without wall_seconds: the earlier sessions' wall time
    is unknown, so the summary's is None, not the later sessions' alone (a run of 300 steps
    resumed at step 90 recorded 11.4 s of wall clock against 12.1 s of training steps). A
    checkpoint saved before any step was timed had no earlier session to lose."""
    module = make_module()
    module.on_load_checkpoint({"train_seconds": 30.0})
    module.wall_start = time.perf_counter() - 5.0
    assert module.elapsed_wall_seconds() is None
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    resumed = make_module()
    resumed.on_load_checkpoint(checkpoint)
    resumed.wall_start = time.perf_counter()
    assert resumed.elapsed_wall_seconds() is None
    fresh = make_module()
    fresh.on_load_checkpoint({"train_seconds": 0.0})
    fresh.wall_start = time.perf_counter() - 5.0
    assert 5.0 <= fresh.elapsed_wall_seconds() < 10.0


def test_a_checkpoint_without_a_config_hash_loads_one_with_another_does_not():
    module = make_module()
    module.on_load_checkpoint({"train_seconds": 3.0})  # written before hashes were stored
    assert module.train_seconds == 3.0
    with pytest.raises(ValueError, match="refusing to resume a different experiment"):
        module.on_load_checkpoint({"config_hash": "0" * 12})


# -- fast.allow_tf32 -----------------------------------------------------------------------------
def test_allow_tf32_sets_both_flags_and_restores_each_its_own_value():
    # The flags are plain globals, settable without a GPU.
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (matmul.allow_tf32, cudnn.allow_tf32)
    try:
        matmul.allow_tf32, cudnn.allow_tf32 = False, True  # distinct: a swap would show
        with allow_tf32():
            assert (matmul.allow_tf32, cudnn.allow_tf32) == (True, True)
        assert (matmul.allow_tf32, cudnn.allow_tf32) == (False, True)
        with allow_tf32(False):
            assert (matmul.allow_tf32, cudnn.allow_tf32) == (False, False)
        assert (matmul.allow_tf32, cudnn.allow_tf32) == (False, True)
        with pytest.raises(RuntimeError), allow_tf32():
            raise RuntimeError  # restored on the way out of an error too
        assert (matmul.allow_tf32, cudnn.allow_tf32) == (False, True)
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before


# -- fast.regional_blocks / compile_backbone ------------------------------------------------------
class _Blocks(nn.Module):
    def __init__(self, *blocks: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.LayerNorm(3)  # not a block: another class than the blocks'


def test_regional_compilation_takes_at_most_two_block_graphs():
    same = _Blocks(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3))
    assert regional_blocks(same) == list(same.blocks)
    two = _Blocks(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2))  # a last block differs
    assert regional_blocks(two) == list(two.blocks)
    # three shapes would need three graphs: the net is compiled whole
    assert regional_blocks(_Blocks(nn.Linear(3, 3), nn.Linear(3, 2), nn.Linear(2, 3))) is None
    assert regional_blocks(nn.Sequential(nn.Linear(3, 3))) is None  # no block list


def test_compile_backbone_passes_mode_and_backend_to_every_compiled_module(monkeypatch):
    calls = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: calls.append((self, kw)))
    monkeypatch.setattr(torch.compiler, "reset", lambda: calls.append("reset"))
    blocks = _Blocks(nn.Linear(3, 3), nn.Linear(3, 3))
    assert compile_backbone(blocks, "reduce-overhead", "eager") is blocks
    kw = {"mode": "reduce-overhead", "backend": "eager"}
    assert calls == ["reset", (blocks.blocks[0], kw), (blocks.blocks[1], kw)]
    calls.clear()
    whole = _Blocks(nn.Linear(3, 3), nn.Linear(3, 2), nn.Linear(2, 3))
    compile_backbone(whole)
    assert calls == ["reset", (whole, {"mode": None, "backend": "inductor"})]


# -- fast.bf16_stream ----------------------------------------------------------------------------
class _Seen(nn.Module):
    def forward(self, x):
        self.dtype = x.dtype
        return x


def test_the_stream_hook_casts_to_the_autocast_dtype_in_force():
    net = bf16_stream(_Blocks(_Seen(), _Seen()))
    for dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cpu", dtype=dtype):
            for block in net.blocks:
                block(torch.randn(2, 3, 4))
                assert block.dtype == dtype
