"""Feature networks for sample-quality metrics, all offline.

- `inception`: the Inception-v3 TorchScript file that clean-fid uses (`inception-2015-12-05.pt`,
  the TF-FID weights as ported by NVIDIA for StyleGAN2-ADA), read from a local file the user
  supplies; never downloaded. Images go through clean-fid's "clean" resize (PIL bicubic on float
  pixels to 299x299, Parmar et al. 2022, arXiv:2104.11222). Distances with it are "FID".
- `mnist-net`, `digits-net`, `shapes-net`: small CNN classifiers trained by this module,
  deterministically, on the train split of the built-in data set (seconds on a CPU). Their
  weights ship with the package (`nets/`, made by `make feature-nets`): the recipe is
  deterministic on one machine, but another CPU or torch build trains other last bits, and an
  FD is only comparable between runs scored by the same net. A recipe version without shipped
  weights is trained into the user cache folder instead, and retrained when missing. Their
  penultimate (128-d) activations give "FD-mnist-net" etc., never "FID"; their logits give the
  label-adherence accuracy and an IS-<net>.
  `digits-net` exists because the 8x8 `digits` images are ink counts of 4x4 blocks: upsampled
  to 32x32 they are blocky and far from what mnist-net saw, so its features would mostly measure
  that domain gap; a net trained on the 8x8 images themselves costs two seconds.

Every network sees the same input protocol: images in [-1, 1] are first quantised to 8 bits (what
a PNG of the samples would hold), so an in-memory evaluation and clean-fid reading the PNGs of the
same images agree. A feature net has two entry points: `features(x)` for (B, C, H, W) tensors in
[-1, 1] and `from_pixels(x)` for (B, 3, H, W) float pixels in [0, 255] (what clean-fid and
torchmetrics hand to a custom feature extractor).

Shipped (dit_bench/metrics/nets/), or else cached:
    <net>-v<version>.safetensors            weights of a small net
    <net>-v<version>.json                   its accuracy, training protocol and sha256
Cache layout (`$DIT_BENCH_CACHE`, default `~/.cache/dit-bench`):
    features/<net>-v<version>.safetensors   a small net of a recipe version not shipped
    features/<net>-v<version>.json
    refstats/<id>.npz, <id>.json            reference features (see reference.py)
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dit_bench.files import replacing, write_json_atomic

CACHE_ENV = "DIT_BENCH_CACHE"
INCEPTION_ENV = "DIT_BENCH_INCEPTION"
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
)
# clean-fid's own location (cleanfid.features.feature_extractor uses /tmp on Linux/macOS)
SHARED_INCEPTION = Path("/tmp") / INCEPTION_FILE


class FeatureWeightsError(FileNotFoundError):
    """A feature network's weights file is missing; the message says which file and where."""


def cache_dir() -> Path:
    """The user cache folder: $DIT_BENCH_CACHE, else ~/.cache/dit-bench."""
    # expanded here: a CI job's env block, a Dockerfile ENV, `--inception=~/x` pass ~ as is
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dit-bench").expanduser()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def quantize(x: Tensor) -> Tensor:
    """[-1, 1] -> float pixels in {0, ..., 255}, rounded as a PNG writer would."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round()


# --------------------------------------------------------------------------------------------
# Small classifiers trained on the built-in data
# --------------------------------------------------------------------------------------------


class SmallNet(nn.Module):
    """Three conv stages (16, 32, 64 channels, each halving the side), 2x2 average pool, a
    128-d penultimate layer and a linear classifier. About 0.1M parameters."""

    feature_dim = 128

    def __init__(self, channels: int, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 16, H/2, W/2)
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, H/4, W/4)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 64, H/8, W/8)
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),  # (B, 256)
            nn.Linear(256, self.feature_dim), nn.ReLU(),  # (B, 128): the features
        )  # fmt: skip
        self.head = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, C, S, S) in [-1, 1] -> (features (B, 128), logits (B, classes))."""
        f = self.body(x)
        return f, self.head(f)


@dataclass(frozen=True)
class SmallNetSpec:
    data: str  # built-in data set it is trained on (its default DataConfig, split_seed 0)
    channels: int
    size: int  # input side; other sizes are resized to it
    epochs: int
    max_train: int  # cap on the training images (shapes is procedural and large)
    lr: float
    batch_size: int = 32
    version: int = 1  # bump when the recipe changes: the cache file name carries it


# Recipes picked on held-out accuracy (mnist 0.966, digits ~0.97, shapes 0.971 on a CPU run):
# enough for features that separate the classes, cheap enough to retrain in under a minute.
SMALL_NETS: dict[str, SmallNetSpec] = {
    "mnist-net": SmallNetSpec("mnist", 1, 32, epochs=6, max_train=4500, lr=3e-3),
    "digits-net": SmallNetSpec("digits", 1, 8, epochs=15, max_train=1617, lr=3e-3),
    "shapes-net": SmallNetSpec("shapes", 3, 32, epochs=5, max_train=6000, lr=4e-3),
}
FEATURE_NETS: tuple[str, ...] = ("inception", *SMALL_NETS)
DEFAULT_FEATURES = {"mnist": "mnist-net", "digits": "digits-net", "shapes": "shapes-net"}


def default_features(data_name: str) -> str:
    """The feature net for a data set when none is named: its own small net, else inception."""
    return DEFAULT_FEATURES.get(data_name, "inception")


def _check_name(name: str) -> str:
    if name not in FEATURE_NETS:
        raise ValueError(f"unknown feature network {name!r}; known: {', '.join(FEATURE_NETS)}")
    return name


def _stack(dataset, limit: int | None = None) -> tuple[Tensor, Tensor]:
    n = len(dataset) if limit is None else min(limit, len(dataset))
    items = [dataset[i] for i in range(n)]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def _fit(spec: SmallNetSpec, x: Tensor, y: Tensor, seed: int, log=None) -> SmallNet:
    """Adam with a one-cycle learning rate; batches from a seeded permutation per epoch."""
    torch.manual_seed(seed)
    net = SmallNet(spec.channels)
    opt = torch.optim.Adam(net.parameters(), lr=spec.lr)
    g = torch.Generator().manual_seed(seed)
    steps = spec.epochs * -(-len(x) // spec.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=steps)
    net.train()
    for epoch in range(spec.epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), spec.batch_size):
            idx = order[i : i + spec.batch_size]
            loss = F.cross_entropy(net(x[idx])[1], y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if log:
            log(f"epoch {epoch + 1}/{spec.epochs} loss {loss.item():.4f}")
    return net.eval()


def train_small_net(name: str, *, seed: int = 0, log=None) -> tuple[dict, dict]:
    """Train `name` from scratch: (state_dict, report with held-out accuracy).

    Deterministic: weight init and batch order come from `seed`, and it runs on one CPU thread
    (faster for a net this small, no fight with a busy machine, and the same floats whatever
    the core count). Other CPUs or torch builds may still differ in the last bits: that is why
    every evaluation records the sha256 of the weights it used.
    """
    from dit_bench.config import DataConfig
    from dit_bench.data import load_datasets
    from dit_bench.fast import cpu_name

    spec = SMALL_NETS[name]
    train, val = load_datasets(DataConfig(name=spec.data, image_size=spec.size))
    x, y = _stack(train, spec.max_train)
    xv, yv = _stack(val)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # fork_rng: training it from inside a training run (the in-training FD callback) must
        # not move that run's global random state
        with torch.random.fork_rng(devices=[]):
            net = _fit(spec, x, y, seed, log)
        with torch.no_grad():
            acc = (net(xv)[1].argmax(1) == yv).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    report = {
        "name": name,
        "version": spec.version,
        "accuracy": acc,
        "accuracy_on": f"val split of {spec.data} (split_seed 0, {len(xv)} images)",
        "train_images": len(x),
        "epochs": spec.epochs,
        "seed": seed,
        "train_seconds": round(time.perf_counter() - start, 2),
        "torch": torch.__version__,
        "cpu": cpu_name(),
    }
    return {k: v.contiguous() for k, v in net.state_dict().items()}, report


# The small nets' weights shipped with the package, one file per recipe version
SHIPPED_NETS = Path(__file__).parent / "nets"


def small_net_path(name: str) -> Path:
    """Where `name` is cached when its recipe version is not shipped."""
    return cache_dir() / "features" / f"{name}-v{SMALL_NETS[name].version}.safetensors"


def shipped_net_path(name: str) -> Path:
    return SHIPPED_NETS / f"{name}-v{SMALL_NETS[name].version}.safetensors"


def save_small_net(name: str, path: Path, *, progress: bool = True) -> Path:
    """Train `name` and write its weights to `path` and its report (with the file's sha256)
    beside it, each written whole, then renamed: concurrent evaluations never read a torn file."""
    from safetensors.torch import save

    if progress:
        print(f"[dit-bench] training feature net {name} (once; written to {path})", file=sys.stderr)
    state, report = train_small_net(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:  # not save_file: mode 0600 (latents._encode), unreadable
        tmp.write_bytes(save(state))  # to the other users of a shared DIT_BENCH_CACHE
    report["sha256"] = sha256_file(path)
    write_json_atomic(path.with_suffix(".json"), report)
    if progress:
        print(f"[dit-bench] {name}: held-out accuracy {report['accuracy']:.4f}", file=sys.stderr)
    return path


def ensure_small_net(name: str, *, progress: bool = True) -> Path:
    """The weights file of `name`: the shipped one of its recipe version, else the cached one,
    trained first when it is missing."""
    shipped = shipped_net_path(name)
    if shipped.is_file() and shipped.with_suffix(".json").is_file():
        return shipped
    path = small_net_path(name)
    if path.is_file() and path.with_suffix(".json").is_file():
        return path
    return save_small_net(name, path, progress=progress)


# --------------------------------------------------------------------------------------------
# The interface the metrics use
# --------------------------------------------------------------------------------------------


def fd_metric_prefix(name: str) -> str:
    """The metric a feature net `name` scores: "FID" for Inception features, "FD-<name>"
    otherwise (never FID). Logged as val/<prefix> in training, a key of eval.json."""
    return "FID" if name == "inception" else f"FD-{name}"


class FeatureNet:
    """A loaded feature network; see the module docstring for its two entry points."""

    name: str
    dim: int
    sha256: str
    file: str
    resize: str  # how inputs reach the network, recorded in every evaluation
    class_names: tuple[str, ...] | None  # None: not a classifier of a dit-bench data set
    info: dict  # accuracy, training protocol (small nets)

    @property
    def metric_prefix(self) -> str:
        return fd_metric_prefix(self.name)

    @property
    def suffix(self) -> str:
        return "" if self.name == "inception" else f"-{self.name}"

    def protocol(self) -> dict:
        return {
            "name": self.name,
            "file": self.file,
            "sha256": self.sha256,
            "dim": self.dim,
            "resize": self.resize,
            **{k: v for k, v in self.info.items() if k not in ("name", "sha256")},
        }

    def features(self, x: Tensor, *, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray | None]:
        """(features (N, dim), logits (N, classes) or None) of images in [-1, 1]."""
        feats, logits = [], []
        for i in range(0, len(x), batch_size):
            f, z = self._forward(quantize(x[i : i + batch_size]))
            feats.append(f.double().cpu().numpy())
            if z is not None:
                logits.append(z.double().cpu().numpy())
        return np.concatenate(feats), (np.concatenate(logits) if logits else None)

    def from_pixels(self, x: Tensor) -> Tensor:
        """Features of (B, 3, H, W) float pixels in [0, 255] (clean-fid / torchmetrics)."""
        return self._forward(x.float())[0]

    def _forward(self, pixels: Tensor) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError


class SmallFeatureNet(FeatureNet):
    def __init__(self, name: str, device: str | torch.device = "cpu", *, progress: bool = True):
        from safetensors.torch import load_file

        spec = SMALL_NETS[name]
        path = ensure_small_net(name, progress=progress)
        self.name, self.spec, self.device = name, spec, torch.device(device)
        with torch.random.fork_rng(devices=[]):  # initial weights, replaced: not the caller's
            self.net = SmallNet(spec.channels)
        try:
            state = load_file(str(path))
        except Exception as e:
            if path.parent == SHIPPED_NETS:  # retrained, it would score with other weights
                raise FeatureWeightsError(
                    f"{path}, the {name} weights shipped with dit-bench, is unreadable ({e}): "
                    "reinstall dit-bench (git checkout of the file)"
                ) from e
            # a damaged cache file (disk full, copied half): train it again
            print(f"[dit-bench] {path} is unreadable ({e}); retraining {name}", file=sys.stderr)
            path.unlink()
            path = ensure_small_net(name, progress=progress)
            state = load_file(str(path))
        self.net.load_state_dict(state)
        self.net.eval().requires_grad_(False).to(self.device)
        self.dim = SmallNet.feature_dim
        self.file = str(path)
        self.sha256 = sha256_file(path)
        self.info = json.loads(path.with_suffix(".json").read_text())
        self.resize = (
            f"8-bit quantise, then bilinear (antialiased) to {spec.size}x{spec.size} when the "
            f"side differs; {spec.channels}-channel input (RGB averaged / grey repeated)"
        )
        from dit_bench.config import DataConfig
        from dit_bench.data import data_info  # class names of the data set it classifies

        self.class_names = data_info(DataConfig(name=spec.data)).class_names

    @torch.no_grad()
    def _forward(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        x = pixels.to(self.device)
        c = self.spec.channels
        if x.shape[1] != c:
            x = x.mean(1, keepdim=True) if c == 1 else x.expand(-1, c, -1, -1)
        if x.shape[-1] != self.spec.size:
            x = F.interpolate(x, size=(self.spec.size,) * 2, mode="bilinear", antialias=True)
        return self.net(x / 127.5 - 1.0)


# --------------------------------------------------------------------------------------------
# Inception (clean-fid's weights, supplied by the user)
# --------------------------------------------------------------------------------------------


def inception_candidates(path: str | Path | None = None) -> list[Path]:
    """Where the Inception file is looked for, in order."""
    if path is not None:
        return [Path(path).expanduser()]
    out = []
    if os.environ.get(INCEPTION_ENV):
        out.append(Path(os.environ[INCEPTION_ENV]).expanduser())
    out += [SHARED_INCEPTION, cache_dir() / INCEPTION_FILE]
    return out


def _untrusted(path: Path) -> str | None:
    """Why another user could have written `path` (they own it, or may write it), else None.
    Root's files count as one's own (an administrator's copy for everyone): root can do all."""
    if not hasattr(os, "getuid"):  # Windows: no owner to compare, and a folder made at a
        # drive's root (C:\tmp, clean-fid's "/tmp" there) lets every user change its files
        return "in a folder every user may write, on Windows"
    st = path.stat()
    # a link's owner too: theirs, it is theirs to point at another file between this check
    # and the load (a link in /tmp is followed on macOS, and on Linux without protected_symlinks)
    for uid in (path.lstat().st_uid, st.st_uid):
        if uid not in (0, os.getuid()):
            return f"owned by another user (uid {uid})"
    # not group-writable: umask 002 makes every file so where each user has a group of their own
    return "writable by every user" if st.st_mode & 0o002 else None


def find_inception(path: str | Path | None = None) -> Path:
    """The Inception weights file, or FeatureWeightsError naming the file and where to put it.

    The file in /tmp is used only if this user owns it and not every user can write it: anyone
    can put one there, and a TorchScript file runs with the rights of whoever loads it (its
    code can open any of their files for writing: torch.from_file(..., shared=True)). A path
    named by --inception or $DIT_BENCH_INCEPTION is the user's own choice."""
    candidates = inception_candidates(path)
    # the first candidate, where the user named one: /tmp's file named is theirs to vouch for
    named = path is not None or bool(os.environ.get(INCEPTION_ENV))
    skipped = ""
    for i, c in enumerate(candidates):
        if not c.is_file():
            continue
        if not (named and i == 0) and c == SHARED_INCEPTION and (why := _untrusted(c)):
            skipped = f"\nSkipped {c}: {why}; put a copy of your own at one of the above."
            continue
        return c
    looked = "\n".join(f"  {c}" for c in candidates) + skipped
    raise FeatureWeightsError(
        f"Inception features (eval --features inception, or eval.fd_features=inception in "
        f"training) need clean-fid's Inception weights file {INCEPTION_FILE}, "
        f"which dit-bench never downloads. Looked in:\n{looked}\n"
        f"Get it on a machine with internet ({INCEPTION_URL}) and put it at "
        f"{cache_dir() / INCEPTION_FILE} (or /tmp/{INCEPTION_FILE}, where clean-fid looks), "
        f"or set {INCEPTION_ENV}=PATH (dit-bench eval also takes --inception PATH)."
    )


class InceptionFeatureNet(FeatureNet):
    """pool3 (2048-d) features of clean-fid's TorchScript Inception, clean resize to 299."""

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu"):
        file = find_inception(path)
        self.name, self.device = "inception", torch.device(device)
        try:
            self.model = torch.jit.load(str(file), map_location=self.device).eval()
        except Exception as e:  # a partial download, another file of the same name
            raise ValueError(
                f"{file} is not clean-fid's TorchScript Inception ({type(e).__name__}); "
                f"fetch {INCEPTION_URL} again"
            ) from None
        self.dim = 2048
        self.file = str(file)
        self.sha256 = sha256_file(file)
        self.class_names = None
        self.info = {"source": INCEPTION_URL}
        self.resize = "clean-fid clean: 8-bit quantise, PIL bicubic on float pixels to 299x299"
        from cleanfid.resize import make_resizer  # lazy: training never needs clean-fid

        self._resize = make_resizer("PIL", False, "bicubic", (299, 299))

    @torch.no_grad()
    def _forward(self, pixels: Tensor) -> tuple[Tensor, None]:
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)  # grey -> RGB, as PIL's convert("RGB")
        if pixels.shape[-1] != 299 or pixels.shape[-2] != 299:
            hwc = pixels.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
            pixels = torch.from_numpy(np.stack([self._resize(im) for im in hwc])).permute(
                0, 3, 1, 2
            )
        x = (pixels.to(self.device) - 128) / 128  # clean-fid's InceptionV3W normalisation
        return self.model.layers.forward(x).view(len(x), 2048), None


def load_feature_net(
    name: str,
    *,
    device: str | torch.device = "cpu",
    inception_path: str | Path | None = None,
    progress: bool = True,
) -> FeatureNet:
    """The feature network `name` (one of FEATURE_NETS), ready on `device`."""
    _check_name(name)
    if name == "inception":
        return InceptionFeatureNet(inception_path, device)
    return SmallFeatureNet(name, device, progress=progress)


class PixelFeatures(nn.Module):
    """A FeatureNet as the nn.Module that torchmetrics and clean-fid call: (B, 3, H, W) pixels in
    [0, 255] -> (B, dim) features."""

    def __init__(self, net: FeatureNet):
        super().__init__()
        self.fnet = net
        self.num_features = net.dim

    def forward(self, x: Tensor) -> Tensor:
        return self.fnet.from_pixels(x)


def main(argv: list[str] | None = None) -> None:
    """`python -m dit_bench.metrics.features [NET ...]` (`make feature-nets`): train the small
    nets and write them to the package's nets/ folder, the weights every machine then uses."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m dit_bench.metrics.features", description=main.__doc__
    )
    ap.add_argument("nets", nargs="*", help=f"any of {', '.join(SMALL_NETS)} (default: all)")
    names = ap.parse_args(argv).nets or list(SMALL_NETS)
    if unknown := [n for n in names if n not in SMALL_NETS]:
        ap.error(f"unknown small nets {unknown}; known: {', '.join(SMALL_NETS)}")
    for name in names:
        path = save_small_net(name, shipped_net_path(name))
        print(f"[dit-bench] {name}: sha256 {sha256_file(path)}")


if __name__ == "__main__":
    main()
