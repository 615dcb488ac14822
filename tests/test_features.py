"""Feature networks, the cache, reference statistics, and the FD through clean-fid / torchmetrics.

Uses digits-net (8x8 inputs: trains in seconds): the shipped weights, or trained into a
temporary cache folder where the shipped ones are hidden.
"""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dit_bench.config import DataConfig
from dit_bench.data import load_datasets
from dit_bench.metrics import engines
from dit_bench.metrics.distances import fd_from_features, frechet_distance, gaussian_stats
from dit_bench.metrics.features import (
    INCEPTION_ENV,
    INCEPTION_FILE,
    FeatureWeightsError,
    default_features,
    find_inception,
    load_feature_net,
    quantize,
    sha256_file,
    shipped_net_path,
    small_net_path,
)
from dit_bench.metrics.reference import HeldOutImages, dataset_tensors, reference_stats

# Tiny models run in-process outside train() (which sets train.threads): on one thread, as
# train() runs them; on two shared cores OpenMP's barriers cost more than the second thread
# saves (conftest's one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("cache")
        mp.setenv("DIT_BENCH_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def net(cache):
    return load_feature_net("digits-net", progress=False)


@pytest.fixture(scope="module")
def digits():
    _, val = load_datasets(DataConfig(name="digits"))
    return dataset_tensors(val)


def test_small_nets_are_shipped_and_score_as_recorded(cache):
    """The weights every machine scores FD-<net> with: each shipped file is the one its report
    names (sha256), classifies the held-out split as recorded, and is read in place (nothing
    trained or cached)."""
    for name in ("mnist-net", "digits-net", "shapes-net"):
        path = shipped_net_path(name)
        report = json.loads(path.with_suffix(".json").read_text())
        assert report["sha256"] == sha256_file(path), name
        fnet = load_feature_net(name, progress=False)
        assert fnet.file == str(path) and fnet.sha256 == report["sha256"]
        assert fnet.metric_prefix == f"FD-{name}" and "FID" not in fnet.metric_prefix
        spec = fnet.spec
        _, val = load_datasets(DataConfig(name=spec.data, image_size=spec.size))
        x, y = dataset_tensors(val)
        acc = float((fnet.features(x)[1].argmax(1) == y.numpy()).mean())
        # the same images and weights; only the last bits of the forward may differ by CPU
        assert abs(acc - report["accuracy"]) <= 2 / len(y), (name, acc, report["accuracy"])
        assert report["accuracy"] > 0.95
    assert not (cache / "features").exists()


@pytest.fixture
def unshipped(tmp_path, monkeypatch):
    """No shipped weights: the small nets come from the (temporary) cache, trained there."""
    import dit_bench.metrics.features as features_mod

    monkeypatch.setattr(features_mod, "SHIPPED_NETS", tmp_path / "nothing-shipped")
    monkeypatch.setenv("DIT_BENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_an_unshipped_net_is_trained_cached_and_retrained_identically(unshipped):
    # trained on one thread, from inside a training run too (the in-training FD): the run's
    # own thread count must come back, or it trains on at one core
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        net = load_feature_net("digits-net", progress=False)
        assert torch.get_num_threads() == threads + 1
    finally:
        torch.set_num_threads(threads)
    path = small_net_path("digits-net")
    assert net.file == str(path) and path.parent == unshipped / "features"
    assert net.info["accuracy"] > 0.9
    mtime = path.stat().st_mtime_ns
    again = load_feature_net("digits-net", progress=False)  # from the cache, not retrained
    assert again.sha256 == net.sha256 and path.stat().st_mtime_ns == mtime
    path.unlink()
    again = load_feature_net("digits-net", progress=False)
    assert path.is_file()
    assert again.sha256 == net.sha256  # deterministic recipe: same weights, bit for bit


def test_damaged_cache_files_are_made_again(unshipped, digits):
    net = load_feature_net("digits-net", progress=False)
    path = small_net_path("digits-net")
    path.write_bytes(path.read_bytes()[:100])  # a half-copied cache
    again = load_feature_net("digits-net", progress=False)
    assert again.sha256 == net.sha256
    x = digits[0][:100]
    a = reference_stats(x, net)
    stats = unshipped / "refstats" / f"{a.id}.npz"
    stats.write_bytes(stats.read_bytes()[:100])
    b = reference_stats(x, net)
    assert not b.meta["cached"] and np.array_equal(a.mu, b.mu)
    assert reference_stats(x, net).meta["cached"]  # and written whole again


def test_a_damaged_shipped_net_is_named_not_retrained(tmp_path, monkeypatch):
    """Retrained, a shipped net would score with this machine's weights, not everyone's."""
    import shutil

    import dit_bench.metrics.features as features_mod

    shipped = shipped_net_path("digits-net")
    monkeypatch.setattr(features_mod, "SHIPPED_NETS", tmp_path)
    monkeypatch.setenv("DIT_BENCH_CACHE", str(tmp_path / "cache"))
    copy_ = shutil.copy(shipped, tmp_path / shipped.name)
    shutil.copy(shipped.with_suffix(".json"), tmp_path / shipped.with_suffix(".json").name)
    with open(copy_, "r+b") as f:
        f.truncate(100)
    with pytest.raises(FeatureWeightsError, match="shipped with dit-bench.*reinstall"):
        load_feature_net("digits-net", progress=False)
    assert not (tmp_path / "cache").exists()


def test_a_file_that_is_not_the_inception_net_is_named(tmp_path):
    fake = tmp_path / INCEPTION_FILE
    fake.write_bytes(b"<html>partial download</html>")
    with pytest.raises(ValueError, match=f"{fake} is not clean-fid's TorchScript Inception"):
        load_feature_net("inception", inception_path=fake)


def test_fd_with_itself_zero_and_monotone_under_blur_and_noise(net, digits):
    x, _ = digits
    ref, _ = net.features(x)
    assert fd_from_features(ref, ref) < 1e-6
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    noised = [
        fd_from_features(ref, net.features((x + s * noise).clamp(-1, 1))[0])
        for s in (0.1, 0.3, 0.6, 1.0)
    ]
    assert all(a < b for a, b in zip(noised, noised[1:], strict=False)), noised

    def blur(img, sigma):
        r = torch.arange(-3, 4, dtype=torch.float32)
        k = torch.exp(-(r**2) / (2 * sigma**2))
        k = (k / k.sum()).view(1, 1, 1, -1)
        img = F.conv2d(F.pad(img, (3, 3, 0, 0), mode="replicate"), k)
        return F.conv2d(F.pad(img, (0, 0, 3, 3), mode="replicate"), k.transpose(-1, -2))

    blurred = [fd_from_features(ref, net.features(blur(x, s))[0]) for s in (0.3, 0.6, 1.0, 2.0)]
    assert all(a < b for a, b in zip(blurred, blurred[1:], strict=False)), blurred


def test_reference_stats_cached_by_content(net, digits, cache):
    x, _ = digits
    a = reference_stats(x, net)
    b = reference_stats(x.clone(), net)  # same content, another tensor: cache hit
    assert a.id == b.id and not a.meta["cached"] and b.meta["cached"]
    assert (cache / "refstats" / f"{a.id}.npz").is_file()
    np.testing.assert_allclose(b.mu, a.mu)
    c = reference_stats(x[:-1], net)  # other content: other id
    assert c.id != a.id
    # other weights under the same name (a retrained small net, another Inception file): the
    # cached features of the old weights must not be reused
    other = copy.copy(net)
    other.sha256 = "0" * 64
    d = reference_stats(x, other)
    assert d.id != a.id and not d.meta["cached"]
    # cache=False computes afresh even when the entry exists
    assert not reference_stats(x, net, cache=False).meta["cached"]


def test_reference_stats_of_a_data_set_read_in_chunks_are_those_of_its_whole_tensor(
    net, tmp_path, monkeypatch, one_chunk_at_a_time
):
    # the held-out images were one float32 tensor through the eval (7.9 GB for the gpu
    # profiles' 10,000 256x256 images): read a chunk at a time, the same id and statistics
    monkeypatch.setenv("DIT_BENCH_CACHE", str(tmp_path))  # none cached by the tests before
    _, val = load_datasets(DataConfig(name="digits"))
    x, _ = dataset_tensors(val)
    whole = reference_stats(x, net, batch_size=16, cache=False)
    seen = one_chunk_at_a_time(net, "features")
    chunked = reference_stats(HeldOutImages(val), net, batch_size=16)
    assert not chunked.meta["cached"] and max(seen) == 16 and sum(seen) == len(x) == 180
    assert chunked.id == whole.id and chunked.meta["content_sha256"] == whole.meta["content_sha256"]
    for a, b in ((chunked.features, whole.features), (chunked.mu, whole.mu)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(chunked.sigma, whole.sigma)
    seen.clear()
    cached = reference_stats(HeldOutImages(val), net, batch_size=16)
    assert cached.meta["cached"] and not seen  # hashed a chunk at a time, no features
    np.testing.assert_array_equal(cached.sigma, whole.sigma)


def test_reference_hash_reads_the_held_out_images_batch_size_at_a_time(net, tmp_path, monkeypatch):
    # the hash read a fixed 256 images a chunk whatever the batch size: 3.3 GiB at its peak
    # for 512x512 images under eval --batch-size 16, where the features took 16 at a time
    from dit_bench.metrics import reference

    monkeypatch.setenv("DIT_BENCH_CACHE", str(tmp_path))
    _, val = load_datasets(DataConfig(name="digits"))
    whole = reference_stats(dataset_tensors(val)[0], net, cache=False)
    read, stack_items = [], reference.stack_items
    monkeypatch.setattr(
        reference, "stack_items", lambda d, idx: read.append(len(idx)) or stack_items(d, idx)
    )
    chunked = reference_stats(HeldOutImages(val), net, batch_size=16)
    assert max(read) == 16 and sum(read) == 2 * len(val)  # the hash, then the features
    assert chunked.meta["content_sha256"] == whole.meta["content_sha256"]


def test_held_out_images_changed_between_hash_and_features_are_not_cached(
    net, tmp_path, monkeypatch, capsys
):
    # a miss reads the images twice (their hash, then their features): a folder rewritten in
    # between (a sync still running) cached the features of other images under the first's id
    from dit_bench.metrics import reference

    monkeypatch.setenv("DIT_BENCH_CACHE", str(tmp_path))
    _, val = load_datasets(DataConfig(name="digits"))
    reads = []

    class Rewritten(torch.utils.data.Dataset):
        def __len__(self):
            return len(val)

        def __getitem__(self, i):
            reads.append(i)
            x, y = val[i]
            return (-x if len(reads) > 1 + len(val) else x), y  # others in the features pass

    stats = reference_stats(HeldOutImages(Rewritten()), net, batch_size=16)
    assert len(reads) == 2 * len(val) + 1  # the shape's first item, the hash, the features
    assert "changed while they were read" in capsys.readouterr().err
    assert not list((tmp_path / "refstats").glob("*.npz"))  # nothing under the first's id
    assert stats.meta["content_sha256"] == reference.content_hash(dataset_tensors(val)[0])
    stats = reference_stats(HeldOutImages(val), net, batch_size=16)  # unchanged: cached
    assert not stats.meta["cached"] and "changed" not in capsys.readouterr().err
    assert list((tmp_path / "refstats").glob(f"{stats.id}.npz"))


def test_reference_stats_are_keyed_by_all_that_makes_the_features(net, digits, cache):
    """A cache id shared by two inputs serves one's statistics for the other: every FD
    against them is then silently wrong."""
    x = digits[0][:60]
    a = reference_stats(x, net)
    # the same shape, other 8-bit pixels (none at -1 or 1: they differ only once quantised)
    assert reference_stats(x * 0.5, net).id != reference_stats(x * 0.4, net).id
    # the same pixels in another shape are other images
    assert reference_stats(x.reshape(len(x), 1, 16, 4), net).id != a.id
    # the same weights reached by another input path
    other = copy.copy(net)
    other.resize = f"{net.resize}, then something else"
    assert reference_stats(x, other).id != a.id
    # a latents data set's own hash (of its latents and decoder) keys it, not the decoded pixels
    b = reference_stats(x, net, data_hash="latents-and-decoder")
    assert b.id != a.id and b.meta["content_sha256"] == "latents-and-decoder"


def test_an_empty_reference_stats_file_is_made_again(net, digits, cache, capsys):
    """A cached statistics file left empty (a power cut after its rename reached the disk, a
    copy cut short) is computed again: np.load raises EOFError for it, which stopped every
    FD of that data set with a traceback until the file was found and deleted by hand."""
    x = digits[0][:60]
    a = reference_stats(x, net)
    path = cache / "refstats" / f"{a.id}.npz"
    path.write_bytes(b"")
    b = reference_stats(x, net)
    assert not b.meta["cached"] and np.array_equal(a.mu, b.mu)
    assert str(path) in capsys.readouterr().err
    assert reference_stats(x, net).meta["cached"]  # and written whole again


def test_reference_stats_without_a_writable_cache(net, digits, tmp_path, monkeypatch, capsys):
    """A home the user cannot write (`docker run --user`: HOME=/) must not fail the FD: the
    in-training FD stopped every such run after its training, and again on each resume."""
    x, _ = digits
    blocker = tmp_path / "file"
    blocker.write_text("")  # a folder below a file cannot be made, not even by root
    monkeypatch.setenv("DIT_BENCH_CACHE", str(blocker / "cache"))
    stats = reference_stats(x, net)
    assert not stats.meta["cached"] and stats.mu.shape == (net.dim,)
    assert "DIT_BENCH_CACHE" in capsys.readouterr().err


def test_small_nets_see_inputs_as_their_own_size_channels_and_8_bit_range(net, digits, cache):
    """Scored images need not be a net's own kind (a folder or latents run scored by a small
    net): they reach it as 8-bit pixels at its side, RGB averaged to grey and grey repeated."""
    x = digits[0][:60]
    feats = net.features(x)[0]
    # beyond [-1, 1] is what a PNG of it holds: saturated
    np.testing.assert_array_equal(net.features(x * 3)[0], net.features((x * 3).clamp(-1, 1))[0])
    # another side: resized to the net's, as its `resize` records (quantised, then resized)
    big = F.interpolate(x, scale_factor=2, mode="nearest")
    small = F.interpolate(quantize(big), size=(8, 8), mode="bilinear", antialias=True)
    with torch.no_grad():
        want = net.net(small / 127.5 - 1)[0].double().numpy()
    np.testing.assert_allclose(net.features(big)[0], want, atol=1e-4)
    assert not np.allclose(want, feats, atol=1e-2)  # not the net's own-size images either
    # RGB: the mean of the channels, whatever their order
    rgb = torch.cat([x, -torch.ones_like(x), x.flip(-1)], 1)
    np.testing.assert_allclose(net.features(rgb)[0], net.features(rgb.roll(1, 1))[0], atol=1e-4)
    assert not np.allclose(net.features(rgb)[0], net.features(rgb[:, :1])[0], atol=1e-4)
    shapes_net = load_feature_net("shapes-net", progress=False)
    grey = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    np.testing.assert_array_equal(
        shapes_net.features(grey)[0], shapes_net.features(grey.repeat(1, 3, 1, 1))[0]
    )


# clean-fid's own sqrtm warns on the rank-deficient covariance of ReLU features; it still agrees
@pytest.mark.filterwarnings("ignore:Matrix is singular", "ignore:The `disp` argument")
def test_clean_fid_torchmetrics_and_ours_agree(net, digits, tmp_path):
    x, _ = digits
    g = torch.Generator().manual_seed(1)
    fake = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    ours = fd_from_features(net.features(x)[0], net.features(fake)[0])
    tm = engines.fd_torchmetrics(x, fake, net)
    a, b = engines.save_pngs(x, tmp_path / "real"), engines.save_pngs(fake, tmp_path / "fake")
    cf = engines.fd_folders(a, b, net)
    assert ours > 1.0
    assert tm == pytest.approx(ours, rel=1e-3)
    assert cf == pytest.approx(ours, rel=1e-3)
    # folder vs cached statistics (clean-fid reads the folder, the reference comes from memory)
    ref = reference_stats(x, net)
    assert engines.fd_folder_stats(b, ref, net) == pytest.approx(ours, rel=1e-3)
    assert (
        frechet_distance(*gaussian_stats(engines.folder_features(a, net)), ref.mu, ref.sigma) < 1e-3
    )


def test_missing_inception_is_one_clear_error(tmp_path, monkeypatch, cache):
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    if (__import__("pathlib").Path("/tmp") / INCEPTION_FILE).exists():
        pytest.skip("an Inception file is installed at clean-fid's location on this machine")
    with pytest.raises(FeatureWeightsError) as err:
        load_feature_net("inception")
    msg = str(err.value)
    assert INCEPTION_FILE in msg and str(cache / INCEPTION_FILE) in msg
    assert "--inception" in msg and INCEPTION_ENV in msg and "never downloads" in msg
    with pytest.raises(FeatureWeightsError, match="nowhere.pt"):
        find_inception(tmp_path / "nowhere.pt")


def _owned_by(uid: int):
    """Path.stat, with every file owned by `uid` (a chown needs root)."""
    import os
    from pathlib import Path

    real = Path.stat

    def stat(self, **kwargs):
        st = real(self, **kwargs)
        return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, uid, *st[5:]))

    return stat


def test_an_inception_file_another_user_put_in_tmp_is_never_loaded(tmp_path, monkeypatch, cache):
    # /tmp is clean-fid's place and every user's to write: a TorchScript file planted there
    # ran in the eval of whoever came next, with their rights (torch.from_file(path, True)
    # overwrites any file they can write), before their own copy in the cache folder
    from dit_bench.metrics import features

    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    shared = tmp_path / "tmp" / INCEPTION_FILE
    shared.parent.mkdir()
    shared.write_bytes(b"planted")
    shared.chmod(0o664)
    monkeypatch.setattr(features, "SHARED_INCEPTION", shared)
    assert find_inception() == shared  # this user's own file
    own = cache / INCEPTION_FILE
    own.write_bytes(b"mine")
    try:
        with monkeypatch.context() as m:
            m.setattr(features.os, "getuid", lambda: 4242)
            m.setattr(features.Path, "stat", _owned_by(4243))
            assert find_inception() == own
            m.setattr(features.Path, "stat", _owned_by(0))  # an administrator's copy
            assert find_inception() == shared
        shared.chmod(0o666)  # theirs to rewrite
        assert find_inception() == own
        own.unlink()
        with pytest.raises(FeatureWeightsError, match="writable by every user"):
            find_inception()
        assert find_inception(shared) == shared  # named by the user: their choice
    finally:
        own.unlink(missing_ok=True)


def test_a_link_another_user_put_in_tmp_is_never_followed_to_an_inception_file(
    tmp_path, monkeypatch, cache
):
    # /tmp/inception-2015-12-05.pt -> a file of the user's own: the ownership check followed
    # the link and passed, and its owner could point it at a file of theirs before the load
    # (macOS's /tmp follows any link; Linux's only with fs.protected_symlinks off)
    import os

    from dit_bench.metrics import features

    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    target = tmp_path / "mine.pt"
    target.write_bytes(b"mine")
    shared = tmp_path / "tmp" / INCEPTION_FILE
    shared.parent.mkdir()
    shared.symlink_to(target)
    monkeypatch.setattr(features, "SHARED_INCEPTION", shared)
    real = features.Path.stat

    def stat(self, *, follow_symlinks=True):  # the link theirs, what it names the user's
        st = real(self, follow_symlinks=follow_symlinks)
        uid = 4242 if follow_symlinks or not os.path.islink(self) else 4243
        return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, uid, *st[5:]))

    monkeypatch.setattr(features.os, "getuid", lambda: 4242)
    monkeypatch.setattr(features.Path, "stat", stat)
    with pytest.raises(FeatureWeightsError, match="owned by another user"):
        find_inception()


def test_an_inception_file_in_tmp_named_by_the_environment_is_the_user_s_choice(
    tmp_path, monkeypatch, cache
):
    # $DIT_BENCH_INCEPTION=/tmp/inception-2015-12-05.pt (clean-fid's own place, where a
    # colleague's download lies) names the file as --inception does; it was skipped as the
    # shared default is, and eval said it found no Inception file
    from dit_bench.metrics import features

    shared = tmp_path / "tmp" / INCEPTION_FILE
    shared.parent.mkdir()
    shared.write_bytes(b"a colleague's")
    monkeypatch.setattr(features, "SHARED_INCEPTION", shared)
    monkeypatch.setenv(INCEPTION_ENV, str(shared))
    monkeypatch.setattr(features.os, "getuid", lambda: 4242)
    monkeypatch.setattr(features.Path, "stat", _owned_by(4243))
    assert find_inception() == shared
    monkeypatch.setenv(INCEPTION_ENV, str(tmp_path / "missing.pt"))
    with pytest.raises(FeatureWeightsError, match="owned by another user"):
        find_inception()  # another file named: the shared default after it is still skipped
    monkeypatch.delenv(INCEPTION_ENV)
    with pytest.raises(FeatureWeightsError, match="owned by another user"):
        find_inception()  # not named: the shared default, skipped


def test_loading_a_feature_net_leaves_the_callers_random_numbers_alone(cache):
    # its initial weights, replaced by the file's, were drawn from the caller's generator (so
    # an eval moved a notebook's seeded numbers)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    load_feature_net("digits-net", progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_feature_names():
    assert default_features("mnist") == "mnist-net"
    assert default_features("digits") == "digits-net"
    assert default_features("shapes") == "shapes-net"
    assert default_features("folder") == "inception"
    with pytest.raises(ValueError, match="known: inception, mnist-net"):
        load_feature_net("mnist")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mnist-net", "shapes-net"])
def test_bigger_small_nets_classify_held_out_data(name, cache):
    net = load_feature_net(name, progress=False)  # trains it (about 30 s each on a CPU)
    assert net.info["accuracy"] > 0.95
    assert net.metric_prefix == f"FD-{name}"
