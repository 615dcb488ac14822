"""Our DiT's training step against diffusers' DiTTransformer2DModel: now `dit-bench bench`.

Kept so the old command still works; it forwards to the bench command (see dit_bench/bench.py):

    python benchmarks/train_step.py                      # DiT-S/2, 16x16x4, batch 32, float32
    python benchmarks/train_step.py --compile --json     # any `dit-bench bench` flag
"""

from __future__ import annotations

import sys

from dit_bench.cli import main

DEFAULTS = ["--backbones", "dit-s/2", "--image-size", "16", "--channels", "4", "--batch", "32"]
DEFAULTS += ["--against", "diffusers", "--no-sample"]

if __name__ == "__main__":
    sys.exit(main(["bench", *DEFAULTS, *sys.argv[1:]]))
