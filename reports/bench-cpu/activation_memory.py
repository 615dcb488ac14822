"""Bytes DiT-XL/2's training step saves for its backward, with and without activation
checkpointing (`fast.checkpoint_blocks`, `train.activation_checkpointing`): what the gpu
profile of sweeps/shapes-scaling.yaml (batch 256 on one GPU) needs.

    .venv/bin/python reports/bench-cpu/activation_memory.py [--backbone dit-xl/2] [--batch 256]
        [--no-autocast] [--every 2]

One forward of the training loss (the DDPM hybrid loss of a learned-sigma net, called as
`DiffusionModule.training_step` calls it: `objective.loss(net, x, cond, generator=g)`) on real
CPU tensors, 32x32x4 latents, under bf16 autocast (the profile's `bf16-mixed`). Every tensor
autograd saves passes a `saved_tensors_hooks` pack hook; their storages are counted once
each (by data pointer). Checkpointed, a block's own saves go to the checkpoint's hooks and
are not kept: the count sees its inputs (the stream, the conditioning). Run at batch 1 and 2:
the difference is the bytes per image; the rest is the batch-free part (autocast's bf16 copies
of the weights, which the linears save). One block's saves are counted too (forward hooks
around each block, the largest): the checkpointed backward recomputes one block at a time.
Not counted: gradients of activations in flight, kernel workspaces, the allocator's slack.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from dit_bench.backbones import Cond, build_backbone
from dit_bench.fast import blocks_of, checkpoint_blocks
from dit_bench.objectives import build_objective

GIB = 2**30


def saved_bytes(net, objective, batch: int, autocast: bool) -> tuple[int, int]:
    """(bytes saved for the backward by one forward of the loss at `batch`, the most of them
    saved inside one block)."""
    storages: dict[int, tuple[int, torch.Tensor]] = {}
    running = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in storages:  # keeps t: its memory is not reused while counted
            storages[s.data_ptr()] = (s.nbytes(), t)
            running[0] += s.nbytes()
        return t

    starts, blocks = [], []
    hooks = [
        b.register_forward_pre_hook(lambda m, a: starts.append(running[0])) for b in net.blocks
    ]
    hooks += [
        b.register_forward_hook(lambda m, a, o: blocks.append(running[0] - starts.pop()))
        for b in net.blocks
    ]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, net.in_channels, net.image_size, net.image_size, generator=g)
    cond = Cond(labels=torch.randint(0, net.num_classes, (batch,), generator=g))
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        loss = objective.loss(net, x, cond, generator=g)["loss"].mean()
    for h in hooks:
        h.remove()
    del loss  # the graph, and with it what it saved
    return running[0], max(blocks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="dit-xl/2")
    ap.add_argument("--batch", type=int, default=256, help="the batch the totals are for")
    ap.add_argument("--no-autocast", action="store_true", help="float32 throughout")
    ap.add_argument(
        "--every", type=int, default=1, help="checkpoint every k-th block only (the last row)"
    )
    args = ap.parse_args()
    if args.every < 1:
        ap.error(f"--every must be >= 1, got {args.every}")
    torch.manual_seed(0)
    net = build_backbone(
        args.backbone, image_size=32, in_channels=4, num_classes=1000, learn_sigma=True
    ).train()
    objective = build_objective("ddpm")
    n = sum(p.numel() for p in net.parameters())
    state = 20 * n  # float32 weights, gradients, AdamW's two moments, the EMA copy
    print(
        f"{args.backbone} 32x32x4, {n:,} parameters, learned sigma, DDPM hybrid loss, "
        f"{'float32' if args.no_autocast else 'bf16 autocast'}, {len(blocks_of(net))} blocks"
    )
    print(f"weights + grads + AdamW + EMA: {state / GIB:.2f} GiB")
    rows = {}
    names = ("plain", "checkpointed") + ((f"every {args.every}",) if args.every > 1 else ())
    for name in names:
        if name != "plain":  # a fresh net each time: checkpoint_blocks patches in place
            torch.manual_seed(0)
            net = build_backbone(
                args.backbone, image_size=32, in_channels=4, num_classes=1000, learn_sigma=True
            ).train()
            checkpoint_blocks(net, args.every if name.startswith("every") else 1)
        (one, block_one), (two, block_two) = (
            saved_bytes(net, objective, b, not args.no_autocast) for b in (1, 2)
        )
        per_image, fixed, per_block = two - one, 2 * one - two, block_two - block_one
        rows[name] = per_image, fixed, per_block
        total = args.batch * per_image + fixed + state
        print(
            f"{name:13s} saved per image {per_image / 2**20:8.2f} MiB, batch-free "
            f"{fixed / GIB:5.2f} GiB; x{args.batch}: {args.batch * per_image / GIB:6.2f} GiB, "
            f"+ batch-free + state: {total / GIB:6.2f} GiB"
        )
    per_image, fixed, _ = rows["checkpointed"]
    block = rows["plain"][2]  # one block's saves, per image: held while it is recomputed
    peak = args.batch * (per_image + block) + fixed + state
    print(
        f"one block's saves per image {block / 2**20:.2f} MiB; checkpointed backward, with one "
        f"block recomputed: {peak / GIB:.2f} GiB at batch {args.batch}"
    )


if __name__ == "__main__":
    main()
