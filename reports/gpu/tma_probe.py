"""Does a Triton GEMM with the GELU fused into it beat cuBLAS plus a GELU kernel, at the
largest product of DiT-XL/2's training step? One MLP input projection + tanh GELU
(16384x1152 @ 1152x4608, bf16: batch 64 x 256 tokens), forward and forward + backward, each
compiled three ways: the default (cuBLAS and Inductor's fused elementwise kernel),
max-autotune (Inductor's Triton GEMM templates tuned against cuBLAS, epilogues fused into
them), and max-autotune with the persistent TMA templates (`step_variants`' `tma` tweak).
Times: the mean of 50 back-to-back calls between two CUDA events, after 5.

    python reports/gpu/tma_probe.py      # on a CUDA machine; a JSON line per case, also
                                         # appended to $OUT/tma_probe.jsonl when OUT is set
"""

import json
import os
import time

import torch
import torch._inductor.config as inductor_config


def fwd_fn(lin):
    def fwd(x):
        return torch.nn.functional.gelu(lin(x), approximate="tanh")

    return fwd


def mean_ms(fn, n: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def main() -> None:
    out_dir = os.environ.get("OUT")
    out = open(os.path.join(out_dir, "tma_probe.jsonl"), "a") if out_dir else None
    torch.manual_seed(0)
    x = torch.randn(16384, 1152, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    lin = torch.nn.Linear(1152, 4608, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(16384, 4608, device="cuda", dtype=torch.bfloat16)
    cases = (
        ("default", None, False),
        ("max-autotune", "max-autotune-no-cudagraphs", False),
        ("max-autotune+tma", "max-autotune-no-cudagraphs", True),
    )
    for case, mode, tma in cases:
        for what in ("fwd", "fwd+bwd"):
            torch.compiler.reset()
            inductor_config.triton.enable_persistent_tma_matmul = tma
            f = torch.compile(fwd_fn(lin), mode=mode)
            t0 = time.time()
            if what == "fwd":
                with torch.no_grad():
                    ms = mean_ms(lambda f=f: f(x))
            else:
                ms = mean_ms(lambda f=f: f(x).backward(grad))
            row = {"case": case, "what": what, "ms": round(ms, 4)}
            row["compile_and_time_s"] = round(time.time() - t0, 1)
            print(json.dumps(row), flush=True)
            if out:
                out.write(json.dumps(row) + "\n")
                out.flush()


if __name__ == "__main__":
    main()
