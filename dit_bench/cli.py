"""The `dit-bench` command: one subcommand per job; settings live in YAML files.

`--set key=value` overrides one key of the config file and is validated exactly like it.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import csv
import json
import math
import os
import shlex
import signal
import sys
import threading
from pathlib import Path

# standard library only: each command imports what it uses (torch, Lightning, pandas) when it
# runs, inside main's handlers, so --help, a mistyped flag and `report` (no torch) need none of
# it, and a Ctrl-C while torch loads is the interruption's one line, not torch's traceback
from dit_bench.errors import USER_ERRORS, ConfigError, raise_terminated

EPILOG = """examples:
  dit-bench train                                  # the default: a small DiT on mnist
  dit-bench train --set data.name=digits --set data.image_size=null --set train.steps=300
  dit-bench show-config my.yaml --set optim.lr=3e-4
  dit-bench show-config --describe                 # every key: its meaning, allowed values
  dit-bench sample runs/mnist-demo/<run> -o grid.png --cfg 2.0
  dit-bench info dit-xl/2
"""


def _config(args):
    from dit_bench.config import load_config

    return load_config(args.config, args.set or [])


def check_progress_env(args) -> None:
    """A bad $DIT_BENCH_PROGRESS_EVERY stops the command before it starts anything (inside
    a run it is only a warning: it would fail a sweep's trials for good)."""
    if not args.no_progress:
        from dit_bench.train.callbacks import progress_every_s

        progress_every_s()


def cmd_train(args) -> int:
    from dit_bench.train.run import summary_val_loss, train

    check_progress_env(args)
    cfg = _config(args)
    run = train(cfg, args.out, progress=not args.no_progress)
    if not (run / "summary.json").exists():
        return 0  # a non-zero rank of a multi-process run: rank 0 reports
    summary = json.loads((run / "summary.json").read_text())
    grids = sorted((run / "samples").glob("*.png"))
    print(f"run directory: {run}")
    print(f"  val loss:    {summary_val_loss(summary)}")
    print(f"  metrics:     {run / 'metrics.csv'}")
    print(f"  summary:     {run / 'summary.json'}")
    if grids:
        print(f"  sample grid: {grids[-1]}")
    return 0


def cmd_show_config(args) -> int:
    cfg = _config(args)
    print(f"# config hash {cfg.hash}")
    print(cfg.to_yaml(describe=args.describe), end="")
    return 0


def cmd_sample(args) -> int:
    import torch
    from PIL import Image

    from dit_bench.files import check_writable
    from dit_bench.metrics.evaluate import check_finite_samples, check_sampling, generate
    from dit_bench.train.run import GRID_MAX_CLASSES, load_module, save_grid, to_images

    device = _device(args.device)  # before the checkpoint's seconds of loading
    # on eval's device: a GPU's sampling ran on the CPU (sample alone kept load_module's)
    module = load_module(Path(args.run_dir), args.checkpoint).to(device)
    e = module.cfg.eval
    info = module.info
    if args.labels:
        try:
            labels = torch.tensor([int(v) for v in args.labels.split(",")])
        except ValueError:
            raise ValueError(
                f"--labels {args.labels!r}: expected class indices, e.g. 0,3,7"
            ) from None
        # the null class (num_classes) only where label dropout trained it
        top = info.num_classes if module.cfg.train.label_dropout > 0 else info.num_classes - 1
        if labels.min() < 0 or labels.max() > top:
            classes = f"0..{info.num_classes - 1} (the classes)"
            if top == info.num_classes:
                raise ValueError(
                    f"--labels: values must be in {classes} or {top} (the null class: "
                    "unconditional samples)"
                )
            raise ValueError(
                f"--labels: values must be in {classes}; the run has no null class "
                "(train.label_dropout=0)"
            )
        names = info.class_names
        # folders named by numbers sort as text ("10" before "2"): label 2 is then the third
        # folder, and --labels 2 drew another class than the folder named 2
        misread = [
            f"{v} is {repr(names[v]) if v < len(names) else 'the null class'} "
            f"(the folder {str(v)!r} is label {names.index(str(v))})"
            for v in sorted(set(labels.tolist()))
            if str(v) in names and (v >= len(names) or names[v] != str(v))
        ]
        if misread:
            print(
                "dit-bench: note: --labels are indices of the sorted class names: "
                + "; ".join(misread),
                file=sys.stderr,
            )
        labels = labels.repeat(-(-args.n // len(labels)))[: args.n]
    else:
        labels = torch.arange(args.n) % info.num_classes
    if module.cfg.data.name == "latents" and not module.cfg.data.vae:
        raise ValueError("latent samples need data.vae (a local VAE folder) to decode")
    sampler, steps = args.sampler or e.sampler, args.steps or e.sample_steps
    cfg_scale = e.cfg_scale if args.cfg is None else args.cfg
    check_sampling(module.cfg, sampler, steps, cfg_scale)
    use_ema = e.use_ema if args.ema is None else args.ema  # as the run's own grids
    if problem := module.cfg.guidance_error(cfg_scale):
        raise ValueError(f"--cfg: {problem}; sample with --cfg 1")
    if args.output:
        output = Path(args.output)
    else:  # into the run's samples/, named by all that made it (not ./grid.png in any cwd)
        name = f"sample-{sampler}-{steps}steps-cfg{cfg_scale:g}-seed{args.seed}-n{args.n}"
        name += f"-labels{args.labels.replace(',', '-')}" if args.labels else ""
        name += "" if use_ema else "-raw"  # the trained weights, not their EMA
        if args.checkpoint != "last.ckpt":
            name += f"-{Path(args.checkpoint).stem}"
        elif (step := module.checkpoint_step) < module.cfg.train.steps:
            # an unfinished run's last.ckpt moves on when it resumes: a grid of each step
            name += f"-step{step}"
        output = Path(args.run_dir) / "samples" / f"{name}.png"
    Image.init()
    if output.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"-o {output}: not an image file name (e.g. grid.png)")
    output.parent.mkdir(parents=True, exist_ok=True)  # before the long part
    check_writable(output.parent, "-o names another file")  # a read-only run folder: now too
    if args.compile:
        from dit_bench.fast import compile_backbone

        compile_backbone(module.eval_net(use_ema=use_ema))
    # in chunks of the run's batch (a large --n in one batch could exhaust the device);
    # sample i from its own seed: not on --n or the chunking
    images = generate(
        module,
        range(args.n),
        seed=args.seed,
        labels=labels,
        sampler=sampler,
        steps=steps,
        cfg_scale=cfg_scale,
        use_ema=use_ema,
        batch_size=module.cfg.train.batch_size,
        progress=args.n > module.cfg.train.batch_size and not args.quiet,
    )
    # latents are decoded on their tensor's device (to_images): the sampling one, not the CPU
    images = to_images(module.cfg, images.to(device)).cpu()
    where = f"{args.run_dir} (step {module.checkpoint_step})"
    check_finite_samples(images, where, "No grid is drawn from them")
    # one class a column: the --labels given (they repeat along the rows), else every class up
    # to the grids' 32; more classes (ImageNet): a square-ish grid
    wide = len(args.labels.split(",")) if args.labels else info.num_classes
    if wide > GRID_MAX_CLASSES:
        wide = math.isqrt(args.n - 1) + 1
    # fewer samples than columns: --n 1 of ten classes drew one tile and nine blank ones
    save_grid(images, output, ncol=args.ncol or min(wide, args.n))
    print(f"wrote {len(images)} samples to {output}")
    if (step := module.checkpoint_step) < module.cfg.train.steps:
        # as eval says it: a run still training, or interrupted, whose -o names no step
        print(
            f"dit-bench: note: these samples are of step {step} of the run's "
            f"{module.cfg.train.steps}, not its final weights",
            file=sys.stderr,
        )
    return 0


def cmd_eval(args) -> int:
    from dit_bench.metrics.evaluate import EvalRequest, evaluate_run

    request = EvalRequest(
        metrics=tuple(m.strip() for m in args.metrics.split(",") if m.strip()),
        num_samples=args.num_samples,
        sampler=args.sampler,
        steps=args.steps,
        cfg_scale=args.cfg,
        use_ema=args.ema,
        features=args.features,
        batch_size=args.batch_size,
        seed=args.seed,
        checkpoint=args.checkpoint,
        inception_path=args.inception,
        anchors=not args.no_anchors,
    )
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)  # before the sampling
    record = evaluate_run(
        args.run_dir,
        request,
        output=args.output,
        device=_device(args.device),
        progress=not args.quiet,
        compile=args.compile,
        shard=args.shard,
    )
    if args.shard:
        (k, n), (first, stop) = record["shard"], record["samples"]
        # what it made on stdout (one line, for scripts); what to do next on stderr, a note
        print(
            f"shard {k}/{n}: the features of samples {first}..{stop - 1} of "
            f"{record['num_samples']} are in {record['file']} (no record written)"
        )
        print(
            "[dit-bench] when every shard is done, run the same command without --shard: it "
            "takes their features, draws what no shard holds, scores and writes "
            f"{args.output or Path(args.run_dir) / 'eval.json'}",
            file=sys.stderr,
        )
        return 0
    p = record["protocol"]
    print(
        f"{record['run']}: {p['num_samples']} samples, {p['sampler']} {p['steps']} steps, "
        f"cfg {p['cfg_scale']}, {p['weights']} weights, step {p['checkpoint']['global_step']}; "
        f"features {p['feature_net']['name']} (sha256 {p['feature_net']['sha256'][:12]}), "
        f"reference {p['reference']['id']} (n={p['reference']['n']})"
    )
    for name, value in {**record["metrics"], **record["anchors"]}.items():
        print(f"  {name:<48} {value:.6g}")
    print(f"wrote {args.output or Path(args.run_dir) / 'eval.json'}")
    ckpt = p["checkpoint"]
    if not ckpt["final"]:  # an interrupted run, or an earlier step-N checkpoint
        print(
            f"dit-bench: note: these numbers are of step {ckpt['global_step']} of the run's "
            f"{ckpt['run_steps']}, not its final weights",
            file=sys.stderr,
        )
    return 0


def cmd_encode_latents(args) -> int:
    from pydantic import ValidationError

    from dit_bench.config import ConfigError, DataConfig
    from dit_bench.data.latents import encode_latents

    name, _, root = args.data.partition(":")
    try:
        source = DataConfig(name=name, root=root or None, image_size=args.image_size)
    except ValidationError as e:
        problems = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
        raise ConfigError(f"--data {args.data}: {problems}") from None
    manifest = encode_latents(
        args.vae,
        source,
        args.out,
        flip=args.flip,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        device=_device(args.device),  # not at parse time: see main
        progress=not args.quiet,
    )
    print(
        f"{manifest['num_items']} latents {tuple(manifest['latent_shape'])} in "
        f"{len(manifest['shards'])} shards at {args.out}; train with "
        # quoted, to paste: a folder with a space in its name is one argument
        + shlex.join(
            ["--set", "data.name=latents", "--set", f"data.root={args.out}"]
            + ["--set", f"data.vae={args.vae}"]
        )
    )
    return 0


def cmd_info(args) -> int:
    import torch

    from dit_bench.backbones import CONDITIONINGS, PRESETS, build_backbone

    if args.list or not args.preset:
        # with --conditioning: the presets of the families that have the scheme
        names = [
            n
            for n, spec in PRESETS.items()
            if args.conditioning in (None, *CONDITIONINGS[spec["family"]])
        ]
        if not names:
            raise ValueError(f"--conditioning {args.conditioning!r}: no family has it")
    elif args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; `dit-bench info --list` lists them")
    else:
        names = [args.preset]
    rows = []
    for name in names:
        spec = PRESETS[name]
        with torch.device("meta"):  # shapes and counts only: no memory, no init cost
            net = build_backbone(
                name,
                image_size=args.image_size,
                in_channels=args.channels,
                num_classes=args.num_classes,
                conditioning=args.conditioning,
                learn_sigma=args.learn_sigma,
            )
        f = net.flops(batch=1)
        rows.append(
            {
                "preset": name,
                "family": spec["family"],
                "conditioning": net.conditioning,
                **{k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()},
                "tokens": net.num_tokens,
                "params": net.num_params(),
                "trainable_params": net.num_params(trainable_only=True),
                "gmacs": f["macs"] / 1e9,
                "gflops": f["flops"] / 1e9,
            }
        )
    if args.json:
        print(json.dumps(rows if len(rows) > 1 else rows[0], indent=2))
        return 0
    print(
        f"input {args.image_size}x{args.image_size}x{args.channels}, {args.num_classes} classes, "
        f"learn_sigma={args.learn_sigma}; MACs: one multiply-add = 1 (DiT's 'Gflops'), forward; "
        "tokens: attention sequence length (U-Net: input pixels)"
    )
    print(
        f"{'preset':<13} {'conditioning':<12} {'depth':>5} {'width':>6} {'heads':>5} "
        f"{'patch':>5} {'tokens':>6} {'params':>13} {'GMACs':>9} {'GFLOPs':>9}"
    )
    for r in rows:
        heads = r.get("num_heads", "-")
        patch = r.get("patch_size", "-")
        print(
            f"{r['preset']:<13} {r['conditioning']:<12} {r['depth']:>5} {r['hidden_size']:>6} "
            f"{heads:>5} {patch:>5} {r['tokens']:>6} {r['params']:>13,} {r['gmacs']:>9.2f} "
            f"{r['gflops']:>9.2f}"
        )
    return 0


def cmd_ablate(args) -> int:
    from dit_bench.ablate import RunsFailed, describe, load_ablation, parse_seeds, run_ablation

    seeds = parse_seeds(args.seeds) if args.seeds else None
    ab = load_ablation(args.file, args.profile, seeds=seeds, overrides=args.set or [])
    if args.dry_run:
        print(describe(ab, args.out))
        return 0
    check_progress_env(args)

    # the command in canonical form, recorded for the report
    words = ["dit-bench", "ablate", args.file, "--profile", args.profile]
    words += ["--seeds", args.seeds] if args.seeds else []
    words += ["--jobs", str(args.jobs)] if args.jobs != 1 else []
    words += ["--out", args.out] if args.out != "runs" else []
    for item in args.set or []:
        words += ["--set", item]
    command = shlex.join(words)
    root, failed = Path(args.out) / ab.experiment, 0
    try:
        run_ablation(ab, args.out, jobs=args.jobs, progress=not args.no_progress, command=command)
    except RunsFailed as e:  # the other runs trained: their results and report still stand
        print(f"dit-bench: {e}", file=sys.stderr)
        failed = len(e.failures)
    if not (root / "results.csv").exists():  # no run of the plan finished
        return 1 if failed else 0
    done = len(ab.runs) - failed
    # the plan's runs in all: earlier seeds too; UTF-8 as pandas wrote it (a run_dir under
    # "Données" is no ASCII, whatever the locale)
    with (root / "results.csv").open(encoding="utf-8") as f:
        rows = sum(1 for _ in csv.reader(f)) - 1
    more = f"; {rows} finished runs of the plan in all" if rows != done else ""
    print(f"results: {root / 'results.csv'} (and .parquet): {done} of {len(ab.runs)} runs{more}")
    print(f"report:  {_report_command('ablation', root, args.out)}")
    return 1 if failed else 0


def _report_command(kind: str, root: Path, out: str) -> str:
    """The report command to print after an ablation or sweep. Runs under the default `runs/`
    report into the repo's `reports/<experiment>` (where committed reports live); runs
    elsewhere (a scratch --out) report beside themselves, so they never overwrite those."""
    dest = Path("reports") / root.name if Path(out) == Path("runs") else root / "report"
    # quoted: printed to be pasted into a shell, and macOS folders often hold spaces
    return shlex.join(["dit-bench", "report", kind, str(root), "-o", str(dest)])


STORAGE_ENV = "DIT_BENCH_STORAGE"  # the sweep's storage URL where --storage is not given


def cmd_sweep(args) -> int:
    from dit_bench.sweep import (
        default_storage,
        failure,
        load_sweep,
        run_sweep,
        storage_status,
        summarize,
    )

    sweep = load_sweep(args.file, args.profile, args.set or [])
    sweep = sweep.with_settings(n_trials=args.n_trials, workers=args.workers)
    # from the environment: a command line, a password in its URL included, is any user's to
    # read (`ps`) for as long as the sweep runs
    storage = args.storage or os.environ.get(STORAGE_ENV) or None
    if args.dry_run:
        sweep.validate(dry_run=True)
        print(sweep.describe())
        url = storage or default_storage(sweep, args.out, make_folder=False)
        print(storage_status(sweep, url, default=storage is None))
        return 0
    check_progress_env(args)
    # after the dry run: the report module's pandas and scipy are a second it does not use
    from dit_bench.report.scaling import failed_for_good, finished, never_started

    study = run_sweep(
        sweep,
        args.out,
        storage=storage,
        workers=args.workers,
        n_trials=args.n_trials,
        progress=not args.no_progress,
    )
    print(summarize(study))
    trials = study.get_trials(deepcopy=False)
    left = [t.number for t in trials if not t.state.is_finished()]
    if left:
        print(f"dit-bench: trials {left} did not finish; run the same command again to finish them")
        return 1
    failed = failed_for_good(trials)
    for t in failed:  # their points are missing from the report
        print(f"dit-bench: {failure(t, sweep.spec.heartbeat.max_retry)}")
    # a grid cut short by --n-trials: done as asked, and the report will say the rest is missing
    if unmade := never_started(trials, study.user_attrs.get("requested")):
        print(f"dit-bench: {unmade}; a larger --n-trials (or none) runs them", file=sys.stderr)
    root = Path(args.out) / sweep.experiment
    print(f"runs:    {root}")
    if any(finished(t.state.name) for t in trials):  # else the report is refused: no point
        print(f"report:  {_report_command('scaling', root, args.out)}")
    return 1 if failed else 0


def cmd_report(args) -> int:
    if args.kind == "ablation":
        from dit_bench.report.ablation import main as report_main

        if args.study is not None:
            raise ValueError("--study picks a sweep's study: it is for `report scaling` only")
        return report_main(args.source, args.output) or 0
    from dit_bench.report.scaling import main as report_main

    return report_main(args.source, args.output, study=args.study) or 0


def cmd_bench(args) -> int:
    from dit_bench.bench import BenchConfig, format_table, parse_backbones, run_bench, to_csv
    from dit_bench.config import ConfigError
    from dit_bench.files import write_text_atomic

    cfg = BenchConfig(
        backbones=parse_backbones(args.backbones),
        image_size=args.image_size,
        channels=args.channels,
        batch=args.batch,
        num_classes=args.num_classes,
        precision=args.precision,
        compile=args.compile,
        compile_mode=args.compile_mode,
        eager=not args.compiled_only,
        against=args.against,
        fused=args.fused,
        tf32=args.tf32,
        channels_last=args.channels_last,
        warmup=args.warmup,
        repeats=args.repeats,
        sample=args.sample,
        sample_batch=args.sample_batch,
        device=args.device,
    )
    if args.csv:  # before minutes of benchmarking, not after
        if Path(args.csv).is_dir():
            raise ConfigError(f"--csv {args.csv} is a folder; give a file name, e.g. bench.csv")
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    import torch

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    elif cfg.resolved_device().type == "cpu" and not args.quiet:
        from dit_bench.fast import shared_cores_note

        if note := shared_cores_note():
            print(f"[bench] {note}", file=sys.stderr)

    def progress(msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    try:
        result = run_bench(cfg, progress=None if args.quiet else progress)
    finally:
        # main([...]) from a notebook or script: --threads is the bench's, not the caller's
        # torch default from here on (as train keeps train.threads to its run)
        torch.set_num_threads(threads)
    if args.csv:
        path = Path(args.csv)
        write_text_atomic(path, to_csv(result))
        sampling = path.with_name(f"{path.stem}-sampling{path.suffix}")
        if result["sampling"]:
            write_text_atomic(sampling, to_csv(result, sampling=True))
        else:  # an earlier call's (without --no-sample) is not of these runs
            sampling.unlink(missing_ok=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
    return 0


def _device(name: str) -> str:
    """A --device of sample, eval and encode-latents (parsed by `device`): auto is a CUDA GPU
    where torch sees one, else the CPU; a GPU torch does not see is refused in a line (torch's
    own error was a traceback)."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu":
        index, seen = int(name.partition(":")[2] or 0), torch.cuda.device_count()
        if index >= seen:
            raise ValueError(
                f"--device {name}: torch {torch.__version__} sees "
                + (f"{seen} GPU{'s' * (seen > 1)} (cuda:0..cuda:{seen - 1})" if seen else "no GPU")
            )
    return name


def device(text: str) -> str:
    """An argparse type: auto, cpu, cuda or cuda:N, as bench's --device takes them (encode-latents
    took no auto, and a typo reached torch)."""
    kind, colon, index = text.partition(":")
    if text in ("auto", "cpu", "cuda") or (kind == "cuda" and colon and index.isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")


DEVICE_HELP = (
    "auto | cpu | cuda | cuda:N (default: auto, a CUDA GPU where torch sees one, else cpu)"
)
# Where a command writes: each command's own spelling first (its usage line's), then the
# others', as users type the one the last command taught (`report ... --out` after `ablate
# --out`, `train -o` after `report -o`)
OUT_FOLDER = ("--out", "-o", "--output")  # train, ablate, sweep, encode-latents
OUT_FILE = ("-o", "--output", "--out")  # sample, eval, report


def add_sampling_flags(sp: argparse.ArgumentParser) -> None:
    """The flags of the commands that sample a run (sample, eval): which weights, how, where."""
    sp.add_argument(
        "--checkpoint",
        default="last.ckpt",
        help="file under checkpoints/, e.g. step=0002000.ckpt (default: last.ckpt)",
    )
    sp.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the sampled backbone (in place, as train.compile; the first "
        "sampling steps compile): pays off over many steps and samples; same samples up to "
        "float rounding",
    )
    sp.add_argument("--device", type=device, default="auto", help=DEVICE_HELP)
    # every command that prints progress takes both spellings: eval's and train's
    sp.add_argument("--quiet", "--no-progress", action="store_true", help="no progress messages")


def _at_least(kind: type, low: float, what: str):
    """An argparse type: a `kind` number >= `low`, else an error at parse time."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


positive = _at_least(int, 1, "a positive integer")  # counts and sizes
guidance = _at_least(float, 0.0, "a guidance scale >= 0 (1: no guidance)")


def shard(text: str) -> tuple[int, int]:
    """An argparse type: eval's --shard K/N, shard K of N (0 <= K < N)."""
    k, slash, n = text.partition("/")
    if not (slash and k.isdigit() and n.isdigit() and int(k) < int(n)):
        raise argparse.ArgumentTypeError(
            f"expected K/N with 0 <= K < N (shard K of N: 0/8 .. 7/8), got {text!r}"
        )
    return int(k), int(n)


def home_path(text: str) -> str:
    """An argparse type for a path option: a leading ~ expanded. The shell expands ~ only at a
    word's start, so `--out=~/runs` arrived as is and made a folder named ~ in the working
    directory (the config expands `--set data.root=~/x` likewise)."""
    return os.path.expanduser(text)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("dit-bench")
    except metadata.PackageNotFoundError:  # a checkout on PYTHONPATH, never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dit-bench",
        description="Train, sample, evaluate and compare diffusion backbones (DiT, MMDiT, U-Net, "
        "U-ViT) under DDPM and flow matching; ablations and scaling sweeps.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def config_args(sp):
        sp.add_argument("config", nargs="?", help="experiment YAML (default: built-in default)")
        sp.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override one config key, e.g. --set train.steps=200 (repeatable)",
        )

    sp = sub.add_parser("train", help="train one experiment (resumes its run if it exists)")
    config_args(sp)
    sp.add_argument(
        *OUT_FOLDER, type=home_path, default="runs", help="runs directory (default: runs)"
    )
    sp.add_argument(
        "--no-progress",
        "--quiet",  # eval's and bench's name for it
        action="store_true",
        help="no progress: neither the bar (a terminal) nor the lines (elsewhere; every "
        "$DIT_BENCH_PROGRESS_EVERY seconds, 30 by default)",
    )
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("show-config", help="print the resolved, validated config")
    config_args(sp)
    sp.add_argument(
        "--describe",
        action="store_true",
        help="each key with what it means and the values it takes, as YAML comments (still "
        "a config file that loads as printed)",
    )
    sp.set_defaults(func=cmd_show_config)

    sp = sub.add_parser("sample", help="sample a grid of images from a trained run")
    sp.add_argument("run_dir", help="a run directory (runs/<experiment>/<time>-<hash>)")
    sp.add_argument(
        *OUT_FILE,
        type=home_path,
        help="image to write (default: RUN_DIR/samples/sample-<sampler>-<steps>steps-cfg<cfg>-"
        "seed<seed>-n<n>[-labels..][-raw][-<checkpoint>].png; an unfinished run's last.ckpt: "
        "-step<step> in place of -<checkpoint>)",
    )
    # --num-samples: eval's name for it (`eval --n` is accepted too)
    sp.add_argument(
        "--n", "--num-samples", type=positive, default=64, help="number of samples (default 64)"
    )
    sp.add_argument(
        "--labels",
        help="comma-separated class labels (indices of the sorted class names), cycled "
        "(default: all)",
    )
    sp.add_argument("--sampler", help="sampler (default: the run's eval.sampler)")
    sp.add_argument("--steps", type=positive, help="sampling steps (default: eval.sample_steps)")
    sp.add_argument("--cfg", type=guidance, help="guidance scale (default: eval.cfg_scale)")
    sp.add_argument(
        "--seed",
        type=int,
        default=0,
        help="sample i is drawn from seed (seed * 1000003 + i) mod 2**32 (default 0)",
    )
    sp.add_argument(
        "--ncol",
        type=positive,
        help="images per row (default: the number of --labels given, else of classes up to 32; "
        "else a square grid; at most --n)",
    )
    sp.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="sample the EMA weights; --no-ema: the raw ones (default: eval.use_ema, as the "
        "run's own grids)",
    )
    add_sampling_flags(sp)
    sp.set_defaults(func=cmd_sample)

    sp = sub.add_parser(
        "eval",
        help="FD/FID, KID, precision/recall, IS of a trained run, with the protocol (eval.json)",
    )
    sp.add_argument("run_dir", help="a run directory (runs/<experiment>/<time>-<hash>)")
    sp.add_argument(
        "--metrics",
        default="fd,kid,pr,is",
        help="comma-separated: fd,kid,pr,is (default: all; is, which needs a classifier's "
        "logits, only with the small nets)",
    )
    sp.add_argument(
        "--num-samples",
        "--n",  # sample's name for it: `eval --n` was argparse's "ambiguous option"
        type=positive,
        help="samples to generate (default: the held-out set's size)",
    )
    sp.add_argument("--sampler", help="sampler (default: the run's eval.sampler)")
    sp.add_argument("--steps", type=positive, help="sampling steps (default: eval.sample_steps)")
    sp.add_argument("--cfg", type=guidance, help="guidance scale (default: eval.cfg_scale)")
    sp.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="sample the EMA weights; --no-ema: the raw ones (default: eval.use_ema)",
    )
    sp.add_argument(
        "--features",
        help="inception | mnist-net | digits-net | shapes-net (default: the data set's own "
        "small net; inception for folder and latents data)",
    )
    sp.add_argument(
        "--inception",
        type=home_path,
        metavar="PATH",
        help="clean-fid's inception-2015-12-05.pt (default: $DIT_BENCH_INCEPTION, "
        "/tmp/inception-2015-12-05.pt, $DIT_BENCH_CACHE/inception-2015-12-05.pt)",
    )
    sp.add_argument(
        "--batch-size",
        type=positive,
        default=250,
        help="sampling batch, the images held at once (changes results by float rounding "
        "only; default 250)",
    )
    sp.add_argument(
        "--seed",
        type=int,
        default=0,
        help="0..4293; sample i is seeded with (seed * 1000003 + i) mod 2**32 (default 0)",
    )
    sp.add_argument("--no-anchors", action="store_true", help="skip real-vs-real/noise anchors")
    sp.add_argument(*OUT_FILE, type=home_path, help="JSON to write (default: RUN_DIR/eval.json)")
    sp.add_argument(
        "--shard",
        type=shard,
        metavar="K/N",
        help="draw only block K of N of the samples (one process per GPU or machine) and save "
        "their features beside the record, unscored; the same command without --shard then "
        "takes every shard's features, draws what none holds, scores and writes the record",
    )
    add_sampling_flags(sp)
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser(
        "encode-latents",
        help="encode a data set once with a local VAE into latent shards (resumable)",
        description="Encode images with a diffusers AutoencoderKL saved on disk (no download) "
        "into safetensors shards plus a manifest; rerun the same command to resume.",
    )
    sp.add_argument(
        "--vae", type=home_path, required=True, help="folder of a diffusers AutoencoderKL"
    )
    sp.add_argument("--data", required=True, help="NAME[:ROOT], e.g. folder:/data/imagenet")
    sp.add_argument("--image-size", type=positive, required=True, help="pixel side, e.g. 256")
    sp.add_argument(*OUT_FOLDER, type=home_path, required=True, help="shard folder to write")
    sp.add_argument("--flip", action="store_true", help="also encode mirror images (DiT)")
    sp.add_argument(
        "--shard-size", type=positive, default=4096, help="latents per shard (default 4096)"
    )
    sp.add_argument(
        "--batch-size", type=positive, default=32, help="images a VAE encode call (default 32)"
    )
    sp.add_argument("--device", type=device, default="auto", help=DEVICE_HELP)
    sp.add_argument("--quiet", "--no-progress", action="store_true", help="no progress messages")
    sp.set_defaults(func=cmd_encode_latents)

    sp = sub.add_parser("info", help="params, MACs and tokens of backbone presets")
    sp.add_argument("preset", nargs="?", help="e.g. dit-xl/2, mmdit-d4/2, unet-s (default: all)")
    sp.add_argument(
        "--conditioning",
        help="scheme, e.g. cross_attn for DiT (default: each family's own; see --list)",
    )
    sp.add_argument("--list", action="store_true", help="every preset")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("--image-size", type=positive, default=32, help="input side (default 32)")
    sp.add_argument("--channels", type=positive, default=4, help="input channels (default 4)")
    sp.add_argument("--num-classes", type=positive, default=1000, help="classes (default 1000)")
    sp.add_argument(
        "--learn-sigma",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="2x output channels, as DiT (default: on)",
    )
    sp.set_defaults(func=cmd_info)

    sp = sub.add_parser(
        "ablate",
        help="run an ablation file: variants x seeds, resumable; one results table",
        description="Expand ABLATION.yaml (variants x seeds) into runs and train them; finished "
        "runs are skipped and interrupted ones resume, so stop it anywhere and run it again.",
    )
    sp.add_argument("file", help="ablation file, e.g. ablations/conditioning.yaml")
    sp.add_argument("--profile", default="cpu", help="profile of the file (default: cpu)")
    sp.add_argument("--seeds", help="seeds to run, e.g. 0,1,2 or 0-4 (default: the file's)")
    sp.add_argument(
        "--jobs",
        "--workers",  # sweep's name for its processes
        type=positive,
        default=1,
        help="runs trained at once (processes; default 1)",
    )
    sp.add_argument("--dry-run", action="store_true", help="list runs, sizes, compute; no training")
    sp.add_argument(
        *OUT_FOLDER, type=home_path, default="runs", help="runs directory (default: runs)"
    )
    sp.add_argument(
        "--no-progress",
        "--quiet",  # eval's and bench's name for it
        action="store_true",
        help="no per-run progress (a bar; lines naming the run with --jobs or off a terminal)",
    )
    sp.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override one config key of every run, e.g. --set train.steps=50 (repeatable)",
    )
    sp.set_defaults(func=cmd_ablate)

    sp = sub.add_parser(
        "sweep",
        help="run a scaling sweep file through Optuna (resumable, many workers)",
        description="Run SWEEP.yaml's trials (grid points or sampled) as training runs in one "
        "Optuna study: an SQLite file next to the runs by default, a PostgreSQL URL for workers "
        "on many machines. Stop it anywhere and run it again: finished trials stay, killed ones "
        "re-run and resume.",
    )
    sp.add_argument("file", help="sweep file, e.g. sweeps/shapes-scaling.yaml")
    sp.add_argument("--profile", default="cpu", help="profile of the file (default: cpu)")
    sp.add_argument(
        "--storage",
        help="Optuna storage URL, e.g. postgresql://user@host/db (default: $DIT_BENCH_STORAGE, "
        "else sqlite:///OUT/<name>-<profile>/study.db). Keep a password off the command line, "
        "which other users see (ps): in $DIT_BENCH_STORAGE, $PGPASSWORD or ~/.pgpass",
    )
    sp.add_argument(
        "--workers",
        "--jobs",  # ablate's name for its processes
        type=positive,
        help="local worker processes (default: the file's)",
    )
    sp.add_argument(
        "--n-trials", type=positive, help="trials in the study (grid: the first N points)"
    )
    sp.add_argument("--dry-run", action="store_true", help="list the space and trials; no training")
    sp.add_argument(
        *OUT_FOLDER, type=home_path, default="runs", help="runs directory (default: runs)"
    )
    sp.add_argument(
        "--no-progress",
        "--quiet",  # eval's and bench's name for it
        action="store_true",
        help="no per-trial progress (a bar; lines naming the trial with several workers or "
        "off a terminal)",
    )
    sp.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override one key of the base config of every trial (repeatable)",
    )
    sp.set_defaults(func=cmd_sweep)

    sp = sub.add_parser("report", help="report.md, figures and tables from finished runs")
    sp.add_argument("kind", choices=["ablation", "scaling"], help="which report")
    sp.add_argument(
        "source",
        help="runs folder, e.g. runs/conditioning-cpu; scaling: also its study.db or a storage URL",
    )
    sp.add_argument(
        *OUT_FILE, type=home_path, required=True, help="report folder, e.g. reports/NAME"
    )
    sp.add_argument(
        "--study",
        metavar="NAME",
        help="scaling: the study to report, where the storage holds several (e.g. shapes-scaling-cpu)",
    )
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser(
        "bench",
        help="time the training step and sampling: img/s, TFLOP/s, MFU, peak memory",
        description="Training step (forward, DDPM loss, backward, AdamW) and sampling of "
        "backbone presets: warm-up, synchronised timing, medians over repeats; MFU against a "
        "matrix product measured in the same run and the datasheet peak of known GPUs.",
    )
    sp.add_argument(
        "--backbones", default="dit-s/2", help="comma-separated presets (default: dit-s/2)"
    )
    sp.add_argument("--image-size", type=positive, default=32, help="input side (default 32)")
    sp.add_argument("--channels", type=positive, default=4, help="input channels (default 4)")
    # --batch-size: eval's and encode-latents' name for a batch
    sp.add_argument(
        "--batch", "--batch-size", type=positive, default=64, help="training batch (default 64)"
    )
    sp.add_argument("--num-classes", type=positive, default=1000, help="classes (default 1000)")
    sp.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16: autocast with float32 master weights (default fp32)",
    )
    sp.add_argument("--compile", action="store_true", help="also time the compiled backbone")
    sp.add_argument("--compiled-only", action="store_true", help="with --compile: skip eager")
    sp.add_argument(
        "--compile-mode",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        help="torch.compile mode (default: torch's)",
    )
    sp.add_argument(
        "--against", choices=["diffusers"], help="also time diffusers' DiT (same function)"
    )
    sp.add_argument(
        "--fused",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fused AdamW for every implementation (default: ours fused on CUDA and the CPU, "
        "the reference torch's default AdamW)",
    )
    sp.add_argument(
        "--tf32",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="TF32 matmuls on GPU (default: on)",
    )
    sp.add_argument("--channels-last", action="store_true", help="channels-last (U-Net)")
    # at least one: the first step (its compile, the allocator) is reported on its own, never
    # in the timed median
    sp.add_argument("--warmup", type=positive, default=3, help="warm-up steps (default 3)")
    sp.add_argument("--repeats", type=positive, default=10, help="timed steps (default 10)")
    sp.add_argument(
        "--sample",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time 250-step DDPM and 50-step guided Euler sampling (default: on)",
    )
    sp.add_argument("--sample-batch", type=positive, default=16, help="sampling batch (default 16)")
    # no `device` type: BenchConfig's own check says why another kind (mps) is not timed
    sp.add_argument("--device", default="auto", help=DEVICE_HELP)
    sp.add_argument("--threads", type=positive, help="torch CPU threads")
    sp.add_argument("--json", action="store_true", help="print JSON instead of the table")
    sp.add_argument(
        "--csv",
        type=home_path,
        metavar="PATH",
        help="also write one CSV row per implementation (and, when sampling, one per "
        "implementation and sampler to PATH's stem + '-sampling')",
    )
    sp.add_argument("--quiet", "--no-progress", action="store_true", help="no progress messages")
    sp.set_defaults(func=cmd_bench)
    return p


def _note_ctrl_c() -> list[int] | None:
    """A list that a Ctrl-C (SIGINT) is noted in, the signal still raising KeyboardInterrupt;
    None where SIGINT is not Python's own handler (ignored: a script's background job,
    `nohup`): it is left as it is."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return None
    got: list[int] = []

    def note(signum, frame) -> None:
        got.append(signum)
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, note)
    # registered before torch, Lightning and multiprocessing register theirs: atexit runs the
    # last registered first, so the process dies of the signal after their clean-ups
    atexit.register(_die_of_sigint, got)
    return got


def _die_of_sigint(ctrl_c: list) -> None:
    # Die of the SIGINT, as Python does with an uncaught KeyboardInterrupt, not exit(130): a
    # shell running a loop of commands (`for s in 0 1 2; do dit-bench train ...; done`) goes
    # on with the next one when its command exits by itself (it "handled" the Ctrl-C), and
    # stops only when it died of it. The shell's $? is 130 either way. Not on Windows: there
    # os.kill of a signal it has no console event for ends the process with the signal's
    # number as its exit code, 2 (a usage error's), where main's return leaves 130.
    if "stopped" in ctrl_c and sys.platform != "win32":  # main() returned as interrupted
        for stream in (sys.stdout, sys.stderr):
            # `dit-bench ... | tee log`: the Ctrl-C ended the reader too, and what it did not
            # read is lost either way; an error here would leave the process to exit by itself
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)


def _interrupted(command: str, ctrl_c: list | None) -> int:
    # only these keep their partial work (runs, shards, trials; eval its features, and says
    # so); report and bench start over
    if command in ("train", "ablate", "sweep", "encode-latents"):
        again = "run the same command again to resume"
    elif command == "sample":
        again = "nothing was written: run the same command again to start over"
    elif command == "eval":  # whether it kept any samples' features, evaluate_run said above
        again = "no record was written: run the same command again"
    else:
        again = "run the same command again to start over"
    print(f"\ndit-bench: interrupted; {again}", file=sys.stderr)
    if ctrl_c:  # a Ctrl-C, not a SIGTERM (which exits 130, as documented)
        ctrl_c.append("stopped")
    return 130


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    # the process's own command line only: main([...]) from Python returns 130
    ctrl_c = _note_ctrl_c() if argv is None and main_thread else None
    # `kill PID`, `timeout`, a SLURM preemption: stop as Ctrl-C does, so ablate and sweep stop
    # their worker processes (by default a SIGTERM ends this one alone and they train on)
    sigterm = signal.signal(signal.SIGTERM, raise_terminated) if main_thread else None
    try:
        out = getattr(args, "out", None)  # train, ablate, sweep, encode-latents: a folder
        if out and Path(out).exists() and not Path(out).is_dir():
            raise ConfigError(f"--out {out} is a file; it names a folder")
        return args.func(args)
    except ConfigError as e:
        print(f"dit-bench: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _interrupted(args.command, ctrl_c)
    except BrokenPipeError:  # `dit-bench info --list | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 0
    except USER_ERRORS as e:  # named file, bad value, divergence
        print(f"dit-bench: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if ctrl_c:  # raised by what the Ctrl-C cut short: an import it stopped halfway left
            # half a module (scipy's linalg then failed with numpy's AttributeError)
            return _interrupted(args.command, ctrl_c)
        from dit_bench.fast import NO_CXX_COMPILER, lacks_cxx_compiler

        if getattr(args, "compile", False) and lacks_cxx_compiler(e):
            # sample's and eval's, at the first forward: one line, as train.compile's and
            # bench's (a hundred lines of Dynamo internals, on a laptop without Xcode's tools)
            print(
                f"dit-bench: --compile: {NO_CXX_COMPILER}, or leave out --compile", file=sys.stderr
            )
            return 2
        raise
    finally:
        if sigterm is not None:  # main() called from Python (tests, notebooks) leaves it as it was
            signal.signal(signal.SIGTERM, sigterm)
        if ctrl_c is not None:
            signal.signal(signal.SIGINT, signal.default_int_handler)


if __name__ == "__main__":
    sys.exit(main())
