"""Shared test fixtures."""

import atexit
import contextlib
import json
import os
import resource
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image

# The collector pass `train` makes after each run (0.3 s with torch and Lightning loaded) would
# cost the suite's hundreds of tiny runs minutes; the test of that pass turns it back on. Set
# here, so the CLI's subprocesses inherit it too.
os.environ.setdefault("DIT_BENCH_GC_AFTER_RUN", "0")
# The reference statistics and feature nets the tests make went to the user's cache
# (~/.cache/dit-bench, or the folder a developer set for their own runs) and stayed there: a
# folder of the session instead, its subprocesses' too.
os.environ["DIT_BENCH_CACHE"] = tempfile.mkdtemp(prefix="dit-bench-tests-cache-")
atexit.register(shutil.rmtree, os.environ["DIT_BENCH_CACHE"], ignore_errors=True)
# A suite started as a script's background job (`pytest ... &`: the shell starts it with SIGINT
# ignored) failed its Ctrl-C tests: Python leaves an ignored SIGINT ignored, so no
# KeyboardInterrupt came, and the commands they start inherited it. They stand for a terminal's
# foreground job, which has Python's own handler.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def one_chunk_at_a_time(monkeypatch):
    """`spy(owner, name, held="argument")` wraps `owner.name` so that a call fails while an
    earlier call's images are still alive (its first argument's, or with held="result" what it
    returned: bounded memory, a chunk of images at a time); returns their lengths, a list
    that grows call by call."""
    import weakref

    def spy(owner, name: str, held: str = "argument") -> list[int]:
        real, alive, sizes = getattr(owner, name), [], []

        def call(*args, **kwargs):
            assert not [r for r in alive if r() is not None], "an earlier chunk is still held"
            out = real(*args, **kwargs)
            images = out if held == "result" else args[0]
            alive.append(weakref.ref(images))
            sizes.append(len(images))
            return out

        monkeypatch.setattr(owner, name, call)
        return sizes

    return spy


@pytest.fixture
def unguarded_script(tmp_path):
    """`run(code)` runs `code` as a script at its top level, without the `if __name__ ==
    "__main__":` guard (each spawned worker imports it again); it must exit 1: its last line of
    stderr."""
    import subprocess
    import sys

    def run(code: str) -> str:
        script = tmp_path / "unguarded.py"
        script.write_text(code)
        done = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 1, done.stderr[-3000:]
        return done.stderr.strip().splitlines()[-1]

    return run


@pytest.fixture
def latents_root(tmp_path):
    """An empty latent data set: a manifest as `encode-latents` writes it (ImageNet-256 shape,
    1000 classes), enough for configs that name `data.name: latents` to validate."""
    manifest = {
        "format": "dit-bench-latents/1",
        "num_items": 0,
        "num_images": 0,
        "flip": False,
        "source": {"name": "folder", "root": None},
        "shard_size": 1,
        "latent_shape": [4, 32, 32],
        "class_names": [str(i) for i in range(1000)],
        "shards": [],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


@pytest.fixture
def render_gpu_section():
    """`render(name, result)`: the GPU check's Markdown report holding that one section."""
    from dit_bench import gpu_check

    def render(name: str, result: dict) -> str:
        report = {"started": "-", "command": "-", "elapsed_s": 1.0, "budget_s": 1.0}
        report |= {"smoke": True, "sections": {name: {"status": "ok", "result": result}}}
        return gpu_check.render_markdown(report)

    return render


@pytest.fixture
def one_thread():
    """Run a test on one torch thread, then restore the count. Tiny models and samplers take
    hundreds of small elementwise steps: on shared cores OpenMP barriers cost far more than a
    second thread saves (measured 1 s vs 12 s for 250 sampling steps)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory):
    """A tiny random diffusers AutoencoderKL saved to a folder, as a user's local VAE."""
    from dit_bench.data.latents import require_diffusers

    torch.manual_seed(0)
    vae = require_diffusers("vae_dir").AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # 3 downsamplings: side / 8, as SD's VAE
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """20 RGB images (40x48) in class folders cat/ and dog/, each class with its own colour."""
    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir()
        for i in range(10):
            arr = (torch.rand(40, 48, 3, generator=g) * 255).byte().numpy()
            arr[..., c] = 255  # a class-dependent colour
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def file_size_limit():
    """`limit(n)`: a block in which writing a file past n bytes fails with EFBIG, as writing
    on a full disk fails with ENOSPC (RLIMIT_FSIZE; its SIGXFSZ, which would kill the tests,
    ignored). Hard limit and handler restored after it."""

    @contextlib.contextmanager
    def limit(n: int):
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, handler)

    return limit


@pytest.fixture
def tick_label_overlaps(monkeypatch):
    """Per figure saved (by file name), the pairs of neighbouring tick labels it shows inside
    its axes' views whose text overlaps as drawn; nothing is written."""
    import matplotlib.figure

    found: dict[str, list] = {}

    def spy(fig, path, *args, **kwargs):
        found[Path(path).name] = overlapping_tick_labels(fig)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    return found


def overlapping_tick_labels(fig) -> list[tuple[str, str]]:
    """Pairs of neighbouring tick labels, shown inside the axes' view, whose text overlaps as
    drawn (major and minor ticks: a log axis labels some of its minor ones)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    pairs = []
    for ax in fig.axes:
        for axis, side in ((ax.xaxis, 0), (ax.yaxis, 1)):
            lo, hi = sorted(axis.get_view_interval())
            shown = [
                t.label1
                for t in axis.get_major_ticks() + axis.get_minor_ticks()
                if lo <= t.get_loc() <= hi and t.label1.get_visible() and t.label1.get_text()
            ]
            boxes = sorted(
                (tuple(t.get_window_extent(renderer).get_points()[:, side]), t.get_text())
                for t in shown
            )
            for (a, text_a), (b, text_b) in zip(boxes, boxes[1:], strict=False):
                if b[0] < a[1]:
                    pairs.append((text_a, text_b))
    return pairs


@pytest.fixture
def callers_matplotlib():
    """A notebook's matplotlib, as a report built from it must leave it: its own backend (not
    Agg), matplotlib's default style, a figure of its own open. Returns a function that reads
    that state; the test's matplotlib is restored after it."""
    import matplotlib
    import matplotlib.pyplot as plt

    def state() -> dict:
        rc = {k: v for k, v in matplotlib.rcParams.items() if k != "backend"}
        return {"backend": matplotlib.get_backend(), "figures": plt.get_fignums(), "rc": rc}

    backend = matplotlib.get_backend()
    with matplotlib.rc_context():
        matplotlib.rcdefaults()
        plt.switch_backend("svg")
        plt.figure()
        try:
            yield state
        finally:
            plt.close("all")
            plt.switch_backend(backend)
