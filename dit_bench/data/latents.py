"""Latent data sets: images encoded once by a local VAE, stored as sharded safetensors.

Paper-scale DiT training runs on precomputed VAE latents (fast-DiT; SD3 measured +14% step time
for encoding on the fly). `encode_latents` turns an image folder into

    OUT/manifest.json        source, sizes, VAE scaling factor, class names, shard list + sha256
    OUT/shard-00000.safetensors  {"latents": (n, 4, h, w) float32, "labels": (n,) int64}, ...

Latents are the posterior mean times the VAE's scaling factor (deterministic, so an
interrupted encoding resumes to exactly the same shards). With `flip`, the horizontally flipped
copy of every image is encoded too (DiT's only augmentation), as items N .. 2N - 1.

Resumable: each shard is written to a temporary file, renamed, and only then recorded in the
manifest; a rerun skips the shards the manifest lists. Reading checks every shard against the
manifest (present, same sha256, same shape) and names the shard that does not match.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from dit_bench.files import open_lock, replacing, try_lock, write_json_atomic

FORMAT = "dit-bench-latents/1"
MANIFEST = "manifest.json"
# What the readers take from every manifest (encode-latents writes them all): one without
# (hand-made, another tool's) ended train, ablate or eval in a KeyError traceback
MANIFEST_KEYS = (
    "source", "num_images", "flip", "num_items", "class_names", "shard_size", "latent_shape",
    "shards",
)  # fmt: skip


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(root: str | Path) -> dict:
    from dit_bench.data.datasets import DataError

    path = Path(root) / MANIFEST
    if not path.is_file():
        raise DataError(f"data.root: {root} has no {MANIFEST}; create it with encode-latents")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{path}: not a {FORMAT} manifest (format={found!r})")
    if missing := [k for k in MANIFEST_KEYS if k not in manifest]:
        raise DataError(
            f"{path}: no {', '.join(map(repr, missing))}, which encode-latents writes; encode "
            "the images with it (into a new --out folder)"
        )
    return manifest


def load_vae(vae_dir: str | Path, device: str | torch.device = "cpu", what: str = "--vae"):
    """A diffusers AutoencoderKL saved on disk (`save_pretrained` folder); never downloads.
    `what`: the flag or key that named the folder, for the error when it holds none."""
    check_vae_dir(vae_dir, what)
    vae = require_diffusers(what).AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True)
    return vae.to(device).eval().requires_grad_(False)


def require_diffusers(what: str):
    """diffusers, for VAE latents and `bench --against diffusers`: an extra, not a dependency
    (`pip install dit-bench` leaves it out), so its absence is an error naming the extra."""
    try:
        import diffusers
    except ModuleNotFoundError as e:
        if e.name != "diffusers":  # installed, but broken: its own error says why
            raise
        raise ValueError(
            f"{what} needs diffusers, which is not installed: pip install 'dit-bench[diffusers]' "
            "(from a checkout: pip install '.[diffusers]')"
        ) from None
    # diffusers before 0.33 calls safetensors.torch.load_file/save_file having imported only
    # `safetensors`, counting on some other package to have imported the submodule: without
    # it every from_pretrained fails as "Unable to load weights" (diffusers 0.30 is our floor)
    import safetensors.torch  # noqa: F401

    return diffusers


def check_vae_dir(vae_dir: str | Path, what: str = "--vae") -> None:
    """Cheap, before any loading: `vae_dir` (named by `what`) holds a diffusers VAE."""
    if not Path(vae_dir, "config.json").is_file():
        raise FileNotFoundError(
            f"{what} {vae_dir}: no config.json there; pass the folder of a diffusers "
            "AutoencoderKL saved with save_pretrained (e.g. the `vae/` folder of an SD model)"
        )


# The weights that map images to latents (diffusers' AutoencoderKL names): two VAEs that share
# them share a latent space (SD's ft-EMA and ft-MSE VAEs differ in the decoder only).
ENCODER_PARTS = ("encoder.", "quant_conv.")


def vae_fingerprint(vae, parts: tuple[str, ...] = ()) -> str:
    """sha256 of the VAE's weights (names, shapes, values), of those whose names start with
    one of `parts` when given: tells two VAEs with one config apart (SD's ft-EMA and ft-MSE
    decoders share it, and their scaling factor)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        if parts and not name.startswith(parts):
            continue
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# Stable Diffusion's VAE (and DiT's latents): the factor for a VAE whose config names none
SD_SCALING_FACTOR = 0.18215


def vae_scaling_factor(vae) -> float:
    return float(getattr(vae.config, "scaling_factor", SD_SCALING_FACTOR))


def manifest_scaling_factor(root: str | Path) -> float:
    """The factor the latents under `root` were multiplied by, to divide out before decoding
    (`encode-latents` records the VAE's; a manifest without one: SD's)."""
    return float(read_manifest(root).get("scaling_factor", SD_SCALING_FACTOR))


def vae_shift_factor(vae) -> float:
    """What the VAE's latents are centred by before scaling, z = (mean - shift) * scale: SD3's
    and FLUX's VAEs have one (0.0609, 0.1159), SD's and SDXL's none."""
    return float(getattr(vae.config, "shift_factor", None) or 0.0)


def manifest_shift_factor(root: str | Path) -> float:
    """The shift the latents under `root` were centred by, to add back before decoding (a
    manifest without one: none, as encodings before this and SD's VAE)."""
    return float(read_manifest(root).get("shift_factor", 0.0))


@torch.no_grad()
def encode_latents(
    vae_dir: str | Path,
    source: Any,
    out: str | Path,
    *,
    flip: bool = False,
    shard_size: int = 1024,
    batch_size: int = 32,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Encode the images of `source` (a data config: folder, shapes, ...) into shards at `out`.

    Returns the manifest. Rerunning continues an interrupted encoding.
    """
    from dit_bench.data.datasets import (
        DataError,
        ImageFolder,
        check_image_files,
        data_info,
        full_dataset,
    )

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: a file, not a folder")
    info = data_info(source)
    images = full_dataset(source)
    if isinstance(images, ImageFolder):
        check_image_files(images)  # not hours into the encoding
    vae = load_vae(vae_dir, device)  # checked before the output folder is made
    factor = 2 ** (len(vae.config.block_out_channels) - 1)  # the encoder's downsampling
    if info.image_size % factor:
        raise DataError(
            f"--image-size {info.image_size}: not a multiple of the VAE's downsampling factor "
            f"{factor} (its latents would decode to another size)"
        )
    out.mkdir(parents=True, exist_ok=True)
    # one process per folder: two would each keep their own list of shards and write them over
    # the other's (twice the work; on a GPU, whose kernels are not bit-exact, a manifest whose
    # checksums name the other's files). A lock file, not a check of the manifest: the
    # second may start before the first has written one.
    try:
        lock = open_lock(out / ".encode.lock")
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        # a folder this user cannot write (a shared, read-only copy of a finished encoding):
        # a rerun checks it and writes nothing, as before the lock; one with shards left to
        # encode fails at its first write, saying so
        lock = None
    with lock or contextlib.nullcontext():
        if lock is not None and (holder := try_lock(lock)) is not None:
            raise DataError(
                f"--out {out}: another encode-latents ({holder or 'starting'}) is writing this "
                "folder; wait for it (rerun then to finish an interrupted encoding), or use "
                "another --out"
            )
        return _encode(
            vae, vae_dir, source, info, images, out, flip, shard_size, batch_size, device, progress
        )


@torch.no_grad()
def _encode(
    vae, vae_dir, source, info, images, out: Path, flip, shard_size, batch_size, device, progress
) -> dict:
    """encode_latents' work, in the folder it holds alone."""
    from safetensors.torch import save

    from dit_bench.data.datasets import DataError

    scale, shift = vae_scaling_factor(vae), vae_shift_factor(vae)
    n = len(images)
    header = {
        "format": FORMAT,
        "source": {"name": source.name, "root": getattr(source, "root", None)},
        "source_files": _files_digest(images),
        "image_size": info.image_size,
        "image_channels": info.channels,
        "num_images": n,
        "flip": flip,
        "num_items": 2 * n if flip else n,
        "class_names": list(info.class_names),
        "scaling_factor": scale,
        "vae": {
            "path": str(Path(vae_dir).resolve()),
            "config": dict(vae.config),
            "sha256": vae_fingerprint(vae),
            "encoder_sha256": vae_fingerprint(vae, ENCODER_PARTS),
        },
        "shard_size": shard_size,
        # recorded where there is one: an SD VAE's manifest stays as it was, and one of an
        # earlier encoding that ignored the shift does not match (its shards are not centred)
        **({"shift_factor": shift} if shift else {}),
    }
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        manifest = read_manifest(out)
        ignored = ("shards", "latent_shape", "vae", "source_files")
        old = {k: v for k, v in manifest.items() if k not in ignored}
        new = {k: v for k, v in header.items() if k not in ignored}
        # a manifest from before data.root had one spelling holds the root as typed (`imgs/`,
        # `./imgs`): the same command, now spelling it `imgs`, must find its encoding
        if old.get("source", {}).get("root"):
            old["source"] = {**old["source"], "root": str(Path(old["source"]["root"]))}
        if old != new:
            raise DataError(
                f"{manifest_path} was written for a different source or settings; "
                "use another --out folder"
            )
        listed = manifest.get("source_files")  # manifests before this check lack it
        if listed not in (None, header["source_files"]):
            raise DataError(
                f"{manifest_path}: the images under {header['source']['root']} changed since "
                "these latents were encoded (a file added, removed, renamed or rewritten); "
                "its shards would mix the two versions: use another --out folder"
            )
        written_by = manifest["vae"].get("sha256")  # manifests before this check lack it
        if written_by not in (None, header["vae"]["sha256"]):
            raise DataError(
                f"{manifest_path} was written with another VAE ({manifest['vae']['path']}); "
                "its shards and these would not be one data set: use another --out folder"
            )
        # a shard deleted or damaged since (a full disk, a bad copy) is encoded again
        kept = [
            s
            for s in manifest["shards"]
            if (out / s["file"]).is_file() and _sha256(out / s["file"]) == s["sha256"]
        ]
        for s in manifest["shards"]:
            if s not in kept and progress:
                print(
                    f"[encode-latents] {s['file']}: missing or damaged; encoding it again",
                    file=sys.stderr,
                )
        manifest["shards"] = kept
    else:
        manifest = {**header, "shards": []}
    done = {s["file"] for s in manifest["shards"]}
    num_items = header["num_items"]
    n_shards = -(-num_items // shard_size)
    for s in range(n_shards):
        name = f"shard-{s:05d}.safetensors"
        if name in done:
            continue
        lo, hi = s * shard_size, min((s + 1) * shard_size, num_items)
        latents, labels = [], []
        for start in range(lo, hi, batch_size):
            items = [images[i % n] for i in range(start, min(start + batch_size, hi))]
            x = torch.stack([img for img, _ in items])  # (b, C, H, W) in [-1, 1]
            flipped = torch.tensor([i >= n for i in range(start, start + len(items))])
            x = torch.where(flipped[:, None, None, None], x.flip(-1), x)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)  # VAEs take RGB
            z = (vae.encode(x.to(device)).latent_dist.mean - shift) * scale  # (b, C, H/8, W/8)
            latents.append(z.float().cpu())
            labels += [y for _, y in items]
        tensors = {
            "latents": torch.cat(latents).contiguous(),
            "labels": torch.tensor(labels, dtype=torch.long),
        }
        with replacing(out / name) as tmp:
            # the bytes written here, not by save_file: safetensors 0.8 writes through a
            # temporary file of its own, mode 0600 whatever the umask (the other users of a
            # shared data folder could not read the shards), and a full disk came back as a
            # SafetensorError with a traceback instead of an OSError naming the shard
            tmp.write_bytes(save(tensors))
        manifest["latent_shape"] = list(tensors["latents"].shape[1:])
        manifest["shards"].append(
            {"file": name, "start": lo, "count": hi - lo, "sha256": _sha256(out / name)}
        )
        write_json_atomic(manifest_path, manifest)
        if progress:
            # stderr, as every command's progress: stdout is the result a script reads
            print(
                f"[encode-latents] {name}: items {lo}..{hi - 1} of {num_items}",
                file=sys.stderr,
                flush=True,
            )
    return manifest


def _files_digest(images: Any) -> str | None:
    """sha256 of an image folder's listing (path below the root, size, modification time),
    None for other sources: a rerun over a folder that changed since would otherwise keep the
    shards of the old images, and the manifest say they are of this folder's."""
    from dit_bench.data.datasets import ImageFolder, name_bytes

    if not isinstance(images, ImageFolder):
        return None
    digest = hashlib.sha256()
    for name, (path, label) in zip(images.names(), images.samples, strict=True):
        stat = Path(path).stat()
        digest.update(name_bytes(f"{name}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n"))
    return digest.hexdigest()


class LatentShards(Dataset):
    """Items (latent (4, h, w) float32, label) from a manifest's shards, checked on first use."""

    def __init__(self, root: str | Path):
        from dit_bench.data.datasets import DataError

        self.root = Path(root)
        self.manifest = read_manifest(root)
        shards = sorted(self.manifest["shards"], key=lambda s: s["start"])
        expected = -(-self.manifest["num_items"] // self.manifest["shard_size"])
        if len(shards) != expected:
            raise DataError(
                f"{self.root}: {len(shards)} of {expected} shards are encoded; "
                "rerun encode-latents to finish"
            )
        self.shards = shards
        # Shard k -> (memory-mapped latents, labels). Mapped, not loaded: the OS page cache
        # holds the data once for every loader worker (ImageNet with flips is ~40 GB of
        # float32 latents, which a copy per worker would not fit).
        self._open: dict[int, tuple[Any, torch.Tensor]] = {}

    def __getstate__(self) -> dict:
        # open files do not pickle (spawned loader workers): each process maps its own
        return {**self.__dict__, "_open": {}}

    def __len__(self) -> int:
        return self.manifest["num_items"]

    def _shard(self, k: int) -> tuple[Any, torch.Tensor]:
        from safetensors import SafetensorError, safe_open

        from dit_bench.data.datasets import DataError

        if k not in self._open:
            meta = self.shards[k]
            path = self.root / meta["file"]
            if not path.is_file():
                raise DataError(f"latent shard {path} is missing")
            if _sha256(path) != meta["sha256"]:
                raise DataError(f"latent shard {path} is corrupt (sha256 differs from manifest)")
            try:
                f = safe_open(str(path), framework="pt")
                latents, labels = f.get_slice("latents"), f.get_tensor("labels")
            except (SafetensorError, OSError) as e:
                raise DataError(f"latent shard {path} cannot be read: {e}") from None
            shape = tuple(latents.get_shape())
            want = (meta["count"], *self.manifest["latent_shape"])
            if shape != want or labels.shape != (meta["count"],):
                raise DataError(f"latent shard {path} holds {shape}, manifest says {want}")
            self._open[k] = (latents, labels)
        return self._open[k]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        k, i = divmod(index, self.manifest["shard_size"])
        latents, labels = self._shard(k)
        return latents[i : i + 1][0], int(labels[i])  # (4, h, w): one item read from the map


def load_decoder(vae_dir: str | Path, root: str | Path, device: str | torch.device = "cpu"):
    """The VAE of `vae_dir` (data.vae) to decode the latents at `root` (data.root), checked
    against the one that encoded them (the manifest's fingerprints).

    Another encoder means another latent space: its decodings would be noise, an error. The
    same encoder with another decoder (SD's ft-MSE decoder for ft-EMA latents, as DiT decodes)
    is a choice: a warning, since grids, FD and eval then describe that decoder's images.
    """
    from dit_bench.data.datasets import DataError

    vae = load_vae(vae_dir, device, "data.vae")
    written = read_manifest(root).get("vae", {})
    encoder = written.get("encoder_sha256")  # manifests before this check lack it
    if encoder is not None and encoder != vae_fingerprint(vae, ENCODER_PARTS):
        raise DataError(
            f"data.vae {vae_dir}: not the encoder of the latents in data.root {root} (encoded "
            f"with {written.get('path')}); its decodings of them would be noise"
        )
    if written.get("sha256") not in (None, vae_fingerprint(vae)):
        warnings.warn(
            f"data.vae {vae_dir}: another decoder than that of the VAE that encoded data.root "
            f"{root} ({written.get('path')}); samples and scores are of this one's images",
            stacklevel=2,
        )
    return vae


@torch.no_grad()
def decode_latents(
    vae, z: torch.Tensor, scaling_factor: float, shift_factor: float = 0.0, batch_size: int = 32
) -> torch.Tensor:
    """Images in [-1, 1] on the CPU from scaled (and shifted) latents (B, C, h, w), decoded on
    the VAE's device `batch_size` at a time: SD's VAE took about 155 MB a 256x256 image on a
    CPU, and an ImageNet run's sample grid holds 1000."""
    device = next(vae.parameters()).device
    return torch.cat(
        [
            vae.decode(z[i : i + batch_size].to(device) / scaling_factor + shift_factor)
            .sample.clamp(-1, 1)
            .cpu()
            for i in range(0, len(z), batch_size)
        ]
    )
