"""Shared fixtures: a small synthetic MNIST-like data set that the tests make themselves."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from vaelab.data import MNISTArrays, save_cache


def synthetic_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n grey-level 28×28 images (uint8, flattened) of class-dependent strokes, and their labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    yy, xx = np.mgrid[0:28, 0:28]
    images = np.zeros((n, 28, 28))
    for i, label in enumerate(labels):
        angle = np.pi * label / 10 + rng.normal(0, 0.1)
        cx, cy = 14 + rng.normal(0, 1.5, 2)
        # a bar through the centre at a class-dependent angle, plus a class-dependent ring
        distance = np.abs((xx - cx) * np.sin(angle) - (yy - cy) * np.cos(angle))
        ring = np.abs(np.hypot(xx - cx, yy - cy) - (4 + label % 5))
        images[i] = np.clip(1.5 - distance, 0, 1) + np.clip(1.2 - ring, 0, 1) * (label >= 5)
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8).reshape(n, 784), labels


def make_arrays(n_train: int = 2000, n_test: int = 500) -> MNISTArrays:
    train_x, train_y = synthetic_digits(n_train, 1)
    test_x, test_y = synthetic_digits(n_test, 2)
    return MNISTArrays(train_x, train_y, test_x, test_y)


@pytest.fixture(scope="session")
def tiny_arrays() -> MNISTArrays:
    return make_arrays()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, tiny_arrays):
    """A data directory holding vaelab's cache of the synthetic set (what `--data-dir` points at)."""
    directory = tmp_path_factory.mktemp("data")
    save_cache(tiny_arrays, directory)
    return directory


def has_compiler() -> bool:
    """Whether torch.compile can build CPU kernels here (a C++ compiler; ``vaelab.compiling.require_compiler``)."""
    import torch

    from vaelab.compiling import require_compiler
    from vaelab.errors import UsageError

    try:
        require_compiler(torch.device("cpu"), "--engine compiled")
    except UsageError:
        return False
    return True


needs_compiler = pytest.mark.skipif(not has_compiler(), reason="no C++ compiler for torch.compile (apt install g++)")


@pytest.fixture
def children_temp(tmp_path_factory, monkeypatch):
    """Processes the test starts take a temporary folder of pytest's as TMPDIR: torchrun's agent writes its logs
    into a folder of its own there (torchelastic_…), which a killed agent leaves behind; pytest removes its old
    folders, /tmp keeps them. The children's only: this process's ``tempfile.gettempdir()`` is cached at its first
    call, usually long before."""
    monkeypatch.setenv("TMPDIR", str(tmp_path_factory.mktemp("children-tmp")))


@pytest.fixture
def sigint_as_at_a_terminal():
    """Ctrl-C raises KeyboardInterrupt in this process during the test, whatever the test runner inherited: a shell's
    background job (`make test &`, `nohup … &`) starts with SIGINT ignored, and a command there keeps ignoring it, as
    Python does, so a test that sends SIGINT to itself would see nothing."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def run(capsys, *args):
    """`vaelab ARGS` in this process: (exit status, stdout, stderr)."""
    from vaelab.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> bool:
    """Whether ``err`` is the one line (no traceback) that bad input gets."""
    return len(err.strip().splitlines()) == 1 and "Traceback" not in err


def latex_compiles(table: str, tmp_path) -> None:
    """The LaTeX table compiles in a bare article with booktabs (pdflatex; the test is skipped where none is
    installed, after the checks made before it)."""
    engine = shutil.which("pdflatex")
    if engine is None:
        pytest.skip("no TeX engine installed (pdflatex): the table's structure was checked, not its compilation")
    document = tmp_path / "t.tex"
    document.write_text("\\documentclass{article}\\usepackage{booktabs}\\begin{document}\n" + table
                        + "\n\\end{document}\n", encoding="utf-8")
    done = subprocess.run([engine, "-interaction=nonstopmode", "-halt-on-error", document.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-800:]


@pytest.fixture(autouse=True)
def _close_figures():
    """Figures a test builds itself (``plots.*_figure``) are closed after it: beyond 20 open figures pyplot warns,
    and the warning lands on the stderr of a later test that counts its lines."""
    yield
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close("all")
