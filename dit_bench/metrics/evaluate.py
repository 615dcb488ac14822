"""`dit-bench eval`: sample a trained run under a stated protocol and score the samples.

Every number is written with the whole protocol that produced it (eval.json): checkpoint,
sampler and its settings, guidance, EMA, sample count, labels, seeds, feature network (with the
sha256 of its weights), reference statistics id, resize path and package versions.

Per-sample seeds: sample i draws its starting noise and every later sampler draw from its own
generator, `torch.Generator().manual_seed(sample_seed(seed, i))`, so the samples (hence the
metrics) do not depend on the batch size, on splitting generation into parts, or on how many
devices share the work.

Streamed and resumable: the samples are drawn a chunk (--batch-size) at a time, decoded (latents),
checked finite and reduced to their features; only the features are kept, so memory holds one
chunk of images. The features so far are saved (at most every PARTIAL_EVERY_S, and when the eval
stops) beside the record, as `<record>.<key>.partial.npz` (`partial_path`); the same request
resumes from them and removes the file once the record is written.

Sharded (`--shard K/N`, `evaluate_run(shard=(K, N))`): a process draws block K of N of the
samples only and saves their features, as above, in a file of its own
(`<record>.<key>.shard-K-of-N.partial.npz`), and scores nothing. The eval without a shard takes
the features of every shard file of its key, draws what none holds, scores and removes them.
A file holds chunks of samples, each with its first index: any set of disjoint index ranges.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import time
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dit_bench.files import check_writable, locked, replacing, write_json_atomic
from dit_bench.metrics import distances as D
from dit_bench.metrics.features import (
    DEFAULT_FEATURES,
    SMALL_NETS,
    FeatureNet,
    default_features,
    load_feature_net,
)
from dit_bench.metrics.reference import HeldOutImages, RefStats, reference_stats, stack_items
from dit_bench.sampling import get_sampler, interval_error, sampler_options

METRICS: tuple[str, ...] = ("fd", "kid", "pr", "is")
KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED = 100, 1000, 0
PR_K = 3
IS_SPLITS = 10
ANCHOR_SEED = 0


class NoCheckpointError(FileNotFoundError):
    """The run has no checkpoint to evaluate."""


SEED_STRIDE = 1_000_003  # a prime > 1e6: seeds s and s' share no sample seed up to 1e6 samples
# Eval seeds 0..4293 own disjoint blocks of 1,000,003 sample seeds within 2^32; seed 4294's block
# wraps onto seed 0's (sample_seed(4295, i) == sample_seed(0, i + 45589)), so two evals meant to
# be independent would share samples and shrink their seed-to-seed spread.
EVAL_SEEDS = 2**32 // SEED_STRIDE


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index`: (seed * 1_000_003 + index) mod 2^32.

    torch's CPU generator (mt19937) keeps only the low 32 bits of a seed (manual_seed(5) and
    manual_seed(5 + 2**32) draw the same numbers), so the rule stays within 32 bits: distinct for
    every index under one seed, and disjoint between two seeds below EVAL_SEEDS (4294) for runs
    of up to 1e6 samples (`dit-bench eval` takes only those; `sample` takes any seed).
    """
    if index < 0 or seed < 0:
        raise ValueError(f"seed and sample index must be >= 0, got {seed}, {index}")
    return (seed * SEED_STRIDE + index) % 2**32


def eval_labels(n: int, num_classes: int) -> Tensor:
    """Class-balanced conditioning labels: sample i gets class i mod num_classes."""
    return torch.arange(n) % num_classes


@torch.no_grad()
def generate(
    module,
    indices: Sequence[int],
    *,
    seed: int,
    sampler: str,
    steps: int,
    cfg_scale: float,
    use_ema: bool,
    batch_size: int,
    labels: Tensor | None = None,
    progress: bool = False,
) -> Tensor:
    """Samples number `indices`, in chunks of `batch_size`, on the CPU; sample i is of class
    `labels[i]` (default: `eval_labels`, class i mod num_classes). No indices: (0, C, H, W).

    Sample i depends on (seed, i) and its label only, never on `batch_size` or on which other
    indices are drawn with it (per-sample generators; see dit_bench.sampling.randn).
    """
    from dit_bench.train.run import sample_images

    indices = list(indices)
    index = torch.tensor(indices, dtype=torch.long)
    labels = index % module.info.num_classes if labels is None else labels[index]
    out = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        out.append(
            sample_images(
                module,
                labels[start : start + batch_size],
                sampler=sampler,
                steps=steps,
                cfg_scale=cfg_scale,
                seed=seed,
                use_ema=use_ema,
                seeds=[sample_seed(seed, i) for i in chunk],
            ).cpu()
        )
        if progress:
            print(f"[dit-bench] sampled {start + len(chunk)}/{len(indices)}", file=sys.stderr)
    if not out:  # a process's share of fewer samples than processes: it still joins the gather
        info = module.info
        return torch.empty(0, info.channels, info.image_size, info.image_size)
    return torch.cat(out)


def check_checkpoint(run_dir: Path, checkpoint: str) -> Path:
    folder = Path(run_dir) / "checkpoints"
    found = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
    if not found:
        raise NoCheckpointError(
            f"{run_dir} has no checkpoints ({folder} is missing or empty): nothing to sample or "
            "evaluate; train it first (dit-bench train ..., which writes checkpoints/last.ckpt)"
        )
    if checkpoint not in found:
        raise NoCheckpointError(
            f"{run_dir}: no checkpoint {checkpoint!r} under checkpoints/; found {', '.join(found)}"
        )
    return folder / checkpoint


# Samples a metric needs: precision/recall's k-NN radii (k + 1 points), IS's splits.
SAMPLES_NEEDED = {"pr": PR_K + 1, "is": IS_SPLITS}


def check_sample_count(metrics: Sequence[str], n: int, what: str) -> None:
    """`what` (which names `n`) is too few for a metric: a ValueError before any sampling."""
    for m in metrics:
        if n < (needed := SAMPLES_NEEDED.get(m, 2)):
            raise ValueError(f"{what}: --metrics {m} needs at least {needed} samples")


def check_finite_samples(images: Tensor, source: str, refusal: str) -> None:
    """A ValueError if a sample of `source` is not finite: a diverged run's samples are no
    images (a grid saves them black, a metric of them is NaN or a number of nothing)."""
    bad = int((~torch.isfinite(images.flatten(1)).all(1)).sum())
    if bad:
        raise ValueError(
            f"{bad} of {len(images)} samples of {source} are not finite: the weights "
            f"diverged? {refusal}"
        )


def check_sampling(cfg, sampler: str, steps: int, cfg_scale: float = 1.0) -> None:
    """A sampler name or step count the run's objective cannot sample with, or a guidance
    interval (eval.cfg_interval, at `cfg_scale` != 1) between its levels: a ValueError
    before the reference features and the checkpoint are read (the sampling itself would
    raise only at its first batch)."""
    get_sampler(sampler)  # an unknown name: the error lists the known ones
    T = getattr(cfg.objective, "num_timesteps", None)  # DDPM's chain; flow takes any count
    if T is not None and not 2 <= steps <= T:
        raise ValueError(
            f"--steps {steps}: DDPM samples a respaced chain of 2 or more steps, at most its "
            f"objective.num_timesteps={T}"
        )
    interval = cfg.eval.cfg_interval
    if cfg_scale != 1.0 and interval is not None:
        grid = cfg.sampling_timesteps(steps)
        if grid is not None and (problem := interval_error(grid, interval)):
            # a run made before the config refused such an interval trained with it: its
            # grids were unguided, which --cfg 1 draws
            raise ValueError(
                f"--steps {steps}: eval.cfg_interval={problem}; --cfg 1 draws the same "
                "samples, or pick a --steps whose grid has a level in the interval"
            )


@dataclass(frozen=True)
class EvalRequest:
    """What `dit-bench eval` was asked; None means "the run's own eval setting"."""

    metrics: tuple[str, ...] = METRICS
    num_samples: int | None = None  # None: as many as the reference (held-out) images
    sampler: str | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    use_ema: bool | None = None
    features: str | None = None  # None: the data set's own net (mnist-net, ...), else inception
    batch_size: int = 250
    seed: int = 0
    checkpoint: str = "last.ckpt"
    inception_path: str | None = None
    anchors: bool = True

    def __post_init__(self) -> None:
        unknown = set(self.metrics) - set(METRICS)
        if unknown or not self.metrics:
            raise ValueError(
                f"--metrics: unknown {sorted(unknown)}; choose from {', '.join(METRICS)}"
            )
        if self.num_samples is not None and self.num_samples < 2:
            raise ValueError("--num-samples must be at least 2")
        if self.num_samples is not None:  # checked before any sampling
            # all metrics leave IS out for Inception, which only the run's config names:
            # evaluate_run checks it then, still before any sampling
            asked = [m for m in METRICS if m != "is"] if self.metrics == METRICS else self.metrics
            check_sample_count(asked, self.num_samples, f"--num-samples {self.num_samples}")
        if self.batch_size < 1:
            raise ValueError("--batch-size must be positive")
        if not 0 <= self.seed < EVAL_SEEDS:
            raise ValueError(
                f"--seed {self.seed}: must be in [0, {EVAL_SEEDS - 1}], where each eval seed owns "
                f"its own {SEED_STRIDE:,} per-sample seeds in torch's 32-bit seed space (larger "
                "seeds wrap onto smaller ones' samples)"
            )


# evaluate_run's default, made once here: a call in the signature is B008 to every ruff before
# 0.17.5, which the dev extra allows (frozen, so sharing the one instance is safe)
DEFAULT_REQUEST = EvalRequest()


def reference_images(cfg, device: str | torch.device = "cpu", split=None):
    """(held-out images, train set, latents hash or None).

    The held-out images (HeldOutImages: the val set, and its `decode`) are read a chunk at a
    time, in [-1, 1] on the CPU, never held whole; for a `latents` run, `decode` turns latents
    into images with its VAE (data.vae), which runs on `device` (else None). `split`: the
    (train, val) of `load_datasets(cfg.data)` where the caller has it already (a training run's
    data module), so the data set is not built and a folder not listed a second time.
    """
    from dit_bench.data import load_datasets

    train, val = split if split is not None else load_datasets(cfg.data)
    if cfg.data.name != "latents":
        return HeldOutImages(val), train, None
    # Latent data: hash the latents themselves, score the VAE-decoded images.
    from dit_bench.data.latents import (
        decode_latents,
        load_decoder,
        manifest_scaling_factor,
        manifest_shift_factor,
        vae_fingerprint,
    )

    if not cfg.data.vae:
        raise ValueError("eval of a latents run needs data.vae (the VAE folder) to decode images")
    vae = load_decoder(cfg.data.vae, cfg.data.root, device)
    scale, shift = manifest_scaling_factor(cfg.data.root), manifest_shift_factor(cfg.data.root)

    def decode(z: Tensor) -> Tensor:
        return decode_latents(vae, z, scale, shift)

    held_out = HeldOutImages(val, decode)
    # the features are of the decoded images: the decoder is part of the reference's content
    content = hashlib.sha256()
    for z, _ in held_out.stored(256):  # the bytes of all latents, a chunk at a time
        content.update(z.float().contiguous().numpy().tobytes())
    content.update(vae_fingerprint(vae).encode())
    return held_out, train, content.hexdigest()


def check_held_out_split(cfg, trained: dict | None, split, progress: bool = True) -> None:
    """A folder run's reference is the held-out split of its folder as the folder is now: with
    files added, removed or renamed since the run trained, that split is another one. By
    position it is another draw of the whole folder (one image more among 200 moved 7 of 20
    held-out images into training), so eval would score the run against images it trained on:
    refused, as a resume is. By name it moved at most as many images as changed: a note.
    `trained`: the data module's state in the run's checkpoint (None: an older checkpoint);
    `split`: the (train, val) of `load_datasets(cfg.data)` as the folder is now."""
    if cfg.data.name != "folder" or not trained or trained.get("items_sha256") is None:
        return
    from dit_bench.data.module import items_sha256

    train, val = split
    if items_sha256(train, val) == trained["items_sha256"]:
        return
    changed = (
        f"data.root {cfg.data.root}: its files changed since the run trained "
        f"({trained['num_items']} items then, {len(train.dataset)} now, or renamed)"
    )
    if cfg.data.split_by != "name":
        raise ValueError(
            f"{changed}, so its held-out split (data.split_by=position) is another draw of the "
            "folder, holding images the run trained on; restore the files as they were to "
            "evaluate the run"
        )
    if progress:
        print(
            f"[dit-bench] note: {changed}: the held-out split by name moved at most as many "
            "images as changed, but its scores are not those of evals made before",
            file=sys.stderr,
        )


def kid_subset_size(n_fake: int, n_real: int) -> int:
    """Subsets of 1000 (Binkowski et al.), at most half of the smaller set: subsets as large as
    the set would all be the same set, and the std over subsets would read 0."""
    return max(2, min(KID_SUBSET_SIZE, n_fake // 2, n_real // 2))


def score(
    gen_feats: np.ndarray,
    gen_logits: np.ndarray | None,
    ref: RefStats,
    net: FeatureNet,
    metrics: Sequence[str],
    labels: Tensor | None = None,
) -> dict[str, float]:
    """The requested metrics of generated features against the reference; keys carry the
    feature net's name ("FD-mnist-net", or "FID" for Inception)."""
    s = net.suffix
    out: dict[str, float] = {}
    if "fd" in metrics:
        out[net.metric_prefix] = D.frechet_distance(*D.gaussian_stats(gen_feats), ref.mu, ref.sigma)
    if "kid" in metrics:
        m = kid_subset_size(len(gen_feats), ref.n)
        mean, std = D.kid(
            ref.features, gen_feats, num_subsets=KID_SUBSETS, subset_size=m, seed=KID_SEED
        )
        out[f"KID{s}"], out[f"KID{s}_std"] = mean, std
    if "pr" in metrics:
        out[f"precision{s}"], out[f"recall{s}"] = D.precision_recall(
            ref.features, gen_feats, k=PR_K
        )
    if "is" in metrics:
        if gen_logits is None:
            raise ValueError(
                f"--metrics is needs a classifier's logits; {net.name} features have none here "
                "(use --features mnist-net / digits-net / shapes-net)"
            )
        out[f"IS{s}"], out[f"IS{s}_std"] = D.inception_score(gen_logits, splits=IS_SPLITS)
    if labels is not None and gen_logits is not None:
        pred = torch.from_numpy(gen_logits).argmax(1)
        out[f"adherence{s}"] = float((pred == labels).double().mean())
    return out


def evaluate_run(
    run_dir: str | Path,
    request: EvalRequest = DEFAULT_REQUEST,
    *,
    output: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
    compile: bool = False,
    shard: tuple[int, int] | None = None,
) -> dict:
    """Evaluate a run directory; writes and returns the eval record (see module docstring).

    `compile`: torch.compile the sampled backbone first. How the samples are computed, not
    what they are (up to float rounding), so it is not part of the request or protocol;
    `sample_seconds` then includes the compile. `shard` (K, N): draw only block K of N of the
    samples and save their features (`partial_path`), without scoring; returns where (no
    record). Without it, the features of this request's shard files are taken first."""
    from dit_bench.data import data_info, load_datasets
    from dit_bench.train.run import git_commit, load_module, load_run_config, package_versions

    t0 = time.perf_counter()
    if shard is not None:
        check_shard(*shard)
    run_dir = Path(run_dir)
    out = Path(output) if output else run_dir / "eval.json"
    if out.is_dir():
        raise ValueError(f"-o {out}: a folder; give a file name, e.g. {out / 'eval.json'}")
    cfg = load_run_config(run_dir)
    check_checkpoint(run_dir, request.checkpoint)
    # asked now, not at the end: a folder that cannot take the record (a read-only mount,
    # another user's runs) failed after all the sampling (10,000 samples: half an hour of an
    # H100), and said nothing of -o
    check_writable(out.parent, "eval writes its record there; -o names another file")
    scale = cfg.eval.cfg_scale if request.cfg_scale is None else request.cfg_scale
    if problem := cfg.guidance_error(scale):
        raise ValueError(f"--cfg: {problem}; evaluate with --cfg 1")
    sampler, steps = request.sampler or cfg.eval.sampler, request.steps or cfg.eval.sample_steps
    check_sampling(cfg, sampler, steps, scale)
    features = request.features or default_features(cfg.data.name)  # latents: inception
    wanted = request.metrics
    if "is" in wanted and features not in SMALL_NETS:
        # Inception gives pool features, no logits: IS failed at scoring, after all the
        # sampling, and `eval RUN_DIR` (all metrics) of folder and latents runs was that
        if wanted != METRICS:
            raise ValueError(
                f"--metrics is needs a classifier's logits; {features} features have none "
                "(use --features mnist-net / digits-net / shapes-net, or leave is out)"
            )
        wanted = tuple(m for m in wanted if m != "is")
        if progress:
            print(
                f"[dit-bench] note: {features} has no logits for IS: scoring {', '.join(wanted)}",
                file=sys.stderr,
            )
    if request.num_samples is not None:
        check_sample_count(wanted, request.num_samples, f"--num-samples {request.num_samples}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # The feature net first: a missing Inception file fails before minutes of sampling.
    trained_on = {net: data for data, net in DEFAULT_FEATURES.items()}.get(features)
    images_of = cfg.data.name  # latents: the images they were encoded from
    if images_of == "latents":
        from dit_bench.data.latents import read_manifest

        images_of = read_manifest(cfg.data.root)["source"]["name"]
    if trained_on not in (None, images_of):
        print(
            f"[dit-bench] warning: {features} was trained on {trained_on}, this run's data is "
            f"{images_of}: its distances also measure that domain gap (compare them only "
            f"with runs scored by {features} on {images_of})",
            file=sys.stderr,
        )
    net = load_feature_net(
        features, device=device, inception_path=request.inception_path, progress=progress
    )
    e = cfg.eval
    sampler = request.sampler or e.sampler
    steps = request.steps or e.sample_steps
    cfg_scale = e.cfg_scale if request.cfg_scale is None else request.cfg_scale
    use_ema = e.use_ema if request.use_ema is None else request.use_ema

    def say(msg: str) -> None:
        # the phases besides sampling (decoding, features, scoring): minutes each for 10,000
        # Inception or VAE-decoded images, which a log showed as silence after "sampled N/N"
        if progress:
            print(f"[dit-bench] {msg}", file=sys.stderr, flush=True)

    module = load_module(run_dir, request.checkpoint)  # on the CPU until the sampling
    # one listing of a folder for the split check and the reference; the check before the
    # reference's features (10,000 held-out images through Inception), not after them
    split = load_datasets(cfg.data)
    check_held_out_split(cfg, module.checkpoint_data, split, progress)
    if cfg.data.name == "latents":
        say("reference: reading the held-out latents")
    ref_images, train_set, latent_hash = reference_images(cfg, device, split)
    decode = ref_images.decode  # latents: the run's VAE, for its samples too
    # before any features: every metric fits statistics of the held-out images
    held_out = f"the held-out split has {len(ref_images)} images (data.val_fraction)"
    check_sample_count(("fd",), len(ref_images), held_out)
    if request.num_samples is None:  # as many samples as held-out images
        check_sample_count(wanted, len(ref_images), held_out)
    elif "pr" in wanted:  # precision/recall's k-NN radii of the held-out images too
        check_sample_count(["pr"], len(ref_images), held_out)
    n = request.num_samples or len(ref_images)
    if shard is None:  # a shard scores nothing: the reference is the merging eval's
        say(f"reference: {features} statistics of {len(ref_images)} held-out images")
        ref = reference_stats(
            ref_images,
            net,
            data_hash=latent_hash,
            batch_size=request.batch_size,
            description={"data": cfg.data.model_dump(mode="json"), "split": "val"},
        )
    elif shard[1] > n:
        raise ValueError(
            f"--shard {shard[0]}/{shard[1]}: {shard[1]} shards of {n} samples leave some "
            f"empty; split them {n} ways at most"
        )
    if "is" in wanted and shard is None:  # each split's score is at most its size (and the classes)
        classes = len(net.class_names) if net.class_names else 1000  # Inception: ImageNet's
        if n < IS_SPLITS * classes:
            print(
                f"[dit-bench] note: IS over {n} samples in {IS_SPLITS} splits is at most "
                f"{n / IS_SPLITS:g} (of {classes} classes): compare it only at the same "
                f"--num-samples (from {IS_SPLITS * classes} samples it can reach {classes})",
                file=sys.stderr,
            )
    # The net classifies this data set's classes: then label adherence is meaningful.
    same_classes = net.class_names is not None and tuple(net.class_names) == tuple(
        data_info(cfg.data).class_names
    )

    module = module.to(device)
    if compile:
        from dit_bench.fast import compile_backbone

        compile_backbone(module.eval_net(use_ema))
    step = module.checkpoint_step
    # all that sample i's features depend on (batch size, device and compile: float rounding
    # only); the checkpoint by its content (`checkpoint_fingerprint`): a copy of the run folder
    # is the same, a run trained again to the same step is not
    key = {
        "format": PARTIAL_FORMAT,
        "config_hash": cfg.hash,
        "checkpoint": [
            request.checkpoint,
            step,
            checkpoint_fingerprint(run_dir / "checkpoints" / request.checkpoint),
        ],
        "seed": request.seed,
        "sampler": sampler,
        "steps": steps,
        "cfg_scale": cfg_scale,
        "use_ema": use_ema,
        "feature_net": [net.name, net.sha256, net.resize],
        "decoder": latent_hash,  # the VAE a latents run's samples are decoded by, else None
        "num_samples": n,
    }
    # with -o, the shards' files beside the default record too (shards run without -o)
    default = run_dir / "eval.json"
    beside = [] if out.resolve() == default.resolve() else [default]
    store = SavedFeatures(out, key, n, shard, also_beside=beside)
    store.announce()
    diverged = False  # seeded samples: a rerun draws the same ones and stops there again
    # Streamed: a chunk of images is sampled, decoded and reduced to its features, and only
    # those are kept (FID-50K of 256x256 images held 39 GB of samples, 0.4 GB of features);
    # the store saves them every PARTIAL_EVERY_S and as the eval stops, so a Ctrl-C, a SIGTERM
    # or an error loses no finished chunk, a kill -9 those since the last save.
    try:
        for start, stop in store.to_draw(request.batch_size):
            t_sample = time.perf_counter()
            images = generate(
                module,
                range(start, stop),
                seed=request.seed,
                sampler=sampler,
                steps=steps,
                cfg_scale=cfg_scale,
                use_ema=use_ema,
                batch_size=request.batch_size,
            )
            seconds = time.perf_counter() - t_sample
            if decode is not None:
                images = decode(images)
            diverged = True
            check_finite_samples(
                images,
                f"{run_dir} (step {step}; samples {start}..{stop - 1} of {n})",
                "No metric is computed from them",
            )
            diverged = False
            feats, logits = net.features(images, batch_size=request.batch_size)
            del images  # before the next chunk is sampled: one chunk of images at a time
            store.add(start, feats, logits, seconds)
            say(f"sampled {store.count()}/{store.size}{store.of_shard}")
        store.save(unless_saved=True)  # scoring and the anchors may still fail: keep what cost most
    except BaseException:
        if diverged:  # nothing to resume: the same seeds give the same non-finite samples
            store.path.unlink(missing_ok=True)
            raise
        store.save(unless_saved=True)
        store.say_kept()
        raise
    if shard is not None:  # no record: the eval without --shard scores every shard's features
        return store.shard_done()
    labels = eval_labels(n, module.info.num_classes)
    say(f"{features} features of {n} samples; scoring {', '.join(wanted)}")
    gen_feats, gen_logits = store.features()
    metrics = score(gen_feats, gen_logits, ref, net, wanted, labels if same_classes else None)

    anchors = {}
    if request.anchors and "fd" in wanted:
        bs = request.batch_size
        g = torch.Generator().manual_seed(ANCHOR_SEED)
        pick = torch.randperm(len(train_set), generator=g)[: min(n, len(train_set))]
        say(f"anchors: {features} features of {len(pick)} training images and {n} of noise")

        # a chunk of images at a time (whole, the training images and the noise were 2 x 7.9 GB
        # at the gpu profiles' 10,000 256x256 samples); chunks of the net's own batch size, and
        # torch.rand on a CPU generator draws chunk by chunk what it draws whole: the same numbers
        def features_of(chunks) -> np.ndarray:
            return np.concatenate([net.features(x, batch_size=bs)[0] for x in chunks])

        real = (stack_items(train_set, c.tolist())[0] for c in pick.split(bs))  # only these read
        real_f = features_of(decode(x) if decode else x for x in real)
        shape = ref_images.shape[1:]  # (C, H, W) of the images, decoded
        noise = (torch.rand((min(bs, n - s), *shape), generator=g) * 2 - 1 for s in range(0, n, bs))
        noise_f = features_of(noise)
        fd = net.metric_prefix
        anchors = {
            f"{fd} real(train, n={len(pick)}) vs reference": D.frechet_distance(
                *D.gaussian_stats(real_f), ref.mu, ref.sigma
            ),
            f"{fd} uniform noise (n={n}) vs reference": D.frechet_distance(
                *D.gaussian_stats(noise_f), ref.mu, ref.sigma
            ),
        }
        if same_classes:
            right = 0  # held-out images the net classifies as labelled
            for x, y in ref_images.chunks(bs):
                _, logits = net.features(x, batch_size=bs)
                right += int((torch.from_numpy(logits).argmax(1) == y).sum())
            anchors[f"adherence{net.suffix} of the reference images"] = right / len(ref_images)

    record = {
        "run": str(run_dir),
        "config_hash": cfg.hash,
        "metrics": metrics,
        "anchors": anchors,
        "protocol": {
            # an interrupted run's last.ckpt, or an earlier step-N one: said in the record, not
            # only on the terminal of the command that wrote it
            "checkpoint": {
                "file": request.checkpoint,
                "global_step": step,
                "run_steps": cfg.train.steps,
                "final": step >= cfg.train.steps,
            },
            "weights": "ema" if use_ema else "raw",
            "objective": cfg.objective.name,
            "sampler": sampler,
            "steps": steps,
            "cfg_scale": cfg_scale,
            "sampler_settings": {  # what the sampling used: eta / sde_scale only where the
                # sampler takes them, the guidance's interval and channels only where it guides
                k: getattr(e, k)
                for k in ("eta", "sde_scale", "cfg_interval", "cfg_channels", "clip_x0")
                if (k not in ("eta", "sde_scale") or k in sampler_options(sampler))
                and (k not in ("cfg_interval", "cfg_channels") or cfg_scale != 1)
            },
            "num_samples": n,
            "labels": f"sample i conditioned on class i mod {module.info.num_classes}",
            "seeds": {
                "seed": request.seed,
                "rule": "sample i: torch.Generator().manual_seed((seed * 1_000_003 + i) % 2**32) "
                "for its starting noise and every sampler draw (batch-size independent)",
                "kid_subsets": KID_SEED,
                "anchors": ANCHOR_SEED,
            },
            "feature_net": net.protocol(),
            "resize": net.resize,
            "reference": {
                "id": ref.id,
                "n": ref.n,
                "split": f"val split of {cfg.data.name} (data.split_seed={cfg.data.split_seed})",
                "content_sha256": ref.meta["content_sha256"],
                "cached": ref.meta.get("cached", False),
            },
            "kid": {"subsets": KID_SUBSETS, "subset_size": kid_subset_size(n, ref.n)},
            "precision_recall": {"k": PR_K},
            "inception_score": {"splits": IS_SPLITS},
            "batch_size": request.batch_size,
            "device": device,
            # samples whose features an interrupted eval of this request, or its shards,
            # saved (partial_path)
            "resumed_from": store.resumed_from,
            # the shards' samples taken, [first, last + 1) ranges by shard ("3/8": block 3 of
            # 8); the rest this eval drew, or resumed from its own file
            "shards": store.shards_taken(),
            "engine": "dit_bench.metrics.distances (numpy/scipy float64); cross-checked "
            "against clean-fid and torchmetrics in tests/test_features.py",
        },
        "request": asdict(request),
        "sample_seconds": round(store.sample_seconds + store.shard_seconds, 2),
        "total_seconds": round(time.perf_counter() - t0, 2),
        "versions": package_versions(("torchmetrics", "clean-fid", "scipy")),
        "git_commit": git_commit(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    # one eval at a time from its look at the earlier record to its write: two side by side
    # (two GPUs, a scripted loop) each saw it, or one saw none while the other had moved it
    # aside and not yet written, and the later write replaced the other's record
    with locked(out.with_name(f".{out.name}.lock")):
        if out.exists():  # the default eval.json, or an -o naming an earlier record
            _keep_earlier(out)
        write_json_atomic(out, record)
    store.remove()  # the shards' files too: the record holds their features
    return record


# An interrupted eval's features so far: saved at most this often (a file of 50,000 Inception
# features is 0.8 GB), and when it stops (Ctrl-C, SIGTERM, an error)
PARTIAL_EVERY_S = 60.0
PARTIAL_FORMAT = 2  # bump when what a saved sample's features depend on changes


def check_shard(k: int, n: int) -> None:
    """A ValueError unless shard `k` of `n` (--shard K/N) is one: 0 <= K < N."""
    if not 0 <= k < n:
        raise ValueError(f"--shard {k}/{n}: K/N takes 0 <= K < N (shards 0/{n}..{n - 1}/{n})")


def shard_block(k: int, n: int, num_samples: int) -> tuple[int, int]:
    """[first, last + 1) of the samples of shard `k` of `n`: contiguous blocks, sizes within 1."""
    return k * num_samples // n, (k + 1) * num_samples // n


def checkpoint_fingerprint(path: Path) -> str:
    """What a checkpoint file holds, for the key of its features: the sha256 of its zip
    directory (each member's size and CRC-32, as torch.save writes them), read in milliseconds
    where DiT-XL/2's file is gigabytes. A copy (scp, cp without -p: another mtime) has the
    same; a run trained again to the same step has other weights. A file that is no zip, or
    whose CRC-32s are 0: its sha256, all of it."""
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(path) as z:
            # torch.save after torch.serialization.set_crc32_options(False) writes every CRC-32
            # as 0: that directory holds the tensors' sizes only, the same for other weights
            if any(info.CRC == 0 and info.file_size for info in z.infolist()):
                raise zipfile.BadZipFile("no CRC-32s")
            # names without their first folder, which torch.save names after the file written
            for info in sorted(z.infolist(), key=lambda i: i.filename.partition("/")[2]):
                h.update(
                    f"{info.filename.partition('/')[2]}\0{info.file_size}\0{info.CRC}\n".encode()
                )
    except zipfile.BadZipFile:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()[:16]


def partial_path(out: Path, key: dict, shard: tuple[int, int] | None = None) -> Path:
    """Where an eval that writes the record `out` keeps its features so far: beside the record,
    named by the sha256 of `key` (run config, checkpoint, seed, sampler, features, n ...), so
    evals of other requests side by side keep files of their own and never read another's;
    shard K of N (--shard K/N) in `<record>.<key>.shard-K-of-N.partial.npz`, one file each."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    part = "" if shard is None else f"shard-{shard[0]}-of-{shard[1]}."
    return out.with_name(f"{out.name}.{digest}.{part}partial.npz")


def shard_paths(out: Path, key: dict) -> list[Path]:
    """The shard files of `key` beside the record `out`, of any split."""
    prefix = partial_path(out, key).name.removesuffix("partial.npz")
    return sorted(out.parent.glob(f"{glob.escape(prefix)}shard-*-of-*.partial.npz"))


class SavedFeatures:
    """The features of an eval's samples so far, and the files they are saved in and resumed
    from: this process's own (`partial_path`: the request's, or shard K of N's), and for the
    eval without a shard every shard file of its key beside its record (and `also_beside`
    records'). Chunks are (first index, features, logits or None); each sample is taken from
    one file: shards of two splits (3 and 4) overlap, and a shard finished after an interrupted
    whole eval drew part of its block holds some of the same samples."""

    def __init__(
        self,
        out: Path,
        key: dict,
        n: int,
        shard: tuple[int, int] | None = None,
        also_beside: Sequence[Path] = (),
    ):
        self.out, self.key, self.n, self.shard = out, key, n, shard
        self.records = [out, *also_beside]
        self.path = partial_path(out, key, shard)
        self.lo, self.hi = (0, n) if shard is None else shard_block(*shard, n)
        self.size = self.hi - self.lo
        self.of_shard = "" if shard is None else f" of shard {shard[0]}/{shard[1]}"
        own, self.sample_seconds = _load_partial(self.path, key)
        found = {self.path: (own, self.sample_seconds)}
        if shard is None:  # what this request's shards drew, finished or not, of any split
            found.update({path: _load_partial(path, key) for path in self.shard_files()})
        self.kept: list = []  # this process's chunks: saved in its own file
        self.taken: list = []  # the shards' chunks
        self.used: dict[Path, list] = {}  # shard file: the [first, stop) ranges taken from it
        self.twice, at = 0, self.lo  # samples in more than one file; the first not yet taken
        for s, f, z, path in sorted(
            ((s, f, z, path) for path, (got, _) in found.items() for s, f, z in got),
            key=lambda c: (c[0], -len(c[1])),
        ):
            first, stop = max(s, at), min(s + len(f), self.hi)
            self.twice += max(0, min(at, s + len(f)) - max(s, self.lo))
            if first >= stop:
                continue
            chunk = (first, f[first - s : stop - s], None if z is None else z[first - s : stop - s])
            if path == self.path:
                self.kept.append(chunk)
            else:
                self.taken.append(chunk)
                self.used.setdefault(path, []).append([first, stop])
            at = stop
        self.shard_seconds = sum(found[path][1] for path in self.used)  # the shards' sampling
        self.resumed_from = self.count()
        self.saved, self.last_save = self._own(), time.perf_counter()

    def shard_files(self) -> list[Path]:
        return [path for record in self.records for path in shard_paths(record, self.key)]

    def count(self) -> int:
        """Samples whose features are here: resumed, taken from shards, drawn."""
        return sum(len(f) for _, f, _ in self.kept + self.taken)

    def _own(self) -> int:
        return sum(len(f) for _, f, _ in self.kept)

    def announce(self) -> None:
        """On stderr: what is resumed from where, samples held twice, and the files of other
        requests beside the record, and with -o beside RUN_DIR/eval.json, whose shards it takes
        (up to 0.8 GB each, which nothing will resume from)."""
        if self.resumed_from:
            sources = [self.path] if self.kept else []
            print(
                f"[dit-bench] resuming: {self.resumed_from:,} of {self.size:,} samples' features"
                f"{self.of_shard} from {', '.join(map(str, sources + list(self.used)))}",
                file=sys.stderr,
            )
        if self.twice:
            print(
                f"[dit-bench] note: {self.twice:,} samples' features are in more than one file "
                "(shards of two splits, or a stopped eval's and a shard's): each is taken once",
                file=sys.stderr,
            )
        for other in self._others():
            try:  # an eval stopped and not run again, or its run trained on since
                mib = other.stat().st_size / 2**20
            except FileNotFoundError:  # removed since the listing: an eval of it finished
                continue
            size = f"{mib:.0f} MiB" if mib >= 1 else f"{mib * 1024:.0f} KiB"
            print(
                f"[dit-bench] note: {other} ({size}) holds the features of an eval of "
                "another request (other settings, or another checkpoint): this one does not "
                "take them; delete it if that eval will not be run again",
                file=sys.stderr,
            )

    def _others(self) -> list[Path]:
        """The partial files of other requests beside the records (`records`)."""
        found = []
        for record in self.records:
            mine = partial_path(record, self.key).name.removesuffix("partial.npz")
            found += [
                other
                for other in sorted(record.parent.glob(f"{glob.escape(record.name)}.*.partial.npz"))
                if not other.name.startswith(mine)
            ]
        return found

    def to_draw(self, batch_size: int) -> list[tuple[int, int]]:
        """[first, stop) chunks of at most `batch_size` of the samples no file holds."""
        gaps, at = [], self.lo
        for s, f, _ in sorted(self.kept + self.taken, key=lambda c: c[0]):
            gaps += [(at, s)] if s > at else []
            at = s + len(f)
        gaps += [(at, self.hi)] if self.hi > at else []
        return [(s, min(s + batch_size, b)) for a, b in gaps for s in range(a, b, batch_size)]

    def add(self, start: int, feats: np.ndarray, logits: np.ndarray | None, seconds: float):
        """A chunk drawn from sample `start` on, in `seconds`; saved if the last save is
        PARTIAL_EVERY_S old. One append of the pair: a Ctrl-C between two lists' appends would
        have saved one chunk's features without its logits."""
        self.kept.append((start, feats, logits))
        self.sample_seconds += seconds
        if time.perf_counter() - self.last_save >= PARTIAL_EVERY_S:
            self.save()

    def save(self, unless_saved: bool = False) -> None:
        """This process's chunks to its file, whole (a failed save, a full disk, is said and
        tried again later: the save is for a resume, the features in memory still score)."""
        chunks = self.kept[:]  # what a save finds is what it counts
        if not chunks or (unless_saved and self._own() <= self.saved):
            return
        try:
            _save_partial(self.path, self.key, chunks, self.sample_seconds)
        except OSError as e:
            print(f"[dit-bench] could not save the features so far: {e}", file=sys.stderr)
            self.last_save = time.perf_counter()  # tried again a PARTIAL_EVERY_S later
            return
        self.saved, self.last_save = sum(len(f) for _, f, _ in chunks), time.perf_counter()

    def say_kept(self) -> None:
        if self.saved:
            print(
                f"[dit-bench] kept the features of {self.saved:,} of {self.size:,} samples"
                f"{self.of_shard} in {self.path}: the same command resumes from them",
                file=sys.stderr,
            )

    def shard_done(self) -> dict:
        """What a shard process returns (no record): its block and file; an OSError if its
        features could not be saved (a full disk at the last save: said already)."""
        k, n_shards = self.shard
        if self.saved < self.size:
            raise OSError(
                f"--shard {k}/{n_shards}: the features of samples {self.lo}..{self.hi - 1} "
                f"could not be saved in {self.path}; run it again once there is room"
            )
        return {
            "shard": [k, n_shards],
            "samples": [self.lo, self.hi],
            "num_samples": self.n,
            "file": str(self.path),
            "sample_seconds": round(self.sample_seconds, 2),
        }

    def features(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(features, logits or None) of every sample, in index order: KID's subsets and the
        labels of label adherence go by it."""
        chunks = sorted(self.kept + self.taken, key=lambda c: c[0])
        feats = np.concatenate([f for _, f, _ in chunks])
        return feats, None if chunks[0][2] is None else np.concatenate([z for *_, z in chunks])

    def shards_taken(self) -> dict[str, list]:
        """{"K/N": [[first, stop), ...]} of the samples taken from each shard's file."""
        return {_shard_of(path): _ranges(ranges) for path, ranges in self.used.items()}

    def remove(self) -> None:
        """Once the record holds them: this process's file and the shards'."""
        for path in [self.path, *self.shard_files()]:
            path.unlink(missing_ok=True)


def _shard_of(path: Path) -> str:
    """K/N, as --shard takes it, of a shard file's name (`partial_path`)."""
    k, _, n = path.name.rsplit(".", 3)[1].removeprefix("shard-").partition("-of-")
    return f"{k}/{n}"


def _ranges(ranges: list) -> list:
    """[first, stop) ranges in order, adjacent ones joined."""
    out: list = []
    for first, stop in ranges:
        if out and out[-1][1] == first:
            out[-1][1] = stop
        else:
            out.append([first, stop])
    return out


def _save_partial(path: Path, key: dict, chunks: list, seconds: float) -> None:
    """`chunks`: (first index, features, logits or None) of samples drawn, in one file."""
    arrays = {
        "key": np.array(json.dumps(key, sort_keys=True)),
        "features": np.concatenate([f for _, f, _ in chunks]),
        "starts": np.array([s for s, _, _ in chunks], dtype=np.int64),
        "lengths": np.array([len(f) for _, f, _ in chunks], dtype=np.int64),
        "sample_seconds": np.array(seconds),
    }
    if chunks[0][2] is not None:
        arrays["logits"] = np.concatenate([z for *_, z in chunks])
    with replacing(path) as tmp, open(tmp, "wb") as f:  # whole or not at all
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())


def _load_partial(path: Path, key: dict) -> tuple[list, float]:
    """([(first index, features, logits or None)] of its chunks, sampling seconds) an earlier
    eval of `key` saved at `path`, else nothing: a file of another key (or unreadable) is not
    mixed in, and is replaced."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != json.dumps(key, sort_keys=True):
                raise ValueError("saved by another request")
            feats = z["features"]
            logits = z["logits"] if "logits" in z.files else None
            starts, lengths = z["starts"].tolist(), z["lengths"].tolist()
            seconds = float(z["sample_seconds"])
        if len(starts) != len(lengths) or sum(lengths) != len(feats):
            raise ValueError("its chunks are not its features")
        if logits is not None and len(logits) != len(feats):
            raise ValueError("its logits are not its features'")
    except FileNotFoundError:
        return [], 0.0
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        print(
            f"[dit-bench] note: {path} is not used ({e}); its samples are drawn again",
            file=sys.stderr,
        )
        return [], 0.0
    ends = np.cumsum(lengths).tolist()
    return [
        (s, feats[e - m : e], None if logits is None else logits[e - m : e])
        for s, m, e in zip(starts, lengths, ends, strict=True)
    ], seconds


def _keep_earlier(path: Path) -> Path:
    """Move an earlier record aside as <name>-<its finish time>.json: another protocol (more
    steps, other features) must not silently replace its numbers."""
    try:
        stamp = datetime.fromisoformat(json.loads(path.read_text())["finished_at"])
    except (OSError, ValueError, KeyError, TypeError):
        stamp = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
    name = f"{path.stem}-{stamp.strftime('%Y%m%dT%H%M%SZ')}"
    kept = path.with_name(f"{name}{path.suffix}")
    # two records finished in one second (evals side by side): -2, -3, ..., never one over
    # the other (replace would overwrite it without a word)
    n = 1
    while kept.exists():
        n += 1
        kept = path.with_name(f"{name}-{n}{path.suffix}")
    path.replace(kept)
    print(f"[dit-bench] kept the earlier {path.name} as {kept.name}", file=sys.stderr)
    return kept


__all__ = [
    "METRICS",
    "EvalRequest",
    "NoCheckpointError",
    "check_sampling",
    "check_shard",
    "evaluate_run",
    "eval_labels",
    "generate",
    "partial_path",
    "sample_seed",
    "shard_block",
    "score",
]
