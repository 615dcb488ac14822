"""Time one training step of our DiT against diffusers' DiTTransformer2DModel, same process.

The step is what the harness repeats millions of times: forward, eps-MSE loss, backward, AdamW.
Both models compute the same function (DiT adaLN-Zero, learned sigma, norm eps 1e-6, 1000
classes); inputs, timesteps and labels are identical; the two are timed in alternation so
machine noise hits both alike, and the medians are reported.

    python benchmarks/train_step.py                      # DiT-S/2, 16x16x4, batch 32, float32
    python benchmarks/train_step.py --preset dit-b/4 --json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from dit_bench.backbones import Cond, build_backbone, resolve_preset


def make_ours(spec: dict, args) -> tuple[torch.nn.Module, callable]:
    net = build_backbone(
        args.preset,
        image_size=args.image_size,
        in_channels=args.channels,
        num_classes=1000,
        learn_sigma=True,
    )
    return net, lambda x, t, y: net(x, t.float(), Cond(labels=y))


def make_diffusers(spec: dict, args) -> tuple[torch.nn.Module, callable]:
    from diffusers import DiTTransformer2DModel

    net = DiTTransformer2DModel(
        num_attention_heads=spec["num_heads"],
        attention_head_dim=spec["hidden_size"] // spec["num_heads"],
        in_channels=args.channels,
        out_channels=2 * args.channels,
        num_layers=spec["depth"],
        sample_size=args.image_size,
        patch_size=spec["patch_size"],
        num_embeds_ada_norm=1000,
        norm_eps=1e-6,
    )
    return net, lambda x, t, y: net(x, timestep=t, class_labels=y).sample


def step_fn(net, call, opt, x, t, y, eps, channels):
    def step():
        out = call(x, t, y)  # (B, 2C, H, W)
        loss = F.mse_loss(out[:, :channels], eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="dit-s/2")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = resolve_preset(args.preset)

    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.channels, args.image_size, args.image_size)
    x = torch.randn(shape, generator=g)
    eps = torch.randn(shape, generator=g)
    t = torch.randint(0, 1000, (args.batch,), generator=g)
    y = torch.randint(0, 1000, (args.batch,), generator=g)

    impls = {}
    for name, make in (("dit-bench", make_ours), ("diffusers", make_diffusers)):
        torch.manual_seed(0)
        net, call = make(spec, args)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        impls[name] = (net, step_fn(net, call, opt, x, t, y, eps, args.channels))

    times: dict[str, list[float]] = {k: [] for k in impls}
    for i in range(args.warmup + args.repeats):
        for name, (_, step) in impls.items():
            t0 = time.perf_counter()
            step()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)

    ours_net = impls["dit-bench"][0]
    flops = 3 * ours_net.flops(batch=args.batch)["flops"]  # forward + backward
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(
            {
                "impl": name,
                "params": sum(p.numel() for p in impls[name][0].parameters()),
                "median_s": med,
                "iqr_s": statistics.quantiles(ts, n=4)[2] - statistics.quantiles(ts, n=4)[0],
                "img_per_s": args.batch / med,
                "gflop_per_s": flops / med / 1e9,
            }
        )
    speedup = rows[1]["median_s"] / rows[0]["median_s"]
    result = {
        "preset": args.preset,
        "input": list(shape),
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "rows": rows,
        "speedup_vs_diffusers": speedup,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{args.preset} training step, input {tuple(shape)}, float32, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, median of {args.repeats}"
    )
    print(f"{'impl':<10} {'params':>11} {'ms/step':>9} {'iqr ms':>8} {'img/s':>8} {'GFLOP/s':>8}")
    for r in rows:
        print(
            f"{r['impl']:<10} {r['params']:>11,} {r['median_s'] * 1e3:>9.1f} "
            f"{r['iqr_s'] * 1e3:>8.1f} {r['img_per_s']:>8.1f} {r['gflop_per_s']:>8.1f}"
        )
    print(f"dit-bench / diffusers throughput: {speedup:.3f}x")


if __name__ == "__main__":
    main()
