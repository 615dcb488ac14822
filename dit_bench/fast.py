"""How a training or sampling step executes, apart from what it computes: the fast paths
training and the benchmark share (each tested equal to the plain path in
tests/test_fast_paths.py and tests/test_cuda_fast_paths.py), and the device's name.

Imports torch and nothing of Lightning or pydantic: the GPU check runs it on machines that
have only torch.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
import types
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _signature(block: nn.Module) -> tuple:
    return (type(block), tuple((n, tuple(p.shape)) for n, p in block.named_parameters()))


def blocks_of(net: nn.Module) -> list[nn.Module]:
    """Every member of the net's block lists, and any other child of a block class (U-ViT's
    middle block). A net may name its block classes (`block_types`): a one-block U-ViT
    (depth 1) has empty block lists, and its middle block is its only block."""
    blocks = [b for m in net.children() if isinstance(m, nn.ModuleList) for b in m]
    kinds = {type(b) for b in blocks} | set(getattr(net, "block_types", ()))
    return blocks + [m for m in net.children() if type(m) in kinds]


def regional_blocks(net: nn.Module) -> list[nn.Module] | None:
    """The blocks `compile_backbone` compiles one by one, or None to compile the net whole.

    The blocks (`blocks_of`), when they need at most two graphs between them (MMDiT's last
    block and U-ViT's skip blocks differ from the rest). Blocks of many shapes (the U-Net's
    changing widths) would need a graph each: the net is compiled whole.
    """
    blocks = blocks_of(net)
    return blocks if blocks and len({_signature(b) for b in blocks}) <= 2 else None


def _stream_in_autocast_dtype(block: nn.Module, args: tuple) -> tuple | None:
    kind = args[0].device.type
    if not torch.is_autocast_enabled(kind):
        return None
    dtype = torch.get_autocast_dtype(kind)
    # token tensors only, (B, T, D): the conditioning vectors (B, D) feed linears, which
    # autocast casts anyway; after the first block the stream already is `dtype` (a no-op)
    return tuple(
        a.to(dtype) if isinstance(a, torch.Tensor) and a.ndim == 3 and a.is_floating_point() else a
        for a in args
    )


def bf16_stream(net: nn.Module) -> nn.Module:
    """Keep a transformer's residual stream in the autocast dtype between its blocks; in place.

    Under autocast the stream is float32: the patch embedding plus the float32 position table,
    then every `x + gate * h` (float32 + bf16 is float32). So every LayerNorm, modulate and
    residual add of every block reads and writes it in float32, and those memory-bound kernels
    took 30% of DiT-XL/2's compiled bf16 step on an H100. A forward pre-hook on each block
    casts its token inputs (the stream; MMDiT's context stream; U-ViT's skips) to the
    autocast dtype, so each block adds in bf16 and the stream's bytes halve. Megatron-LM's
    default (its `fp32_residual_connection` is off). It changes the numbers (the residual adds
    round to bf16): `train.bf16_stream`, hashed, off by default. Outside autocast it does
    nothing. The hook runs inside a compiled block's graph.
    """
    blocks = blocks_of(net)
    if not blocks:
        raise ValueError(f"bf16_stream needs a transformer (block lists); {type(net).__name__}")
    for block in blocks:
        block.register_forward_pre_hook(_stream_in_autocast_dtype)
    return net


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    # The class's own forward, looked up here (not captured at patch time): a deepcopy of the
    # net rebinds this method to the copied block, and runs the copy's. Called with the block
    # as its first argument (a bound method made here would break Dynamo's graph).
    forward = type(self).forward
    if self.training and torch.is_grad_enabled():
        return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)
    return forward(self, *args, **kwargs)


def checkpoint_blocks(net: nn.Module, every: int = 1) -> nn.Module:
    """Activation checkpointing per block, in place: each block's activations are recomputed
    in the backward instead of kept from the forward. Returns the net. `every`: every k-th
    block only (blocks 0, k, 2k, ... in `blocks_of`'s order, which for U-ViT and the U-Net is
    not the order they run in; `train.activation_checkpointing_every`), for part of the memory
    saving at part of the recomputation (about 1/k of each in a stack of equal blocks: DiT,
    MMDiT), where all of it is not needed to fit.

    The backward then holds each block's inputs (the stream between blocks, the conditioning,
    U-ViT's and the U-Net's skips) plus one block's activations at a time, where it held every
    block's: DiT-XL/2's bf16 training step saves 35 MiB an image instead of 382, so batch 256
    needs about 25 GiB in all instead of 109 (`train.activation_checkpointing`; counted by
    reports/bench-cpu/activation_memory.py). The price is a second forward of every block,
    up to a third more compute. The same numbers eager (the recomputation runs the same ops on
    the same inputs), up to rounding compiled (tests/test_fast_paths.py).

    Each block's `forward` is replaced on the instance by one that runs the class's forward
    under torch.utils.checkpoint (non-reentrant) while training with grad enabled, and plainly
    otherwise (evaluation, sampling under no_grad). No wrapper module: state_dict keys do not
    change. A block's forward pre-hooks (`bf16_stream`) run outside the checkpoint, on the
    way in; a compiled block (`compile_backbone`, before or after) calls the replaced forward
    from its compiled `_call_impl`, and Dynamo turns the checkpoint into recomputation inside
    the block's compiled backward graph. The blocks are `blocks_of`'s outermost ones (the
    U-Net's EmbedSequential groups, its middle group once, not its layers again inside it).
    """
    blocks = blocks_of(net)
    inside = {id(m) for b in blocks for m in b.modules() if m is not b}
    blocks = [b for b in blocks if id(b) not in inside]
    if not blocks:
        raise ValueError(
            f"checkpoint_blocks needs a net made of blocks (block lists); {type(net).__name__} "
            "has none"
        )
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"checkpoint_blocks: every must be an int >= 1, got {every!r}")
    for block in blocks[::every]:
        block.forward = types.MethodType(_checkpointed_forward, block)
    return net


def compile_backbone(
    net: nn.Module, mode: str | None = None, backend: str | Callable = "inductor"
) -> nn.Module:
    """torch.compile a backbone in place and return it; state_dict keys do not change.

    Transformers are stacks of identical blocks: each block is compiled on its own ("regional
    compilation", PyTorch's recipe for cutting cold-start time; `regional_blocks`), so
    Dynamo/Inductor compile one block graph (two where the last or the skip blocks differ)
    and every block reuses it: compile time no longer grows with depth, and the step time is
    that of a whole-model compile up to the small embedders and final layer. Other backbones
    (the U-Net) are compiled whole. `mode`: torch.compile's mode (None: the default;
    "max-autotune-no-cudagraphs" tunes matmuls, much slower to compile); `backend`:
    torch.compile's backend.

    Starts from a clean compiler state (`torch.compiler.reset()`): Dynamo compiles a shape it
    has seen change as a dynamic one, so the second model of another width in one process (the
    benchmark's next backbone, a sweep's next trial) would get shape-generic kernels, not the
    static ones the same model gets alone. Code compiled earlier in the process recompiles on
    its next call.
    """
    torch.compiler.reset()
    blocks = regional_blocks(net)
    for module in blocks if blocks is not None else [net]:
        module.compile(mode=mode, backend=backend)
    return net


NO_CXX_COMPILER = (
    "torch.compile found no working C++ compiler, which it needs for the CPU; install one "
    "(g++, clang, Xcode's command-line tools) or name it in CXX"
)


def lacks_cxx_compiler(e: BaseException | None) -> bool:
    """Whether `e` is Inductor finding no C++ compiler (its CPU kernels are C++), however
    Dynamo wrapped it: met at a compiled backbone's first step, torch's own report is a hundred
    lines of compiler internals ending in its class name (a laptop without Xcode's command-line
    tools, Windows without MSVC, a slim container). By name: torch._inductor.exc is private."""
    seen = set()
    while e is not None and id(e) not in seen:  # a chain can loop back on itself
        if type(e).__name__ == "InvalidCxxCompiler":
            return True
        seen.add(id(e))
        e = getattr(e, "inner_exception", None) or e.__cause__
    return False


def fused_adamw_default(device: torch.device | str) -> bool:
    """Fused AdamW (one kernel for every parameter's update) where torch has it: CUDA and CPU.

    It pays on both: on the CPU it makes one pass over parameters, gradients and moments where
    the loops make several; DiT-S/2's 32.9M parameters update in 22 ms fused against 90 ms for
    torch's CPU default (a loop over parameters) and 103 ms multi-tensor (2-core CPU, float32):
    7% of its training step there.
    """
    return torch.device(device).type in ("cuda", "cpu")


@contextlib.contextmanager
def allow_tf32(enabled: bool = True) -> Iterator[None]:
    """TF32 matmuls and convolutions on Ampere+ GPUs for the duration (restored afterwards).

    Set here, around the work, never at import time: a library must not change global state.
    """
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@contextlib.contextmanager
def no_nan_fill() -> Iterator[None]:
    """Deterministic algorithms without their NaN fill of new tensors (restored afterwards).

    torch.use_deterministic_algorithms(True), which Lightning's `deterministic=True` / "warn"
    sets, also fills the memory of every new uninitialised tensor with NaN
    (`torch.utils.deterministic.fill_uninitialized_memory`): a debugging aid that makes a read
    of unwritten memory show. It costs a write of every intermediate buffer: 256 extra fill
    kernels in a compiled DiT-S/4 training step on the CPU, 520 in an eager one. The step
    writes every buffer before it reads it, so the results are the same, bit for bit
    (tests/test_fast_paths.py); the deterministic algorithms themselves stay on.
    """
    old = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = old


def _busy_cores_of_others(window: float = 0.25) -> float | None:
    """How many cores other processes kept busy over the next `window` seconds (Linux's
    /proc/stat, less this process's own time); None elsewhere. Not the load average: that
    still counts, for a minute, the work this very process (or the last command) just did."""

    def sample() -> tuple[float, float]:
        with open("/proc/stat") as f:
            cpu = [float(v) for v in f.readline().split()[1:]]
        idle = cpu[3] + (cpu[4] if len(cpu) > 4 else 0.0)  # idle + iowait
        t = os.times()
        return sum(cpu) - idle, (t.user + t.system) * os.sysconf("SC_CLK_TCK")

    try:
        busy0, own0 = sample()
        time.sleep(window)
        busy1, own1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    ticks = window * os.sysconf("SC_CLK_TCK")
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / ticks


def shared_cores_note() -> str | None:
    """A line for CPU work run with torch's default threads (one per core) while other
    processes keep cores busy, or None. Torch's threads wait for each other at every parallel
    region, so one taken core slows them all: on this project's 2-core machine with one core
    busy, a DiT-XS/2 training step (batch 32) took 412 ms with 2 threads and 183 ms with 1."""
    others = _busy_cores_of_others()
    if others is None or others < 0.75:
        return None
    return (
        f"other processes keep {others:.1f} of {os.cpu_count()} CPUs busy, which torch's "
        f"{torch.get_num_threads()} threads expect free, and one taken core slows them all "
        "(2 to 6 times measured); set fewer threads (train.threads, bench --threads) to the "
        "cores that are free"
    )


def cpu_threads_per_worker(workers: int) -> int | None:
    """torch threads for one of `workers` processes training side by side on this machine's
    CPUs (a sweep's workers, `ablate --jobs`): their share of the cores, since torch's default,
    a thread per core in every process, has each one's threads wait for cores the others hold
    (`shared_cores_note`). None where CUDA trains: the threads are not the step's."""
    if torch.cuda.is_available():
        return None
    return max(1, usable_cpus() // workers)


def usable_cpus() -> int:
    """The CPUs this process may run on: a SLURM job's cpuset or `taskset` leaves it fewer
    than the machine has (os.cpu_count()), and torch's default threads count these."""
    if hasattr(os, "sched_getaffinity"):  # Linux; macOS and Windows have no such mask
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU's model, and the vector instructions torch's CPU kernels use on it.

    Linux names it from /proc/cpuinfo (`cpuinfo`: that file's text, for tests): the model name,
    with its family and model numbers, since a VM's name can be as vague as "AMD EPYC" while
    the generation sets the float32 peak: this project's 2-core machine measured 0.16-0.20
    TFLOP/s in `make bench` on family 25 model 17 (Zen 4, AVX-512 run as two 256-bit halves)
    and 0.34-0.42 on the CPU it had before, under the same name. Elsewhere:
    `platform.processor()`.
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:  # the first processor's block ends at its blank line
                break
            continue
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown"
    if "cpu family" in fields and "model" in fields:
        name += f", family {fields['cpu family']} model {fields['model']}"
    isa = torch.backends.cpu.get_cpu_capability()
    return f"{name}, {isa}" if isa not in ("", "DEFAULT") else name


def trains_on_cuda(accelerator: str) -> bool:
    """Where train.accelerator puts a run: gpu is CUDA (refused without one), auto is CUDA when
    torch sees a device, else the CPU (never another accelerator: Lightning's own auto would
    take Apple's MPS)."""
    return accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available())


def device_name(device: torch.device, threads: int | None = None) -> str:
    """`threads`: the count a run sets (train.threads) where it is not the one in force now."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_name()}, {threads or torch.get_num_threads()} threads)"


EmaPairs = tuple[list[torch.Tensor], list[torch.Tensor]]


def ema_pairs(ema: nn.Module, net: nn.Module) -> EmaPairs:
    """The floating-point parameters of `ema` and `net`, in step, for `ema_update`. Listing
    them is host work the step repeats for nothing while the parameters stay the same
    tensors: 0.6 ms a step for DiT-S/4's 132 on this project's CPU (the lists as
    `ema_update` made them each step), a step of a small model on a GPU being 17 ms."""
    ema_params = [p for p in ema.parameters() if p.dtype.is_floating_point]
    net_params = [p for p in net.parameters() if p.dtype.is_floating_point]
    return ema_params, net_params


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, decay: float, pairs: EmaPairs | None = None) -> None:
    """ema <- decay * ema + (1 - decay) * net, every floating-point parameter, in one foreach
    kernel per dtype (the training step's EMA, also timed by `step_variants`' "ema" tweak).
    `pairs`: `ema_pairs(ema, net)` made once (the module keeps them), else made here."""
    ema_params, net_params = pairs if pairs is not None else ema_pairs(ema, net)
    torch._foreach_lerp_(ema_params, net_params, 1.0 - decay)
