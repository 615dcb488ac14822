"""A/B of the token stream's memory layout, in the DiT-S/2 training step, eager and compiled.

    .venv/bin/python reports/bench-cpu/ab_token_layout.py [--repeats 15] [--eager]

`PatchEmbed` turns the patch convolution's (B, D, h, w) output into (B, T, D) tokens:
  transposed  `flatten(2).transpose(1, 2)`, a view with the token axis fastest in memory;
              `tokens + pos_embed` and every residual add after it keep that layout (elementwise
              ops follow their first operand), so each LayerNorm and linear copies or
              transposes the stream
  contiguous  the same view made contiguous once (shipped)
Same values either way (tests/test_backbones.py checks every block gets a contiguous stream).
Timed as `dit-bench bench` times the step (DDPM loss with learned sigma, backward, fused AdamW),
DiT-S/2 on 16x16x4, batch 32, float32, both variants in one process, interleaved.
"""

from __future__ import annotations

import argparse

from ab import interleaved_medians, print_medians

import dit_bench.backbones.layers as layers

VARIANTS = ("transposed", "contiguous")
state = {"variant": "contiguous"}


def patch_embed_forward(self, x):
    tokens = self.proj(x).flatten(2).transpose(1, 2)  # (B, T, D), token axis fastest
    return tokens.contiguous() if state["variant"] == "contiguous" else tokens


def select(variant: str) -> None:
    state["variant"] = variant  # Dynamo guards on the block input's strides: one graph each


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--eager", action="store_true", help="time the eager step, not the compiled")
    args = ap.parse_args()
    layers.PatchEmbed.forward = patch_embed_forward
    medians = interleaved_medians(VARIANTS, select, args.repeats, compile=not args.eager)
    print_medians(medians, args.repeats)


if __name__ == "__main__":
    main()
