"""train.strategy=fsdp on the CPU, one process (gloo; FSDP's NO_SHARD, as on one GPU): the
harness's own FSDP path (its wrap policy, its FSDP clip, the EMA update over FSDP's tensors,
FSDP's full state dict) ends with the numbers of a plain run, and checkpoints move between
the two. Lightning refuses FSDP off CUDA (an exact-type check of FSDPStrategy) and torch's
FSDP wants an accelerator unless it is given `device_id`; the subprocess's script passes
both, and lifts the harness's own CPU refusal (`run.check_fsdp_device`). The CUDA test
(tests/test_cuda_fsdp.py) checks the same on a GPU, where nothing is lifted."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_ddp import SETTINGS as DDP_SETTINGS

from dit_bench.config import build_config
from dit_bench.train.run import find_run_dir, load_module, train

# test_ddp's run, under its own name and without train.accelerator=cpu (refused with fsdp)
SETTINGS = ["experiment=fsdp-cpu"] + [
    s for s in DDP_SETTINGS if not s.startswith(("experiment=", "train.accelerator="))
]

CPU_FSDP_CLI = """
import sys

import torch
from lightning.pytorch.strategies import FSDPStrategy

from dit_bench import cli
from dit_bench.train import run


class CPUFSDP(FSDPStrategy):
    # a subclass: Lightning's CPU refusal checks `type(strategy) is FSDPStrategy`
    def _setup_model(self, model):
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),  # else torch's FSDP looks for an accelerator
            **self.kwargs,
        )


strategy = run._strategy


def cpu_strategy(name, module):
    s = strategy(name, module)
    assert isinstance(s, FSDPStrategy), s
    return CPUFSDP(**s.kwargs)


run._strategy = cpu_strategy
run.check_fsdp_device = lambda strategy, on_gpu: None
sys.exit(cli.main())
"""


def fsdp_train(out: Path, extra: list[str]) -> None:
    """`dit-bench train` with train.strategy=fsdp on the CPU, in a subprocess (its process
    group stays out of this one)."""
    out.mkdir(parents=True, exist_ok=True)
    script = out / "cpu_fsdp_cli.py"
    script.write_text(CPU_FSDP_CLI)
    empty = out / "empty.yaml"
    empty.write_text("{}\n")
    sets = [a for s in [*SETTINGS, *extra, "train.strategy=fsdp"] for a in ("--set", s)]
    done = subprocess.run(
        [sys.executable, str(script), "train", str(empty), "--no-progress", "--out", str(out)]
        + sets,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def assert_same_weights(a: Path, b: Path, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()  # full (unsharded) state dict, EMA included
    assert any(k.startswith("ema.") for k in sa)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=atol, msg=k)


def restart_from_step_4(src: Path, out: Path) -> Path:
    dst = out / src.parent.name / src.name
    shutil.copytree(src, dst)
    (dst / "summary.json").unlink()
    shutil.copy(dst / "checkpoints" / "step=0000004.ckpt", dst / "checkpoints" / "last.ckpt")
    return dst


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path; CUDA: test_cuda_fsdp.py")
def test_fsdp_on_one_cpu_process_equals_plain_and_its_checkpoint_resumes_plain(tmp_path):
    cfg = build_config(None, SETTINGS)
    plain = train(cfg, tmp_path / "plain", progress=False)
    fsdp_train(tmp_path / "fsdp", [])
    fsdp = find_run_dir(tmp_path / "fsdp", cfg)  # same hash: the strategy is not hashed
    assert fsdp is not None and (fsdp / "summary.json").exists()
    assert_same_weights(plain, fsdp)
    assert (fsdp / "metrics.csv").read_text() == (plain / "metrics.csv").read_text()
    # sample and eval read the FSDP checkpoint as a plain one
    module = load_module(fsdp)
    assert module.checkpoint_step == 8
    # an FSDP checkpoint resumes in a plain run ...
    resumed = restart_from_step_4(fsdp, tmp_path / "fsdp_to_plain")
    assert train(cfg, tmp_path / "fsdp_to_plain", progress=False) == resumed
    assert_same_weights(plain, resumed)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path; CUDA: test_cuda_fsdp.py")
def test_a_plain_checkpoint_resumes_under_fsdp(tmp_path):
    """The other way (a subprocess more, past a minute with the test above): FSDP loads a plain
    run's full state dict and its optimiser state (keyed by index, FSDP's by name)."""
    cfg = build_config(None, SETTINGS)
    plain = train(cfg, tmp_path / "plain", progress=False)
    resumed = restart_from_step_4(plain, tmp_path / "plain_to_fsdp")
    fsdp_train(tmp_path / "plain_to_fsdp", [])
    assert (resumed / "summary.json").exists()
    assert_same_weights(plain, resumed)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path; CUDA: test_cuda_fsdp.py")
def test_fsdp_trains_the_unet(tmp_path):
    """The U-Net's EmbedSequential groups hand the embedding to their ResBlocks by type: a
    ResBlock wrapped in an FSDP unit of its own got none (TypeError at the first step). Not
    bit-equal to the plain run (FSDP's clip sums the norm in another order, and the
    zero-initialised output convs' Adam steps amplify the rounding): to a looser tolerance."""
    unet = ["backbone.name=unet-xs", "backbone.conditioning=adagn"]
    cfg = build_config(None, SETTINGS + unet)
    plain = train(cfg, tmp_path / "plain", progress=False)
    fsdp_train(tmp_path / "fsdp", unet)
    assert_same_weights(plain, find_run_dir(tmp_path / "fsdp", cfg), rtol=1e-3, atol=2e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path; CUDA: test_cuda_fsdp.py")
def test_fsdp_with_two_micro_batches_equals_plain(tmp_path):
    """train.accumulate_grad_batches=2 through the harness's FSDP path (one process: FSDP's
    gradients summed over the micro-batches, its own clip of the sum, the EMA once a step)."""
    cfg = build_config(None, SETTINGS)
    plain = train(cfg, tmp_path / "plain", progress=False)
    fsdp_train(tmp_path / "fsdp", ["train.accumulate_grad_batches=2"])
    fsdp = find_run_dir(tmp_path / "fsdp", cfg)
    assert fsdp is not None and (fsdp / "summary.json").exists()
    assert_same_weights(plain, fsdp)
