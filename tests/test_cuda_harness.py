"""The harness's own paths on a GPU (CUDA only; their logic is tested on the CPU elsewhere):
gradient accumulation under bf16-mixed, sharded eval on cuda:0, sampling across the CPU/GPU
move, pinned batches, and TensorBoard beside metrics.csv.

`DIT_BENCH_TEST_DEVICE=cpu` runs them on the CPU instead: a dry run of their logic on a machine
without a GPU (what they check on the CPU is weaker: no device move, nothing to pin)."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dit_bench.cli import main
from dit_bench.config import build_config
from dit_bench.data.module import DiffusionDataModule
from dit_bench.fast import allow_tf32
from dit_bench.metrics import evaluate
from dit_bench.train.callbacks import read_metrics
from dit_bench.train.run import train

DEV = os.environ.get("DIT_BENCH_TEST_DEVICE", "cuda")
ACCELERATOR = "gpu" if DEV == "cuda" else "cpu"
ON = "cuda:0" if DEV == "cuda" else DEV  # --device of eval and sample

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="needs CUDA"),
]

SETTINGS = [
    "experiment=cuda-harness",
    "data.name=shapes",  # built in: the GPU machines have no scikit-learn (digits)
    "data.image_size=16",
    "data.num_samples=256",
    "backbone.name=dit-xs/4",
    "train.steps=6",
    "train.batch_size=16",
    "train.log_every=1",
    "train.val_every=3",
    "train.checkpoint_every=3",
    "optim.lr=1e-3",
    "optim.warmup_steps=2",
    "optim.ema_decay=0.9",
    "eval.val_images=16",
    "eval.samples_per_class=1",
    "eval.sample_steps=4",
]


def has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


# on DEV in bf16-mixed, with one and two micro-batches a step; the first logs to TensorBoard
# where it is installed (the GPU machines may lack it)
BF16 = [*SETTINGS, f"train.accelerator={ACCELERATOR}", "train.precision=bf16-mixed"]
RUNS = {
    "one": [*BF16, *(["train.loggers=[tensorboard]"] if has_tensorboard() else [])],
    "two": [*BF16, "train.accumulate_grad_batches=2"],
    # flow: its samples of a barely trained net are the noise moved a little, not the +-1 of
    # DDPM's (an untrained DiT predicts eps ~ 0): the device move is seen in every pixel
    "cpu": [*SETTINGS, "train.accelerator=cpu", "objective.name=flow", "eval.sampler=euler"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`runs(name)`: the run of RUNS[name], trained once for the file's tests, when first asked."""
    root, made = tmp_path_factory.mktemp("runs"), {}

    def get(name: str):
        if name not in made:
            made[name] = train(build_config(None, RUNS[name]), root / name, progress=False)
        return made[name]

    return get


def state(run) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def test_two_micro_batches_in_bf16_train_what_the_whole_batch_trains(runs):
    one, two = read_metrics(runs("one") / "metrics.csv"), read_metrics(runs("two") / "metrics.csv")
    assert [r["step"] for r in one] == [r["step"] for r in two]  # one row a step
    for x, y in zip(one, two, strict=True):
        for key in ("train/loss", "lr", "val/loss"):
            if x.get(key) or y.get(key):  # bf16 matmuls over 16 rows or 2 x 8: their rounding
                assert float(y[key]) == pytest.approx(float(x[key]), rel=2e-2), (x["step"], key)
    a, b = state(runs("one")), state(runs("two"))
    assert a.keys() == b.keys()  # net and EMA
    gap = size = 0.0
    for k, v in a.items():
        gap += float((b[k].float() - v.float()).square().sum())
        size += float(v.float().square().sum())
    # bf16's rounding: 2e-4 of the weights' norm on the CPU; micro-batches of the same 8 rows
    # (a step that trained on half its batch) 1.4e-2
    assert gap**0.5 <= 2e-3 * size**0.5


def test_shards_on_the_device_merge_to_the_unsharded_eval(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIT_BENCH_CACHE", str(tmp_path / "cache"))
    run, devices = runs("cpu"), []  # flow: samples not at +-1, their features all differ
    real = evaluate.generate

    def spy(module, indices, **kwargs):
        devices.append(next(module.parameters()).device.type)
        return real(module, indices, **kwargs)

    monkeypatch.setattr(evaluate, "generate", spy)
    # chunks of 10: the shards' blocks and the whole eval's chunks hold the same samples, so
    # the GPU's kernels (chosen by batch size) see the same batches
    argv = ["eval", str(run), "--num-samples", "30", "--steps", "2", "--batch-size", "10"]
    argv += ["--metrics", "fd,kid", "--no-anchors", "--quiet", "--device", ON]
    whole = tmp_path / "whole.json"
    assert main([*argv, "-o", str(whole)]) == 0
    assert devices == [DEV] * 3
    for k in range(3):
        assert main([*argv, "--shard", f"{k}/3"]) == 0
    assert len(list(run.glob("eval.json.*.shard-*-of-3.partial.npz"))) == 3
    assert devices == [DEV] * 6
    capsys.readouterr()
    assert main(argv) == 0
    assert devices == [DEV] * 6  # every sample from the shards' files
    a = json.loads(whole.read_text())
    b = json.loads((run / "eval.json").read_text())
    assert a["protocol"]["device"] == b["protocol"]["device"]
    assert b["protocol"]["shards"] == {"0/3": [[0, 10]], "1/3": [[10, 20]], "2/3": [[20, 30]]}
    assert a["metrics"].keys() == b["metrics"].keys()
    for name, value in a["metrics"].items():
        assert b["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-9), name


def sample(run, out, device, monkeypatch) -> tuple[torch.Tensor, np.ndarray]:
    """`dit-bench sample RUN --device device`: the samples generate returned, and the grid."""
    devices, made = [], []
    real = evaluate.generate

    def spy(module, indices, **kwargs):
        devices.append(next(module.parameters()).device.type)
        made.append(real(module, indices, **kwargs))
        return made[-1]

    monkeypatch.setattr(evaluate, "generate", spy)
    argv = ["sample", str(run), "--n", "8", "--steps", "4", "--quiet", "-o", str(out)]
    assert main([*argv, "--device", device]) == 0
    assert devices == [device.partition(":")[0]]
    return made[0], np.asarray(Image.open(out), dtype=np.int16)


def test_a_cpu_run_samples_on_the_device_as_on_the_cpu_and_back(runs, tmp_path, monkeypatch):
    # the checkpoints are read onto the CPU and moved: a CPU run's onto the GPU, a GPU run's
    # back; sample i's noise comes from a CPU generator seeded by (seed, i) on either device
    # (a CUDA generator's stream is another: the GPU drew other samples of the same seeds).
    # In true float32: cuDNN's default TF32 convolutions round the patch embedding to 10 bits,
    # and a barely trained DDPM's x0 magnifies its output's errors 37 times (1e-4 -> 3.7e-3)
    for name in ("cpu", "one"):
        with allow_tf32(False):
            x, grid = sample(runs(name), tmp_path / f"{name}-dev.png", ON, monkeypatch)
        y, back = sample(runs(name), tmp_path / f"{name}-cpu.png", "cpu", monkeypatch)
        torch.testing.assert_close(x, y, rtol=0, atol=1e-3, msg=name)  # float32 kernels
        assert grid.shape == back.shape and np.abs(grid - back).max() <= 1, name  # 8-bit rounding


def test_batches_are_pinned_where_the_run_trains():
    # pinned memory is CUDA's: a train.accelerator=cpu run on a GPU host must not pin
    for accelerator, pinned in (("cpu", False), (ACCELERATOR, DEV == "cuda")):
        data = DiffusionDataModule(
            build_config(None, [*SETTINGS, f"train.accelerator={accelerator}"])
        )
        data.setup("fit")
        loader = data.train_dataloader()
        assert loader.pin_memory is pinned, accelerator
        batch = next(iter(loader))
        tensors = [
            v for v in (batch.values() if isinstance(batch, dict) else batch) if torch.is_tensor(v)
        ]
        assert tensors and all(t.is_pinned() is pinned for t in tensors), accelerator


def test_tensorboard_of_a_device_run_holds_the_numbers_of_metrics_csv(runs):
    if not has_tensorboard():
        pytest.skip("tensorboard is not installed (carry it as a wheel: README, Performance)")
    from test_trackers import csv_columns, scalars

    folder = runs("one") / "tensorboard"
    assert len(list(folder.rglob("events.out.tfevents.*"))) == 1
    csv, tb = csv_columns(runs("one")), scalars(folder)
    assert set(tb) == set(csv)
    for key, rows in csv.items():
        assert [s for s, _ in tb[key]] == [s for s, _ in rows], key
        assert [v for _, v in tb[key]] == pytest.approx([v for _, v in rows], rel=1e-6), key
