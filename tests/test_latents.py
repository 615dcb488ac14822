"""Latent data sets: encode a folder with a tiny random VAE, train on the shards, decode."""

import json
import subprocess
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dit_bench.data import DataError, data_info, load_datasets
from dit_bench.data.latents import LatentShards, decode_latents, encode_latents, load_vae

# Tiny models run in-process outside train() (which sets train.threads): on one thread, as
# train() runs them; on two shared cores OpenMP's barriers cost more than the second thread
# saves (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def other_vae(vae_dir, path):
    """`vae_dir`'s VAE with other decoder weights, saved at `path` (same config)."""
    from diffusers import AutoencoderKL

    other = AutoencoderKL.from_pretrained(vae_dir)
    with torch.no_grad():
        other.decoder.conv_out.weight.mul_(2)
    other.save_pretrained(path)
    return path


def folder_cfg(root):
    return SimpleNamespace(
        name="folder",
        root=str(root),
        image_size=32,
        val_fraction=0.2,
        split_seed=0,
        num_samples=0,
        max_samples=None,
    )


def latent_cfg(root, **kw):
    return SimpleNamespace(
        **{**vars(folder_cfg(root)), "name": "latents", "image_size": None, **kw}
    )


def test_latents_without_diffusers_name_the_extra_to_install(vae_dir, monkeypatch):
    # diffusers is an extra (`pip install dit-bench` leaves it out): not a bare traceback
    from dit_bench.bench import make_diffusers_dit

    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ValueError, match=r"--vae needs diffusers.*dit-bench\[diffusers\]"):
        load_vae(vae_dir)
    with pytest.raises(ValueError, match=r"--against diffusers needs diffusers"):
        make_diffusers_dit("dit-s/2", image_size=8, channels=4, num_classes=10, learn_sigma=False)


def test_encode_read_split_decode(vae_dir, image_folder, tmp_path):
    out = tmp_path / "lat"
    m = encode_latents(
        vae_dir,
        folder_cfg(image_folder),
        out,
        flip=True,
        shard_size=8,
        batch_size=4,
        progress=False,
    )
    assert m["num_images"] == 20 and m["num_items"] == 40 and len(m["shards"]) == 5
    assert m["latent_shape"] == [4, 4, 4]
    # a size the VAE does not divide (its latents decode to another size) makes nothing
    odd = SimpleNamespace(**{**vars(folder_cfg(image_folder)), "image_size": 36})
    with pytest.raises(DataError, match="--image-size 36: not a multiple of the VAE's .* 8"):
        encode_latents(vae_dir, odd, tmp_path / "odd", progress=False)
    assert not (tmp_path / "odd").exists()
    info = data_info(latent_cfg(out))
    assert (info.channels, info.image_size, info.num_classes) == (4, 4, 2)
    ds = LatentShards(out)
    z, y = ds[3]
    # The stored latent is the scaled posterior mean of that very image.
    from dit_bench.data.datasets import full_dataset

    img, label = full_dataset(folder_cfg(image_folder))[3]
    vae = load_vae(vae_dir)
    want = vae.encode(img[None]).latent_dist.mean[0] * m["scaling_factor"]
    assert y == label and torch.allclose(z, want, atol=1e-5)
    # every item's label, across shards and mirrors (the images are sorted by class: a label
    # one item off within a shard shows only at a class boundary)
    labels = [full_dataset(folder_cfg(image_folder))[i][1] for i in range(20)]
    assert [ds[i][1] for i in range(40)] == labels + labels
    # Item n + i is the mirror image of item i.
    zf, _ = ds[20 + 3]
    wantf = vae.encode(img[None].flip(-1)).latent_dist.mean[0] * m["scaling_factor"]
    assert torch.allclose(zf, wantf, atol=1e-5)
    # the first mirror too (item n: the boundary between originals and mirrors)
    img0 = full_dataset(folder_cfg(image_folder))[0][0]
    want0 = vae.encode(img0[None].flip(-1)).latent_dist.mean[0] * m["scaling_factor"]
    assert torch.allclose(ds[20][0], want0, atol=1e-5)
    # Spawned loader workers get a pickled copy: it maps the shards again, same items.
    import pickle

    copy = pickle.loads(pickle.dumps(ds))
    assert all(torch.equal(copy[i][0], ds[i][0]) and copy[i][1] == ds[i][1] for i in (0, 23, 39))
    train, val = load_datasets(latent_cfg(out))
    assert len(val) == 4 and len(train) == 32
    val_sources = {i % 20 for i in val.indices}
    assert not val_sources & {i % 20 for i in train.indices}, "a val image leaks via its flip"
    images = decode_latents(vae, torch.stack([z, zf]), m["scaling_factor"])
    assert images.shape == (2, 3, 32, 32) and images.abs().max() <= 1


def test_a_vae_with_a_shift_factor_centres_the_latents_and_decodes_them_back(
    vae_dir, image_folder, tmp_path
):
    # SD3's and FLUX's VAEs centre their latents, z = (mean - shift) * scale: the shift was
    # ignored, so their latents trained off-centre, unlike the latents those models train on
    from dit_bench.data.datasets import full_dataset
    from dit_bench.data.latents import manifest_shift_factor, require_diffusers

    config = json.loads((vae_dir / "config.json").read_text())
    shifted = tmp_path / "vae3"
    vae = require_diffusers("test").AutoencoderKL.from_pretrained(vae_dir)
    vae.register_to_config(shift_factor=0.25, scaling_factor=1.5)
    vae.save_pretrained(shifted)
    assert config.get("shift_factor") in (None, 0, 0.0)  # the plain VAE: manifests as before
    m = encode_latents(shifted, folder_cfg(image_folder), tmp_path / "lat", progress=False)
    plain = encode_latents(vae_dir, folder_cfg(image_folder), tmp_path / "sd", progress=False)
    assert m["shift_factor"] == manifest_shift_factor(tmp_path / "lat") == 0.25
    assert "shift_factor" not in plain and manifest_shift_factor(tmp_path / "sd") == 0.0
    img, _ = full_dataset(folder_cfg(image_folder))[3]
    mean = load_vae(shifted).encode(img[None]).latent_dist.mean[0]
    z, _ = LatentShards(tmp_path / "lat")[3]
    assert torch.allclose(z, (mean - 0.25) * 1.5, atol=1e-5)
    decoded = decode_latents(load_vae(shifted), z[None], 1.5, 0.25)
    want = load_vae(shifted).decode(mean[None]).sample.clamp(-1, 1)
    assert torch.allclose(decoded, want, atol=1e-5)


def test_latents_are_unscaled_by_the_factor_their_manifest_records(latents_root):
    """Grids and eval decode latents divided by the factor encode-latents multiplied them by:
    the one the manifest records (another VAE's, e.g. SDXL's 0.13025), else SD's 0.18215."""
    from dit_bench.data.latents import manifest_scaling_factor

    assert manifest_scaling_factor(latents_root) == 0.18215  # none recorded
    path = latents_root / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "scaling_factor": 0.13025}))
    assert manifest_scaling_factor(latents_root) == 0.13025


def test_corrupt_or_missing_shards_are_named(vae_dir, image_folder, tmp_path):
    out = tmp_path / "lat"
    m = encode_latents(vae_dir, folder_cfg(image_folder), out, shard_size=8, progress=False)
    # the last shard holds the rest (20 = 8 + 8 + 4), not items wrapped round from the start
    assert [(s["start"], s["count"]) for s in m["shards"]] == [(0, 8), (8, 8), (16, 4)]
    shard = out / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    ds = LatentShards(out)
    ds[0]  # shard 0 is fine
    with pytest.raises(DataError, match="shard-00001.safetensors is corrupt"):
        ds[8]
    shard.unlink()
    with pytest.raises(DataError, match="shard-00001.safetensors is missing"):
        LatentShards(out)[8]
    with pytest.raises(DataError, match="no manifest.json"):
        LatentShards(tmp_path)


def test_killed_encoding_resumes_to_identical_shards(vae_dir, image_folder, tmp_path):
    ref = tmp_path / "ref"
    encode_latents(vae_dir, folder_cfg(image_folder), ref, shard_size=4, progress=False)
    out = tmp_path / "cut"
    threads = str(torch.get_num_threads())  # earlier tests may have set this process's
    # the third shard's write waits: the kill lands while it does, however fast the encoding
    # (without it, how many shards the child wrote before the kill was a race)
    code = (
        "import sys, time, types\n"
        "import safetensors.torch as st\n"
        "import torch\n"
        "torch.set_num_threads(int(sys.argv[4]))  # the test's: the same float rounding\n"
        "from dit_bench.data import latents\n"
        "save, saved = st.save_file, []\n"
        "def slow_third(*a, **k):\n"
        "    if len(saved) == 2:\n"
        "        time.sleep(60)\n"
        "    save(*a, **k)\n"
        "    saved.append(1)\n"
        "st.save_file = slow_third\n"
        "cfg = types.SimpleNamespace(name='folder', root=sys.argv[2], image_size=32)\n"
        "latents.encode_latents(sys.argv[1], cfg, sys.argv[3], shard_size=4)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(vae_dir), str(image_folder), str(out), threads],
        stderr=subprocess.PIPE,  # where the shard lines go
        text=True,
    )
    for line in proc.stderr:  # kill it as soon as it reports its second shard
        if "shard-00001" in line:
            proc.kill()
            break
    proc.wait()
    partial = json.loads((out / "manifest.json").read_text())
    assert len(partial["shards"]) == 2
    with pytest.raises(DataError, match="rerun encode-latents"):
        LatentShards(out)
    encode_latents(vae_dir, folder_cfg(image_folder), out, shard_size=4, progress=False)
    a, b = LatentShards(ref), LatentShards(out)
    assert len(a) == len(b) == 20
    for i in range(20):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    with pytest.raises(DataError, match="different source or settings"):
        encode_latents(vae_dir, folder_cfg(image_folder), out, shard_size=8, progress=False)

    # a shard deleted or damaged since is encoded again, to the same bytes
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "shard-00000.safetensors").unlink()
    damaged = out / "shard-00002.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-8] + b"12345678")
    encode_latents(vae_dir, folder_cfg(image_folder), out, shard_size=4, progress=False)
    again = json.loads((out / "manifest.json").read_text())
    by_file = lambda m: {s["file"]: s["sha256"] for s in m["shards"]}  # noqa: E731
    assert by_file(again) == by_file(manifest)
    from dit_bench.data.latents import _sha256

    assert all(_sha256(out / f) == h for f, h in by_file(again).items())  # the files, too
    # another VAE (same config, other weights: SD's ft-EMA vs ft-MSE) does not continue it
    other_vae(vae_dir, tmp_path / "other-vae")
    with pytest.raises(DataError, match="written with another VAE"):
        encode_latents(tmp_path / "other-vae", folder_cfg(image_folder), out, shard_size=4,
                       progress=False)  # fmt: skip


def test_a_rerun_over_a_changed_folder_does_not_keep_the_old_images_latents(vae_dir, tmp_path):
    root = tmp_path / "images"
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (32, 32), (255 * c, 40 * i, 0)).save(root / name / f"{i}.png")
    out = tmp_path / "latents"
    encode_latents(vae_dir, folder_cfg(root), out, shard_size=4, progress=False)
    encode_latents(vae_dir, folder_cfg(root), out, shard_size=4, progress=False)  # nothing new
    # the same names, count and classes: one image redrawn, one renamed
    Image.new("RGB", (40, 32), (0, 0, 255)).save(root / "cat" / "0.png")
    with pytest.raises(DataError, match=f"images under {root} changed since"):
        encode_latents(vae_dir, folder_cfg(root), out, shard_size=4, progress=False)
    Image.new("RGB", (32, 32), (0, 0, 0)).save(root / "cat" / "0.png")
    encode_latents(vae_dir, folder_cfg(root), tmp_path / "fresh", shard_size=4, progress=False)
    (root / "dog" / "3.png").rename(root / "dog" / "9.png")
    with pytest.raises(DataError, match="changed since"):
        encode_latents(vae_dir, folder_cfg(root), tmp_path / "fresh", shard_size=4,
                       progress=False)  # fmt: skip
    import os

    # rewritten to the same size (uncompressed: the size is the pixel count's)
    img = root / "dog" / "1.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(img, compress_level=0)
    encode_latents(vae_dir, folder_cfg(root), tmp_path / "same", shard_size=4, progress=False)
    size, mtime = img.stat().st_size, img.stat().st_mtime_ns
    Image.new("RGB", (32, 32), (9, 9, 9)).save(img, compress_level=0)
    later = mtime + 10**9  # a second on: a file system that keeps whole seconds sees it too
    os.utime(img, ns=(later, later))
    assert img.stat().st_size == size
    with pytest.raises(DataError, match="changed since"):
        encode_latents(vae_dir, folder_cfg(root), tmp_path / "same", shard_size=4,
                       progress=False)  # fmt: skip
    # another version copied in with the encoded one's time (cp -p, rsync -t)
    Image.new("RGB", (32, 32), (9, 9, 9)).save(img)
    assert img.stat().st_size != size
    os.utime(img, ns=(mtime, mtime))
    with pytest.raises(DataError, match="changed since"):
        encode_latents(vae_dir, folder_cfg(root), tmp_path / "same", shard_size=4,
                       progress=False)  # fmt: skip


def test_train_on_latents_and_decode_samples(vae_dir, image_folder, tmp_path):
    from dit_bench.config import ConfigError, build_config
    from dit_bench.train.run import train

    out = tmp_path / "lat"
    encode_latents(vae_dir, folder_cfg(image_folder), out, shard_size=8, progress=False)
    cfg_sets = [
        "data.name=latents",
        f"data.root={out}",
        f"data.vae={vae_dir}",
        "data.val_fraction=0.2",
        "backbone.name=dit-xs/2",
        "train.steps=3",
        "train.batch_size=4",
        "train.log_every=1",
        "train.val_every=3",
        "eval.val_images=4",
        "eval.samples_per_class=2",
        "eval.sample_steps=3",
        # in-training FD of decoded samples against the decoded held-out latents
        "eval.fd_every=3",
        "eval.fd_samples=4",
        "eval.fd_features=shapes-net",
    ]
    cfg = build_config(None, cfg_sets)
    run = train(cfg, tmp_path / "runs", progress=False)
    grid = Image.open(run / "samples" / "step-0000003.png")
    assert grid.mode == "RGB" and grid.size[0] > 2 * 32  # decoded 32x32 images, 2 per row
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_loss"] > 0 and summary["val_FD-shapes-net"] > 0
    # `dit-bench sample` decodes on the sampling device (here the CPU) as the run's grids do
    from dit_bench.cli import main

    out = tmp_path / "grid.png"
    assert main(["sample", str(run), "--n", "2", "--steps", "2", "-o", str(out)]) == 0
    assert Image.open(out).size == (2 * 32 + 3 * 2, 32 + 2 * 2)  # two decoded 32x32 images
    with pytest.raises(ConfigError, match="eval.fd_every on latents needs data.vae"):
        build_config(None, [s for s in cfg_sets if not s.startswith("data.vae")])


def test_latent_reference_statistics_are_keyed_by_the_decoder(vae_dir, image_folder, tmp_path):
    # eval scores decoded images: statistics cached for one VAE must not serve another
    from dit_bench.config import build_config
    from dit_bench.metrics.evaluate import reference_images

    encode_latents(vae_dir, folder_cfg(image_folder), tmp_path / "lat", progress=False)
    sets = ["data.name=latents", f"data.root={tmp_path / 'lat'}", "data.val_fraction=0.2"]
    sets += ["backbone.name=dit-xs/2"]

    def key(vae):
        return reference_images(build_config(None, [*sets, f"data.vae={vae}"]))[2]

    assert key(vae_dir) == key(vae_dir)
    with pytest.warns(UserWarning, match="another decoder"):
        assert key(vae_dir) != key(other_vae(vae_dir, tmp_path / "other-vae"))


def test_latent_reference_is_decoded_a_chunk_at_a_time_as_it_was_whole(
    vae_dir, image_folder, tmp_path, monkeypatch
):
    # every held-out latent was decoded at once and held through the eval (7.9 GB of images
    # for the gpu profiles' 10,000 at 256x256): decoded a chunk at a time, the same statistics
    from dit_bench.config import build_config
    from dit_bench.data import latents
    from dit_bench.metrics.evaluate import reference_images
    from dit_bench.metrics.features import load_feature_net
    from dit_bench.metrics.reference import dataset_tensors, reference_stats

    monkeypatch.setenv("DIT_BENCH_CACHE", str(tmp_path / "cache"))
    encode_latents(vae_dir, folder_cfg(image_folder), tmp_path / "lat", progress=False)
    sets = ["data.name=latents", f"data.root={tmp_path / 'lat'}", "data.val_fraction=0.2"]
    cfg = build_config(None, [*sets, "backbone.name=dit-xs/2", f"data.vae={vae_dir}"])
    decoded, real = [], latents.decode_latents
    monkeypatch.setattr(
        latents, "decode_latents", lambda v, z, *a: decoded.append(len(z)) or real(v, z, *a)
    )
    held_out, _, data_hash = reference_images(cfg)  # decodes with the spy
    val, decode = held_out.dataset, held_out.decode
    net = load_feature_net("shapes-net", progress=False)
    chunked = reference_stats(held_out, net, data_hash=data_hash, batch_size=3, cache=False)
    assert len(val) > 3 and decoded == [3] * (len(val) // 3) + [len(val) % 3] * bool(len(val) % 3)
    whole = reference_stats(decode(dataset_tensors(val)[0]), net, data_hash=data_hash, cache=False)
    assert chunked.id == whole.id  # the VAE's batches differ: float32 rounding only
    np.testing.assert_allclose(chunked.mu, whole.mu, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(chunked.sigma, whole.sigma, rtol=1e-6, atol=1e-5)


def test_decoding_goes_in_batches_with_the_same_images(vae_dir):
    vae = load_vae(vae_dir)
    z = torch.randn(5, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    sizes = []
    decode = vae.decode
    vae.decode = lambda x: sizes.append(len(x)) or decode(x)
    batched = decode_latents(vae, z, 0.5, batch_size=2)
    assert sizes == [2, 2, 1]
    whole = decode_latents(vae, z, 0.5, batch_size=5)
    torch.testing.assert_close(batched, whole, atol=1e-5, rtol=0)  # batched products round apart
    assert batched.shape == (5, 3, 32, 32) and batched.device.type == "cpu"


def test_the_decoder_is_checked_against_the_encoder_of_the_latents(vae_dir, image_folder, tmp_path):
    from diffusers import AutoencoderKL

    from dit_bench.data.latents import load_decoder

    out = tmp_path / "lat"
    manifest = encode_latents(vae_dir, folder_cfg(image_folder), out, progress=False)
    assert manifest["vae"]["encoder_sha256"] != manifest["vae"]["sha256"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_decoder(vae_dir, out)  # the VAE that encoded them: not a word
    # SD's ft-MSE decoder for ft-EMA latents: the same encoder, a choice; said, not refused
    with pytest.warns(UserWarning, match="another decoder"):
        load_decoder(other_vae(vae_dir, tmp_path / "other-decoder"), out)
    # another encoder: another latent space
    other = AutoencoderKL.from_pretrained(vae_dir)
    with torch.no_grad():
        other.encoder.conv_in.weight.mul_(2)
    other.save_pretrained(tmp_path / "other-encoder")
    with pytest.raises(DataError, match="not the encoder of the latents"):
        load_decoder(tmp_path / "other-encoder", out)


def test_a_run_with_an_unusable_vae_is_refused_before_it_trains(vae_dir, image_folder, tmp_path):
    # data.vae decodes the grids: found missing, or another encoder, only at the first grid
    # (or the last step) it would cost the run
    from diffusers import AutoencoderKL

    from dit_bench.config import build_config
    from dit_bench.train.run import train

    out = tmp_path / "lat"
    encode_latents(vae_dir, folder_cfg(image_folder), out, shard_size=8, progress=False)
    other = AutoencoderKL.from_pretrained(vae_dir)
    with torch.no_grad():
        other.encoder.conv_in.weight.mul_(2)
    other.save_pretrained(tmp_path / "other-encoder")
    sets = ["data.name=latents", f"data.root={out}", "backbone.name=dit-xs/2", "train.steps=2"]
    runs = tmp_path / "runs"
    for vae, message in [
        (tmp_path / "nowhere", "data.vae .*nowhere: no config.json there"),
        (tmp_path / "other-encoder", "not the encoder of the latents"),
    ]:
        with pytest.raises((FileNotFoundError, DataError), match=message):
            train(build_config(None, [*sets, f"data.vae={vae}"]), runs, progress=False)
    assert not [d for d in runs.glob("*/*") if d.is_dir()]  # refused before any run dir


def test_a_second_encoding_into_one_folder_is_refused_naming_the_first(
    vae_dir, image_folder, tmp_path
):
    # Two encode-latents into one --out (a double launch, a requeued job whose old process
    # still runs) each kept its own list of shards and wrote them over the other's: twice
    # the work, and on a GPU (kernels not bit-exact) a manifest whose checksums name the
    # other process's shard files. The second is refused, naming the first; a first that
    # died (kill -9: the kernel drops its lock) blocks nothing, and the encoding resumes.
    import fcntl
    import os
    import platform

    out = tmp_path / "lat"
    out.mkdir()
    with open(out / ".encode.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write(f"pid {os.getpid()} on {platform.node()} since now\n")
        held.flush()
        with pytest.raises(DataError, match=rf"another encode-latents \(pid {os.getpid()} on "):
            encode_latents(vae_dir, folder_cfg(image_folder), out, shard_size=8, progress=False)
    assert not (out / "manifest.json").exists()
    m = encode_latents(vae_dir, folder_cfg(image_folder), out, shard_size=8, progress=False)
    assert len(m["shards"]) == 3


def test_encode_latents_progress_goes_to_stderr_and_stdout_has_one_line(
    vae_dir, image_folder, tmp_path, capsys
):
    # the shard lines went to stdout, unlike every other command's progress ([dit-bench],
    # [bench], [sweep] ... on stderr): `dit-bench encode-latents ... > log` hid them from the
    # terminal and mixed them into what a script reads
    from dit_bench.cli import main

    out = tmp_path / "lat"
    argv = ["encode-latents", "--vae", str(vae_dir), "--data", f"folder:{image_folder}"]
    argv += ["--image-size", "32", "--out", str(out), "--shard-size", "8", "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert printed.out.count("\n") == 1 and printed.out.startswith("20 latents"), printed.out
    assert printed.err.count("[encode-latents] shard-") == 3


def test_encode_latents_prints_train_settings_that_paste_with_spaces(
    image_folder, tmp_path, monkeypatch, capsys
):
    """The printed `--set` items go back into a shell: a macOS folder ("My VAE") must stay one
    argument, or the pasted data.root names a folder that does not exist."""
    import shlex

    from dit_bench.cli import main
    from dit_bench.data import latents

    made = {"num_items": 20, "latent_shape": [4, 4, 4], "shards": ["a", "b", "c"]}
    monkeypatch.setattr(latents, "encode_latents", lambda *a, **k: made)
    vae, out = tmp_path / "My VAE", tmp_path / "my latents"
    argv = ["encode-latents", "--vae", str(vae), "--data", f"folder:{image_folder}"]
    argv += ["--image-size", "32", "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0
    words = shlex.split(capsys.readouterr().out.split("train with ", 1)[1])
    assert words == ["--set", "data.name=latents", "--set", f"data.root={out}"] + [
        "--set",
        f"data.vae={vae}",
    ]


def test_an_encoding_made_before_roots_had_one_spelling_resumes(vae_dir, image_folder, tmp_path):
    # Before data.root had one spelling, `--data folder:imgs/` recorded the root as typed;
    # the same command now spells it `imgs`, and rerunning it to finish the encoding was
    # refused as "written for a different source" (the folder had to be encoded again).
    from dit_bench.cli import main

    out = tmp_path / "lat"
    typed = SimpleNamespace(**{**vars(folder_cfg(image_folder)), "root": f"{image_folder}/"})
    encode_latents(vae_dir, typed, out, shard_size=8, progress=False)  # as the old code wrote
    assert json.loads((out / "manifest.json").read_text())["source"]["root"].endswith("/")
    (out / "shard-00001.safetensors").unlink()  # interrupted, or a shard lost since
    args = ["--vae", str(vae_dir), "--data", f"folder:{image_folder}/", "--image-size", "32"]
    assert main(["encode-latents", *args, "--out", str(out), "--shard-size", "8"]) == 0
    assert (out / "shard-00001.safetensors").is_file()


def test_a_finished_encoding_in_a_read_only_folder_is_found_finished(
    vae_dir, image_folder, tmp_path, monkeypatch
):
    # A shared, read-only copy of a finished encoding: rerunning the command (a pipeline's
    # "encode, then train") checked it and wrote nothing; the lock file it now opens first
    # failed there with "Permission denied". (The folder's permissions are faked: as root,
    # as in CI containers, a chmod stops nothing.)
    import builtins
    import errno

    from dit_bench.data import latents

    out = tmp_path / "lat"
    m = encode_latents(vae_dir, folder_cfg(image_folder), out, shard_size=8, progress=False)
    (out / ".encode.lock").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def read_only(path, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(latents, "open_lock", lambda path: read_only(path, "a+"))
    again = encode_latents(vae_dir, folder_cfg(image_folder), out, shard_size=8, progress=False)
    assert again["shards"] == m["shards"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing written


def test_shards_are_as_readable_as_the_manifest(vae_dir, image_folder, tmp_path):
    """safetensors' save_file wrote each shard with mode 0600 whatever the umask: in a shared
    data folder the other users read the manifest and then failed on every shard."""
    out = tmp_path / "lat"
    encode_latents(vae_dir, folder_cfg(image_folder), out, shard_size=8, progress=False)
    mode = (out / "manifest.json").stat().st_mode
    assert {p.stat().st_mode for p in out.glob("*.safetensors")} == {mode}


@pytest.mark.parametrize("key", ["latent_shape", "class_names", "shards", "flip", "source"])
def test_a_manifest_without_a_key_is_one_line_naming_the_file_and_key(latents_root, key, capsys):
    """A hand-made or another tool's manifest without a key dit-bench reads ended `train`
    (and ablate, sample, eval) in a KeyError traceback: `KeyError: 'latent_shape'`."""
    from dit_bench.cli import main

    path = latents_root / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest[key]
    path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=f"{path}: no {key!r}"):
        data_info(latent_cfg(latents_root))
    # and one of another format, whatever its keys, is named as such
    path.write_text(json.dumps({**manifest, key: None, "format": "dit-bench-latents/2"}))
    with pytest.raises(DataError, match="not a dit-bench-latents/1 manifest"):
        data_info(latent_cfg(latents_root))
    path.write_text(json.dumps(manifest))
    argv = ["train", "--set", "data.name=latents", "--set", f"data.root={latents_root}"]
    assert main([*argv, "--out", str(latents_root / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(f"dit-bench: {path}: no {key!r}"), err
    assert "Traceback" not in err


def test_a_shard_listed_twice_or_of_another_shape_is_refused(vae_dir, image_folder, tmp_path):
    """Items are found by position (item i: shard i // shard_size): a manifest listing a shard
    twice, or a shard holding other than its count, would serve other items under those
    indices, silently."""
    from safetensors.torch import save

    from dit_bench.data.latents import _sha256

    out = tmp_path / "lat"
    encode_latents(vae_dir, folder_cfg(image_folder), out, shard_size=8, progress=False)
    path = out / "manifest.json"
    good = json.loads(path.read_text())
    twice = {**good, "shards": [*good["shards"], good["shards"][0]]}
    path.write_text(json.dumps(twice))
    with pytest.raises(DataError, match="4 of 3 shards"):
        LatentShards(out)
    # a shard rewritten with fewer items (its checksum recorded to match)
    shard = out / "shard-00001.safetensors"
    z = torch.zeros(3, 4, 4, 4)
    shard.write_bytes(save({"latents": z, "labels": torch.zeros(3, dtype=torch.long)}))
    shards = [dict(s) for s in good["shards"]]
    shards[1]["sha256"] = _sha256(shard)
    path.write_text(json.dumps({**good, "shards": shards}))
    with pytest.raises(DataError, match="shard-00001.safetensors holds"):
        LatentShards(out)[8]


def test_a_rerun_with_another_scaling_factor_does_not_continue_the_encoding(
    vae_dir, image_folder, tmp_path
):
    """The same weights with another scaling_factor in their config (SDXL's 0.13025 put right
    in a copied config): its shards and the earlier ones would be scaled differently."""
    from dit_bench.data.latents import require_diffusers

    out = tmp_path / "lat"
    encode_latents(vae_dir, folder_cfg(image_folder), out, shard_size=8, progress=False)
    (out / "shard-00001.safetensors").unlink()  # a shard left to encode
    rescaled = tmp_path / "vae-rescaled"
    vae = require_diffusers("test").AutoencoderKL.from_pretrained(vae_dir)
    vae.register_to_config(scaling_factor=0.13025)
    vae.save_pretrained(rescaled)
    with pytest.raises(DataError, match="different source or settings"):
        encode_latents(rescaled, folder_cfg(image_folder), out, shard_size=8, progress=False)
