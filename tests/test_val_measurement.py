"""The validation loss as a measurement: the y-axis of every ablation table and scaling fit.

Two runs are compared by it, so the same weights must give the same number however the run
was executed, and that number must be the plain mean over every validation image and noise
level, each image with its own fixed noise. Checked against a slow reference that scores one
image at a time.
"""

import json

import pytest
import torch
from test_train import tiny

from dit_bench.backbones import Cond
from dit_bench.data.module import VAL_BATCH, DiffusionDataModule
from dit_bench.train.module import VAL_NOISE_SEED, DiffusionModule


def module_and_data(*extra: str) -> tuple[DiffusionModule, DiffusionDataModule]:
    # 40 images: not a multiple of VAL_BATCH; 3 levels keep the one-image reference short
    cfg = tiny("eval.val_images=40", "eval.val_levels=3", *extra)
    data = DiffusionDataModule(cfg)
    data.setup()
    torch.manual_seed(0)  # the same weights whatever the batch size
    module = DiffusionModule(cfg, data.info).eval()
    # an EMA unlike the init: a net that ignored its inputs would score every draw alike
    with torch.no_grad():
        for p in module.ema.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module, data


@torch.no_grad()
def reference(module: DiffusionModule, data: DiffusionDataModule) -> float:
    """Image i, at level k, gets row i mod B of the k-th draw of a CPU generator seeded
    VAL_NOISE_SEED + i // B (B = VAL_BATCH, the last batch shorter); scored alone."""
    obj, net = module.objective, module.eval_net()
    items = [data.val_set[i] for i in range(len(data.val_set))]
    n = len(items)
    levels = module.cfg.eval.val_levels
    if hasattr(obj, "num_timesteps"):  # DDPM: the midpoints of `levels` parts of 0..T-1
        times = [int((k + 0.5) * obj.num_timesteps / levels) for k in range(levels)]
    else:  # flow: t = k / levels, velocity target
        times = [k / levels for k in range(levels)]
    total = 0.0
    for start in range(0, n, VAL_BATCH):
        rows = range(start, min(start + VAL_BATCH, n))
        g = torch.Generator().manual_seed(VAL_NOISE_SEED + start // VAL_BATCH)
        x0 = torch.stack([items[i][0] for i in rows])
        noises = [torch.randn(x0.shape, generator=g) for _ in times]
        for i in rows:
            x, y = items[i][0][None], torch.tensor([items[i][1]])
            for t, noise in zip(times, noises, strict=True):
                eps = noise[i - start][None]
                if hasattr(obj, "num_timesteps"):
                    a = obj.alphas_cumprod[int(t)].item()
                    x_t, target = a**0.5 * x + (1 - a) ** 0.5 * eps, eps
                    out = net(x_t, torch.tensor([t]), Cond(labels=y))[:, : x.shape[1]]
                else:
                    x_t, target = (1 - t) * x + t * eps, eps - x
                    out = net(x_t, torch.tensor([1000 * t]), Cond(labels=y))
                total += ((out - target) ** 2).mean().item()
    return total / (n * levels)


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_the_val_loss_is_the_mean_over_images_whatever_the_batch_size(objective):
    # Batch k of the validation images had the noise of seed VAL_NOISE_SEED + k in batches of
    # train.batch_size: the same weights scored 0.39852 at batch 32 and 0.39286 at batch 64
    # (a shapes-scaling-cpu run, 3 sd of the noise's own spread), so runs of a batch-size
    # sweep or ablation were not paired.
    values = []
    for batch in (8, 32, 48):
        module, data = module_and_data(f"objective.name={objective}", f"train.batch_size={batch}")
        values.append(module.validation_metrics(data.fixed_val_loader())["val/loss"])
    assert values[0] == pytest.approx(reference(module, data), rel=1e-5)
    assert values[1] == pytest.approx(values[0], rel=1e-6)
    assert values[2] == pytest.approx(values[0], rel=1e-6)


def old_checkpoint(step: int = 4, validated: bool = True) -> dict:
    """What a version before val_protocol checkpointed (no protocol recorded)."""
    return {"global_step": step, "last_val": {"val/loss": 0.5, "step": step} if validated else {}}


@pytest.mark.parametrize(
    ("extra", "changed"),
    [
        ((), True),  # DDPM: the old grid took both ends of 0..T-1
        (("objective.name=flow",), True),  # noise in batches of train.batch_size 8
        (("objective.name=flow", "train.batch_size=32"), False),  # the same numbers
    ],
)
def test_a_resume_from_a_checkpoint_of_the_old_validation_names_the_step(extra, changed):
    cfg = tiny(*extra)
    module = DiffusionModule(cfg, DiffusionDataModule(cfg).info)
    module.on_load_checkpoint(old_checkpoint())
    assert module.val_protocol_changed_at == (4 if changed else None)
    # the old protocol's last val loss is not the summary's (a resume at the last step
    # validates again)
    assert module.last_val == ({} if changed else {"val/loss": 0.5, "step": 4})
    # nothing validated before the checkpoint: no val loss of the old protocol to mix
    module = DiffusionModule(cfg, DiffusionDataModule(cfg).info)
    module.on_load_checkpoint(old_checkpoint(validated=False))
    assert module.val_protocol_changed_at is None
    # this version's checkpoints carry the protocol and the step of an earlier change
    saved: dict = {}
    module.val_protocol_changed_at = 4
    module.on_save_checkpoint(saved)
    again = DiffusionModule(cfg, DiffusionDataModule(cfg).info)
    again.on_load_checkpoint({**saved, "global_step": 8})
    assert again.val_protocol_changed_at == 4 and again.last_val == saved["last_val"]


def test_a_run_resumed_across_validation_protocols_says_where_they_change(tmp_path, capsys):
    """An old partial DDPM run resumed by this version: metrics.csv's val/loss jumps where the
    grid changed, and its summary.json claimed the new grid for the whole run, unsaid."""
    from test_train import InterruptAt

    from dit_bench.train.run import find_run_dir, train

    cfg = tiny()
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path, progress=False, callbacks=[InterruptAt(5)])
    last = find_run_dir(tmp_path, cfg) / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    for key in ("val_protocol", "val_protocol_changed_at"):  # as an older version wrote it
        ckpt.pop(key, None)
    torch.save(ckpt, last)
    capsys.readouterr()
    run = train(cfg, tmp_path, progress=False)
    assert "the val loss's protocol changed at step 4" in capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_protocol_changed_at"] == 4 and summary["val_grid"] == "midpoints"
