"""Training invariants that the end-to-end tests cannot see.

A run that trains, resumes and reproduces itself can still be wrong in ways that leave every
end-to-end number plausible: an EMA that leans the wrong way, guidance against a real class
instead of the null one, a seed that only one of two random streams obeys, a config key that
changes the numbers but not the run directory. A mutation audit found one-line bugs of each
kind surviving the suite; each test here pins one such invariant against a value worked out by
hand, or against the same computation with one input changed, so that the bug fails it.

Everything runs on the TINY configs of test_train.py and calls module methods directly where
it can: about 10 s in all on two CPU cores.
"""

import shutil
from types import SimpleNamespace
from typing import Literal, get_args, get_origin

import lightning as L
import pytest
import torch
import yaml
from pydantic import BaseModel
from test_train import InterruptAt, read_csv, tiny

from dit_bench.config import (
    EXECUTION_KEYS,
    HASHED_AS_DEFAULT,
    ConfigError,
    build_config,
)
from dit_bench.data.datasets import batch_indices
from dit_bench.data.latents import decode_latents
from dit_bench.data.module import DiffusionDataModule
from dit_bench.data.shapes import ShapesDataset
from dit_bench.fast import ema_update
from dit_bench.train.module import DiffusionModule
from dit_bench.train.run import find_run_dir, sample_images, train

# Tiny models run in-process outside train() (which sets train.threads): on one thread, as
# train() runs them; on two shared cores OpenMP's barriers cost more than the second thread
# saves (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def make_module(*extra: str) -> DiffusionModule:
    torch.manual_seed(0)  # the same initial weights in every test that builds one
    cfg = tiny(*extra)
    return DiffusionModule(cfg, DiffusionDataModule(cfg).info)


def at_step(module: DiffusionModule, step: int) -> DiffusionModule:
    """`module` as Lightning would see it at `step` of a one-process run, without a Trainer:
    training_step only reads the step, the rank and the world size (and logs, dropped here)."""
    module.trainer = SimpleNamespace(global_step=step, global_rank=0, world_size=1)
    module.log = lambda *args, **kwargs: None
    return module


def fit(cfg, tmp_path, callbacks=()) -> DiffusionModule:
    """`cfg.train.steps` real optimiser steps (Lightning's loop, so optimizer_step and its EMA
    update run as in a run), with no run directory, logger or checkpoints; `callbacks` watch."""
    datamodule = DiffusionDataModule(cfg)
    module = DiffusionModule(cfg, datamodule.info)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=cfg.train.steps,
        max_epochs=-1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=list(callbacks),
    )
    trainer.fit(module, datamodule=datamodule)
    return module


# -- EMA ---------------------------------------------------------------------------------------
def test_ema_update_moves_the_average_a_fraction_one_minus_decay_towards_the_weights():
    ema, net = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    with torch.no_grad():
        for p, q in zip(ema.parameters(), net.parameters(), strict=True):
            p.fill_(1.0)
            q.fill_(3.0)
    ema_update(ema, net, decay=0.9)
    for p in ema.parameters():
        # 0.9 * 1 + 0.1 * 3: a decay of 0.9 keeps 90% of the old average
        torch.testing.assert_close(p, torch.full_like(p, 1.2))
    for q in net.parameters():
        assert torch.all(q == 3.0)  # the trained weights are only read


def test_ema_decay_warms_up_from_one_tenth_to_the_configured_decay():
    module = make_module("optim.ema_decay=0.9999")
    # (1 + step) / (10 + step): early averages follow the weights, not the initialisation
    assert module.ema_decay(0) == pytest.approx(0.1)
    assert module.ema_decay(1) == pytest.approx(2 / 11)
    assert module.ema_decay(90) == pytest.approx(91 / 100)
    assert module.ema_decay(10**6) == 0.9999  # the warm-up ends at the configured decay


def test_lr_warmup_gives_the_first_step_one_warmup_share_of_the_rate():
    # (s + 1) / warmup_steps: step 0 already moves the weights (lr / warmup, not 0) and the
    # full rate is reached at step warmup_steps - 1
    module = make_module("optim.lr=0.004", "optim.warmup_steps=4")
    sched = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(5):
        rates.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    assert rates == pytest.approx([0.001, 0.002, 0.003, 0.004, 0.004])


# The EMA copy stays in eval mode on purpose (run.train silences the same two notes).
@pytest.mark.filterwarnings(r"ignore:Found \d+ module\(s\) in eval mode")
@pytest.mark.filterwarnings(r"ignore:.*isinstance\(treespec, LeafSpec\)")
def test_eval_net_is_the_ema_copy_when_use_ema_and_the_trained_net_otherwise(tmp_path):
    cfg = tiny("train.steps=3", "optim.ema_decay=0.5")
    module = fit(cfg, tmp_path)
    ema, net = dict(module.ema.named_parameters()), dict(module.net.named_parameters())
    # after three steps with decay < 1 the two really are different nets
    assert any(not torch.equal(ema[k], net[k]) for k in net)
    assert module.eval_net(use_ema=True) is module.ema
    assert module.eval_net(use_ema=False) is module.net
    assert module.eval_net() is module.ema  # eval.use_ema defaults to true
    module.cfg = tiny("eval.use_ema=false")
    assert module.eval_net() is module.net


# -- the training step's randomness --------------------------------------------------------
def test_label_dropout_replaces_that_fraction_of_labels_with_the_null_class():
    module = make_module("train.label_dropout=0.3")
    seen = []

    def loss(net, x, cond, **kwargs):  # what the objective is asked to fit, not the net's math
        seen.append(cond.labels.clone())
        return {"loss": torch.zeros(len(x))}

    module.objective.loss = loss
    n, steps = 1000, 4
    y = torch.arange(n) % module.info.num_classes
    x = torch.zeros(n, module.info.channels, module.info.image_size, module.info.image_size)
    for step in range(steps):
        at_step(module, step).training_step((x, y.clone()), step)
    labels = torch.stack(seen)  # (steps, n)
    dropped = labels == module.info.num_classes  # the null class, one past the real ones
    assert abs(dropped.float().mean().item() - 0.3) < 0.03  # 4000 draws: 4 standard errors
    assert torch.equal(labels[~dropped], y.expand(steps, n)[~dropped])  # the rest untouched
    # every step draws its own drops (the generator is seeded by the step)
    assert not torch.equal(dropped[0], dropped[1])


def test_training_step_noise_follows_the_run_seed_for_the_same_weights():
    a = make_module()
    same, other = make_module(), make_module("seed=1")
    for m in (same, other):
        m.load_state_dict(a.state_dict())  # only the seed differs, not the initial weights
    x = torch.rand(8, a.info.channels, a.info.image_size, a.info.image_size) * 2 - 1
    y = torch.arange(8)

    def loss(module, step=3):
        with torch.no_grad():
            return at_step(module, step).training_step((x, y.clone()), step).item()

    assert loss(a) == loss(same)
    # another seed draws other times, noise and label drops from the same weights and batch
    assert loss(a) != loss(other)
    assert loss(a) != loss(a, step=4)  # and so does another step


class _Stop(Exception):
    pass


class _InitialWeights(L.Callback):
    """Records the net's weights when training starts, then stops the run."""

    def on_train_start(self, trainer, pl_module):
        self.weights = {k: v.clone() for k, v in pl_module.net.state_dict().items()}
        raise _Stop


def initial_weights(cfg, out) -> dict[str, torch.Tensor]:
    probe = _InitialWeights()
    with pytest.raises(_Stop):
        train(cfg, out, progress=False, callbacks=[probe])
    return probe.weights


def test_train_initialises_the_weights_from_the_run_seed(tmp_path):
    # The step generator and the data order read cfg.seed themselves, so a run whose weight
    # init ignored the seed would still give other losses for another seed: look at the init.
    torch.manual_seed(123)  # whatever the global RNG held before, train() reseeds it
    a = initial_weights(tiny(), tmp_path / "a")
    b = initial_weights(tiny(), tmp_path / "b")
    c = initial_weights(tiny("seed=1"), tmp_path / "c")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


# -- guidance when sampling ----------------------------------------------------------------
def test_guided_sampling_guides_against_the_null_class():
    module = make_module().eval()
    seen = {}

    def sample(net, noise, cond, *, uncond, cfg_scale, **kwargs):
        seen.update(cond=cond.labels.clone(), uncond=uncond.labels.clone(), scale=cfg_scale)
        return noise

    module.objective.sample = sample
    labels = torch.arange(module.info.num_classes)
    sample_images(module, labels, sampler="ddpm", steps=4, cfg_scale=1.5, seed=0)
    assert seen["scale"] == 1.5
    assert torch.equal(seen["cond"], labels)
    # index num_classes is the class label dropout trained; num_classes - 1 is a real digit
    assert torch.equal(seen["uncond"], torch.full_like(labels, module.info.num_classes))


# -- resume --------------------------------------------------------------------------------
def test_resume_restores_the_open_train_loss_window(tmp_path):
    # log_every=3 and a checkpoint at step 4: the window logged at step 6 holds steps 4, 5, 6,
    # and step 4's loss exists only in the checkpoint when the run restarts from it.
    cfg = tiny("train.steps=6", "train.log_every=3", "train.val_every=6")
    ref = train(cfg, tmp_path / "ref", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", progress=False, callbacks=[InterruptAt(5)])
    cut = find_run_dir(tmp_path / "cut", cfg)
    assert torch.load(cut / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    resumed = train(cfg, tmp_path / "cut", progress=False)

    def loss_at_6(run):
        (row,) = [r for r in read_csv(run / "metrics.csv") if r["step"] == "6"]
        return row["train/loss"]

    assert loss_at_6(ref) != ""
    assert loss_at_6(resumed) == loss_at_6(ref)


# -- data ----------------------------------------------------------------------------------
def test_each_epoch_is_another_reproducible_permutation():
    n = 20
    epoch0 = batch_indices(0, n, n, seed=0, cache={})  # one batch = one whole epoch
    epoch1 = batch_indices(1, n, n, seed=0, cache={})
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1  # a fixed order every epoch would repeat the same batches
    assert batch_indices(1, n, n, seed=0, cache={}) == epoch1
    # a batch across the epoch boundary takes the end of one order and the start of the next
    assert batch_indices(1, 15, n, seed=0, cache={}) == epoch0[15:] + epoch1[:10]
    assert batch_indices(1, n, n, seed=1, cache={}) != epoch1


def test_shapes_images_span_minus_one_to_one():
    data = ShapesDataset(40, 16)
    images = torch.stack([data[i][0] for i in range(len(data))])
    # random colours over 40 images: some channel is near 0 and some near 255 in uint8
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert images.min() < -0.9 and images.max() > 0.9


def test_decode_latents_undoes_the_scaling_before_decoding():
    class StubVAE:
        def __init__(self):
            self.weight = torch.zeros(1)

        def parameters(self):
            return iter([self.weight])

        def decode(self, z):
            self.seen = z.clone()
            return SimpleNamespace(sample=z * 0.01)

    vae, z = StubVAE(), torch.full((2, 4, 3, 3), 0.5)
    images = decode_latents(vae, z, scaling_factor=0.18215)
    # encode-latents stores z * scaling_factor: the VAE must see the latents unscaled
    torch.testing.assert_close(vae.seen, z / 0.18215)
    torch.testing.assert_close(images, z / 0.18215 * 0.01)


# -- config --------------------------------------------------------------------------------
def test_full_chain_ddpm_sampling_is_a_valid_config():
    cfg = build_config(None, ["objective.num_timesteps=100", "eval.sample_steps=100"])
    assert cfg.eval.sample_steps == cfg.objective.num_timesteps == 100
    assert build_config(None, ["objective.num_timesteps=100", "eval.val_levels=100"])
    with pytest.raises(ConfigError, match="sample_steps=101"):
        build_config(None, ["objective.num_timesteps=100", "eval.sample_steps=101"])


def _literal_values(annotation) -> list:
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    return [v for a in get_args(annotation) for v in _literal_values(a)]


def _types(annotation) -> set:
    args = get_args(annotation)
    if get_origin(annotation) is Literal:
        return {Literal}
    return set().union(*map(_types, args)) if args else {annotation}


def _alternatives(value, annotation) -> list:
    """Other values of the key's type, in order of preference; the caller keeps the first the
    config accepts (cross-key checks refuse some)."""
    others = [v for v in _literal_values(annotation) if v != value]
    if others:
        return others
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value + 2, value - 1]
    if isinstance(value, float):  # 0.0 * 0.5 is no change
        return [v for v in (value * 0.5, value + 0.01, value * 2) if v != value]
    if isinstance(value, str):
        return [value + "x"]
    if isinstance(value, tuple | list):
        return [[alt, *value[1:]] for alt in _alternatives(value[0], float)]
    types = _types(annotation)  # None: set it
    if bool in types:
        return [True, False]
    if int in types:
        return [2, 3, 4, 8, 12, 16, 24, 48, 96]  # sizes must divide or be divided by others
    return []


def _yaml(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def _leaves(model: BaseModel, prefix: str = ""):
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            yield from _leaves(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value, field.annotation


def test_every_key_that_changes_the_numbers_changes_the_config_hash(latents_root, tmp_path):
    other_root = tmp_path / "other-latents"
    other_root.mkdir()
    shutil.copy(latents_root / "manifest.json", other_root)
    # Keys whose values a type cannot suggest.
    special = {
        "objective.name": ["flow", "ddpm"],
        "backbone.name": ["dit-xs/4"],
        "backbone.conditioning": ["adaln"],
        "data.root": [str(other_root)],
        "data.vae": [str(tmp_path / "vae")],
        "eval.cfg_interval": [[100.0, 900.0]],
        "train.loggers": [["tensorboard"]],
    }
    # Configs in which a key applies at all (the config refuses a key its setting never reads);
    # each key is tried in the first of these that has it and accepts another value for it.
    bases = [
        [],  # the config types' defaults: ddpm on mnist
        ["objective.name=flow"],
        ["objective.name=flow", "objective.density=mode"],  # objective.mode_scale
        ["data.name=shapes"],  # data.num_samples
        ["data.name=latents", f"data.root={latents_root}", "data.vae=/vae"],  # root, vae
        ["eval.sampler=ddim"],  # eval.eta
        ["eval.sampler=euler_maruyama"],  # eval.sde_scale
        ["backbone.name=mmdit-d2/4"],  # backbone.qk_norm
        ["train.precision=bf16-mixed"],  # train.bf16_stream
        ["train.compile=true"],  # train.cudagraphs
        ["train.activation_checkpointing=true"],  # train.activation_checkpointing_every
        ["eval.fd_every=100"],  # eval.fd_samples, eval.fd_features
        ["data.name=folder", f"data.root={tmp_path}", "data.image_size=8"],  # data.split_by
    ]
    # Written out, not read from config.py: a key moved into EXECUTION_KEYS there (so that runs
    # differing in it share a directory) must be argued for here too.
    execution = {
        "train.devices",
        "train.num_nodes",
        # the micro-batches draw their rows of the step's randomness: the same numbers
        "train.accumulate_grad_batches",
        "train.strategy",
        "train.threads",
        "train.loggers",  # experiment trackers beside metrics.csv: what is shown, not computed
        "train.compile",
        "train.cudagraphs",  # replays the compiled graphs: the same kernels
        "train.activation_checkpointing",  # recomputes each block: the same ops, same inputs
        "train.activation_checkpointing_every",  # which blocks recompute: likewise
        "train.channels_last",
        # not train.tf32: TF32's 10-bit mantissa changes float32 GPU work beyond rounding, so
        # tf32=false is hashed (the default, true, is not: test_config_invariants)
        "optim.fused",
        "data.num_workers",
        "train.accelerator",  # HASHED_AS_DEFAULT: cpu and auto train the same numbers on a CPU
    }

    def key_id(cfg, key):  # ddpm's and flow's keys are different keys of one section
        return f"objective[{cfg.objective.name}].{key[10:]}" if key[:10] == "objective." else key

    every, changed = set(), {}
    for base in bases:
        cfg = build_config(None, base)
        for key, value, annotation in _leaves(cfg):
            every.add(key_id(cfg, key))
            if key_id(cfg, key) in changed:
                continue
            for alt in special.get(key, _alternatives(value, annotation)):
                if alt == value:
                    continue
                try:
                    new = build_config(None, [*base, f"{key}={_yaml(alt)}"])
                except ConfigError:
                    continue
                assert new.to_dict() != cfg.to_dict(), key
                changed[key_id(cfg, key)] = (cfg.hash, new.hash, alt)
                break
    assert every - set(changed) == set(), "keys with no other valid value to try"
    assert execution <= set(changed)
    hashed_same = {
        k: alt for k, (h0, h1, alt) in changed.items() if k not in execution and h0 == h1
    }
    assert hashed_same == {}, "these keys change what a run computes, not its hash"
    exec_differ = {k: alt for k, (h0, h1, alt) in changed.items() if k in execution and h0 != h1}
    assert exec_differ == {}, "these keys only say how a run executes, yet move its hash"
    documented = EXECUTION_KEYS + tuple(key[:2] for key in HASHED_AS_DEFAULT)
    assert {f"{section}.{key}" for section, key in documented} == execution
