"""The data pipeline's numbers pinned where a one-line slip survived the other tests (mutation
testing of dit_bench/data): which images are held out and in what order, which latents train
together, what the shapes look like, and which batch a seed draws at each epoch.

Expectations are worked out here from the documented rule (the split is the first
round(val_fraction * n) of a seeded permutation, a shape's pixel is its coverage at the pixel
centre, ...), not read back from the code under test.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from test_data import make_cfg

from dit_bench.data import load_datasets
from dit_bench.data.datasets import batch_indices, center_crop_resize, split_indices
from dit_bench.data.shapes import SHAPE_CLASSES, ShapesDataset, render, sample_params

# Tiny models run in-process outside train() (which sets train.threads): on one thread, as
# train() runs them; on two shared cores OpenMP's barriers cost more than the second thread
# saves (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")

# --------------------------------------------------------------------------------------------
# The train/val split
# --------------------------------------------------------------------------------------------


def test_the_held_out_count_is_val_fraction_times_n_rounded_not_truncated():
    # 0.3 of 9 is 2.7: three held out (int() would hold out two)
    train, val = split_indices(9, 0.3, 0)
    assert (len(train), len(val)) == (6, 3)


@pytest.mark.parametrize("seed", [0, 7])
def test_the_split_by_position_is_numpys_permutation_of_the_split_seed(seed):
    # The documented order: val is the head of default_rng(split_seed).permutation(n), in that
    # order (the fixed validation set takes its first eval.val_images), train the rest. Any
    # other seed rule gives every existing run another split than it recorded.
    order = np.random.default_rng(seed).permutation(50).tolist()
    assert split_indices(50, 0.2, seed) == (order[10:], order[:10])


def test_the_split_by_name_ranks_by_the_hash_of_seed_and_name_and_follows_the_seed():
    keys = [f"c/{i:03d}.png" for i in range(40)]

    def expected(seed: int) -> list[int]:
        rank = {k: hashlib.sha256(f"{seed}\0{k}".encode()).digest() for k in keys}
        return sorted(range(40), key=lambda i: rank[keys[i]])

    for seed in (0, 3):
        order = expected(seed)
        assert split_indices(40, 0.25, seed, keys) == (order[10:], order[:10])
    # data.split_seed must reshuffle a split by name as it does one by position
    assert split_indices(40, 0.25, 0, keys)[1] != split_indices(40, 0.25, 3, keys)[1]


def flipped_latents(root, n: int) -> None:
    """A manifest of `n` images encoded with --flip (2n items), as encode-latents writes it;
    the split reads no shard, so none is written."""
    manifest = {
        "format": "dit-bench-latents/1",
        "source": {"name": "folder", "root": None},
        "num_images": n,
        "flip": True,
        "num_items": 2 * n,
        "class_names": ["a"],
        "shard_size": 2 * n,
        "latent_shape": [4, 2, 2],
        "shards": [{"file": "shard-00000.safetensors", "start": 0, "count": 2 * n, "sha256": ""}],
    }
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_flipped_latents_train_each_train_image_with_its_mirror_and_hold_out_originals(tmp_path):
    flipped_latents(tmp_path, 10)
    train, val = load_datasets(make_cfg("latents", root=str(tmp_path), val_fraction=0.2))
    sources, held_out = split_indices(10, 0.2, 0)
    assert val.indices == held_out  # originals only: a mirror is no new validation image
    # item n + i is image i flipped (DiT's augmentation): each train image, then its mirror
    assert train.indices == [j for i in sources for j in (i, i + 10)]


# --------------------------------------------------------------------------------------------
# Folder images: the crop
# --------------------------------------------------------------------------------------------


def test_an_odd_crop_margin_leaves_the_extra_pixel_on_the_right_and_bottom():
    from PIL import Image

    # An odd margin of 3 pixels (no resize: the shorter side is the size) leaves
    # floor(3 / 2) = 1 before the crop and 2 after, as DiT's and ADM's center_crop_arr
    columns = np.tile(np.arange(14, dtype=np.uint8)[None, :, None], (11, 1, 3))
    cropped = np.asarray(center_crop_resize(Image.fromarray(columns), 11))
    assert cropped[0, :, 0].tolist() == list(range(1, 12))
    rows = np.tile(np.arange(15, dtype=np.uint8)[:, None, None], (1, 12, 3))
    cropped = np.asarray(center_crop_resize(Image.fromarray(rows), 12))
    assert cropped[:, 0, 0].tolist() == list(range(1, 13))


# --------------------------------------------------------------------------------------------
# shapes
# --------------------------------------------------------------------------------------------


def test_shape_parameters_come_from_a_generator_seeded_by_seed_then_index():
    # The data seed and the index, in this order: `shapes` is one data set across versions
    for index in (0, 13):
        rng = np.random.default_rng((0, index))
        scale = rng.uniform(0.45, 0.8)
        assert sample_params(index).scale == scale
        assert sample_params(index).center == tuple(rng.uniform(scale - 1.0, 1.0 - scale, 2))


def test_a_circle_covers_each_pixel_by_its_centres_distance_over_one_pixel_ramp():
    # Circles (label 0) do not rotate: coverage worked out from the pixel centres, y up, and
    # the edge ramp one pixel wide (half a pixel either side of the boundary)
    size = 32
    for index in (0, 10, 20):
        p = sample_params(index)
        assert SHAPE_CLASSES[p.label] == "circle"
        centres = (np.arange(size) + 0.5) * 2 / size - 1
        x, y = centres[None, :], -centres[:, None]  # row 0 is the top
        distance = np.hypot(x - p.center[0], y - p.center[1]) - 0.9 * p.scale
        alpha = np.clip(0.5 - distance * size / 2, 0, 1)
        fg, bg = np.array(p.foreground)[:, None, None], np.array(p.background)[:, None, None]
        expected = np.rint((bg + (fg - bg) * alpha) * 255)
        assert np.abs(render(p, size).astype(float) - expected).max() <= 1  # float rounding


def test_every_shape_stands_out_from_its_background():
    for index in range(200):
        p = sample_params(index)
        assert np.linalg.norm(np.subtract(p.foreground, p.background)) >= 0.5, index


def test_shape_items_are_their_8_bit_pixels_over_127_5_minus_one():
    data = ShapesDataset(12, 16)
    for index in range(12):
        pixels = torch.from_numpy(render(sample_params(index), 16)).double()
        torch.testing.assert_close(data[index][0].double(), pixels / 127.5 - 1, rtol=0, atol=1e-6)
    assert ShapesDataset(1, 4)[0][0].dtype == torch.float32


# --------------------------------------------------------------------------------------------
# The batch order
# --------------------------------------------------------------------------------------------


def test_no_two_seeds_share_an_epochs_batch_order():
    # Seeds 0..4 are an ablation's error bars: seed s at epoch e must not replay the order of
    # seed s + 1 at epoch e - 1 (a seed rule like seed + epoch), or the "independent" runs
    # see the same batches one epoch apart
    n = 30
    orders = {
        (seed, epoch): tuple(batch_indices(epoch, n, n, seed, {}))
        for seed in range(5)
        for epoch in range(5)
    }
    assert len(set(orders.values())) == len(orders)


# --------------------------------------------------------------------------------------------
# Labels of samples, and the pixels written for the metrics
# --------------------------------------------------------------------------------------------


def test_cli_sample_without_labels_draws_every_class_in_turn(tmp_path, monkeypatch, capsys):
    from test_eval import _saved_run

    from dit_bench.cli import main
    from dit_bench.metrics import evaluate

    seen = []
    real = evaluate.generate

    def spy(module, indices, *, labels, **kw):
        seen.append(labels.tolist())
        return real(module, indices, labels=labels, **kw)

    monkeypatch.setattr(evaluate, "generate", spy)
    run = _saved_run(tmp_path, 12)  # digits: 10 classes
    assert main(["sample", str(run), "--n", "12", "--steps", "2"]) == 0
    assert seen == [[i % 10 for i in range(12)]]  # the last class too (9, not 0 again)


def test_save_pngs_writes_each_image_row_major_as_its_8_bit_levels(tmp_path):
    from PIL import Image

    from dit_bench.metrics.engines import save_pngs

    levels = torch.arange(2 * 3 * 4 * 4).reshape(2, 3, 4, 4) % 256  # no two pixels alike
    save_pngs(levels / 127.5 - 1, tmp_path)
    for i in range(2):
        written = np.asarray(Image.open(tmp_path / f"{i:06d}.png"))  # (H, W, 3)
        assert (written == levels[i].permute(1, 2, 0).numpy()).all()


def test_latent_samples_decode_with_their_manifests_scale_and_shift(tmp_path, monkeypatch):
    # SD3's and FLUX's VAEs centre their latents: grids and FD decode with the shift added back
    from types import SimpleNamespace

    from dit_bench.data import latents
    from dit_bench.train import run

    flipped_latents(tmp_path, 1)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest |= {"scaling_factor": 1.5, "shift_factor": 0.25}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    stub = SimpleNamespace(to=lambda device: stub)
    monkeypatch.setattr(run, "_load_decoder", lambda path, root: stub)
    seen = []
    monkeypatch.setattr(latents, "decode_latents", lambda vae, z, *factors: seen.append(factors))
    cfg = SimpleNamespace(data=SimpleNamespace(name="latents", vae="vae", root=str(tmp_path)))
    run.to_images(cfg, torch.zeros(1, 4, 2, 2))
    assert seen == [(1.5, 0.25)]
