"""Native kernels: C++ sources beside this file, built once per machine with its C++ compiler, loaded with ctypes.

What PyTorch runs as many small kernels in a Python loop, and what no product or fused graph expresses, is written
here as a plain loop: the planar flow's two sequential recursions and the per-step work around them
(``planar.cpp``; ``vaelab.models.flows``) and its vectorised tanh for a tanh network's layers outside autograd
(``models.base.ACTIVATIONS``), the Bernoulli likelihood's Σ softplus over the logits in one pass
(``softplus.cpp``; ``objectives.softplus_sum``), and a step's gradients gathered into the flat buffer with their
squared norm on the way (``gather.cpp``; ``engines.write_gradient``), flush-to-zero set on every thread of the team
(``denormals.cpp``; ``evaluation.hot_loop_settings``), and an epoch's binarisation drawn from torch's MT19937 stream
in a vectorised loop (``binarize.cpp``; ``data.binarize``). The sources use no torch headers; they take
pointers to contiguous float32 or float64 arrays. Their parallel loops are OpenMP's, on the process's runtime, which
is torch's own libgomp (loaded first, the same soname), with torch's thread count: threads started by the library
instead competed with torch's, still spinning on the cores.

**Build.** On first use, ``$CXX`` (else g++, c++ or clang++) compiles the source with ``-O3 -march=native`` into
a cache directory ($VAELAB_CACHE, else an absolute $XDG_CACHE_HOME/vaelab, else ~/.cache/vaelab; a temporary
directory if that cannot be written), under ``native/<name>-<hash>.so``, the hash covering the source, the flags, the
compiler's version and the CPU's model and flags (a home directory shared by different machines keeps one
library per kind of CPU). A directory that another user owns or may write in is not used (the library is loaded
into the process). The compiler writes a temporary file that is renamed into place, so processes that
build the same library at once (torchrun's ranks) each load a whole one.

**Fall back.** Where the library cannot be had (no compiler, a failed build, nowhere to write, another device or
dtype), ``planar_ops`` returns None and the flow runs its PyTorch loop: the same arithmetic, rounded differently in
the last float32 digits (tests/test_native.py), several times slower. The reason is given once as a warning.
``VAELAB_NATIVE=0`` asks for the PyTorch loops without one (to compare, or to reproduce a run of older code).

**torch.compile.** The kernels are registered as custom operators (``vaelab::planar_forward``, ``…_backward``,
``…_quantities``, ``…_parameter_gradient``, ``vaelab::softplus_sum``) with their output shapes, so a compiled graph
calls them as single nodes (outside one the softplus sum is called directly: the operator's dispatch costs about
13 µs a call). The gather is no operator: it runs outside the graphs, on the gradients a compiled backward hands
back to ``engines.write_gradient``. Tracing cannot build a library: ``compiling.compile`` calls ``prepare`` first.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from vaelab.provenance import cpu_name, cpuinfo

FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-std=c++17", "-fPIC", "-shared")
# OpenMP: the process's runtime, torch's libgomp (see planar.cpp); where the compiler has none, one thread
THREADING = (("-fopenmp",), ("-fopenmp-simd",))

_UNRESOLVED = object()
_OPS: dict[str, object] = {}          # name → its operators, or None where the library could not be had
_QUIET: dict[str, object] = {}        # ``_quiet``'s kernels (or None), once resolved


class NativeBuildError(RuntimeError):
    """A native library could not be built or loaded; the message says why (callers fall back to PyTorch)."""


def compiler() -> str | None:
    """The C++ compiler: $CXX, else the first of g++, c++, clang++ on the PATH."""
    found = (shutil.which(name) for name in (os.environ.get("CXX"), "g++", "c++", "clang++") if name)
    return next((path for path in found if path), None)


def xdg_ignored(value: str) -> bool:
    """Whether an $XDG_CACHE_HOME of ``value`` is to be ignored: the XDG Base Directory Specification makes a relative
    path invalid ("it should consider the path invalid and ignore it"; a leading ~ is expanded here, as a shell would).
    Until 2026-12-08 a relative one was taken from the working directory, and every folder a command ran in had a
    cache of its own: MNIST fetched again, the native kernels built again."""
    return not os.path.isabs(os.path.expanduser(value))


def _cache_dirs() -> list[Path]:
    base = os.environ.get("VAELAB_CACHE")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = os.path.join(os.path.expanduser(xdg), "vaelab") if xdg and not xdg_ignored(xdg) else \
            os.path.join(os.path.expanduser("~"), ".cache", "vaelab")
    return [Path(base) / "native", Path(tempfile.gettempdir()) / f"vaelab-native-{os.getuid()}"]


def build(name: str) -> Path:
    """The path of library ``name`` (``name.cpp`` beside this file), built if it is not in the cache."""
    source = Path(__file__).with_name(f"{name}.cpp")
    cxx = compiler()
    if cxx is None:
        raise NativeBuildError("no C++ compiler (install one, e.g. apt install g++, or set CXX)")
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, encoding="utf-8", errors="replace",
                                 timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeBuildError(f"{cxx} --version failed: {exc}") from exc
    key = hashlib.sha256("\0".join([source.read_text(encoding="utf-8"), " ".join(FLAGS), str(THREADING), version, cpu_name(),
                                    cpuinfo("flags", "Features")]).encode()).hexdigest()[:16]
    problems = []
    for directory in _cache_dirs():
        library = directory / f"{name}-{key}.so"
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            _check_private(directory)
            if library.exists():
                return library
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{library.name}.", suffix=".tmp")
            os.close(fd)
        except NativeBuildError as exc:
            problems.append(str(exc))
            continue
        except OSError as exc:
            problems.append(f"cannot write in {directory}: {exc.strerror}")
            continue
        try:
            for threading in THREADING:
                done = subprocess.run([cxx, *FLAGS, *threading, str(source), "-o", tmp], capture_output=True,
                                      encoding="utf-8", errors="replace", timeout=600)
                if done.returncode == 0:
                    break
            else:
                raise NativeBuildError(f"{cxx} failed on {source.name}: {done.stderr.strip()[-500:]}")
            os.replace(tmp, library)
            return library
        except (OSError, subprocess.SubprocessError) as exc:
            problems.append(f"building in {directory}: {exc}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise NativeBuildError("; ".join(problems))


def _check_private(directory: Path) -> None:
    """A library is loaded into this process: only from a directory that this user owns and that no one else may
    write in (a temporary directory is shared; another user could put a library there under the expected name)."""
    info = directory.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise NativeBuildError(f"{directory} is not this user's own (owner uid {info.st_uid}, mode "
                               f"{info.st_mode & 0o777:o}): no library is loaded from it")


def prepare() -> None:
    """Resolve every native library now (before torch.compile traces code that asks for one)."""
    planar_ops()
    tanh_kernel()
    softplus_kernel()
    gather_kernel()


def gather_kernel():
    """A step's gradients written into the flat buffer with their squared norm in one pass (``gather.cpp``), as a
    function (parts, out) → Σ out² (a float), or None where the library cannot be had (``engines.write_gradient``
    then concatenates with ``torch.cat``, and clipping takes the norm in a pass of its own)."""
    return _resolve("gather", _gather_kernel)


def softplus_kernel():
    """Σⱼ softplus over the last axis of a float32 CPU tensor in one pass (``softplus.cpp``), as a function
    (y (…, D), base2, bias, data) → (…,) that compiled graphs call as an operator too (with ``data`` the Bernoulli
    negative log-likelihood), or None where the library cannot be had (``objectives.softplus_sum`` then runs its
    PyTorch form, ``models.base.bernoulli_data_term`` its product form)."""
    return _resolve("softplus", _softplus_kernel)


def denormal_switch():
    """A function on → threads that sets (``on``) or clears flush-to-zero and denormals-are-zero on every thread of
    torch's OpenMP team (``denormals.cpp``), or None where the library cannot be had (not x86, no compiler, …; then
    ``torch.set_flush_denormal`` covers the calling thread alone). Resolved once per process, and not among the
    kernels a record names (``resolved``): it is a setting of the threads, not a computation of its own."""
    return _quiet("denormals", _denormal_switch)


def binarize_kernel():
    """A function (grey, out, generator, rows=None) → bool that writes ``torch.randint(0, 255, …, dtype=torch.uint8,
    generator=generator) < grey[rows]`` into ``out`` and leaves ``generator`` in the state torch.randint would
    (``binarize.cpp``; contiguous uint8 CPU tensors, a CPU generator; False where it cannot take them), 4–6 × faster
    alone and 3.2 × for an epoch's permuted digits on the Xeon of benchmarks/README.md; or None where the library
    cannot be had (``data.binarize`` then draws with torch.randint). The same bits either way, so no warning and not
    among the kernels a record names (``resolved``)."""
    return _quiet("binarize", _binarize_kernel)


def _quiet(name: str, make):
    """``make()`` once per process: a kernel that changes no result, only its speed, so that where its library
    cannot be had the PyTorch code runs without a warning and records need not name it."""
    if name not in _QUIET:
        if os.environ.get("VAELAB_NATIVE") == "0":
            return None
        library = _load(name)
        _QUIET[name] = None if library is None else make(library)
    return _QUIET[name]


def tanh_kernel():
    """A function that applies tanh in place to a contiguous float32 CPU tensor (``planar.cpp``'s vectorised tanh,
    within 1.5 units in the last place; 6.6 × torch's float32 tanh on one thread of the Zen 4 of
    benchmarks/README.md), or None where the library cannot be had (then ``torch.tanh_``, rounded differently)."""
    return _resolve("tanh", _tanh_kernel)


def planar_ops() -> PlanarOps | None:
    """The planar flow's kernels as custom operators (``PlanarOps``), or None (see the module's docstring)."""
    return _resolve("planar", _planar_ops)


def _resolve(name: str, make):
    """Kernel ``name``'s operators, made by ``make`` once per process (None where its library cannot be had)."""
    ops = _OPS.get(name, _UNRESOLVED)
    if ops is _UNRESOLVED:
        if torch.compiler.is_compiling():       # a trace cannot run a compiler; ``prepare`` should have
            return None
        ops = _OPS[name] = make()
    return ops


def _load(name: str, kernel: str | None = None, instead: str | None = None):
    """Library ``name`` loaded (built first where needed), or None: ``VAELAB_NATIVE=0``, or it cannot be had, which
    one warning says, naming the ``kernel`` and, ``instead``, what runs in its place (no ``kernel``: no warning)."""
    if os.environ.get("VAELAB_NATIVE") == "0":
        return None
    try:
        return ctypes.CDLL(str(build(name)))
    except (NativeBuildError, OSError) as exc:
        if kernel is not None:
            warnings.warn(f"{kernel} native kernel is not available ({exc}); {instead}", RuntimeWarning, stacklevel=5)
        return None


# name → what ``_once`` registered with torch.library for it, kept for the life of the process
_REGISTERED: dict[str, object] = {}


def _once(name: str, register):
    """``register()``'s operators for kernel ``name``, made once per process and kept. torch.library holds one
    definition of an operator: defining ``vaelab::softplus_sum`` again (a second resolution, after ``_OPS`` was
    reset) destroys the first definition's registrations, and a function still holding the first one then calls
    into an operator handle that is gone (an intermittent segmentation fault in a later trace, seen in the test
    suite when a test resolved the kernel anew)."""
    if name not in _REGISTERED:
        _REGISTERED[name] = register()
    return _REGISTERED[name]


# what runs a kernel's computation where its library could not be had
FALLBACKS = {"planar": "PyTorch loop", "softplus": "PyTorch", "gather": "torch.cat", "tanh": "PyTorch"}


def resolved() -> dict[str, str]:
    """The kernels this process has asked for so far and what runs them ("native", or the PyTorch fallback):
    recorded with a run's checkpoints and evaluations (``vaelab.provenance``), since the two round differently."""
    return {name: FALLBACKS[name] if ops is None else "native" for name, ops in sorted(_OPS.items())}


def usable(ops, *tensors: torch.Tensor):
    """``ops`` where all ``tensors`` are on the CPU in float32 or float64 (one dtype), else None."""
    if ops is None:
        return None
    dtype = tensors[0].dtype
    ok = dtype in (torch.float32, torch.float64) and all(t.device.type == "cpu" and t.dtype == dtype for t in tensors)
    return ops if ok else None


def _tanh_kernel():
    library = _load("planar", "the tanh activation's", "torch.tanh runs instead (the same to float32 rounding, slower)")
    if library is None:
        return None
    kernel = library.tanh_inplace_f32
    kernel.argtypes, kernel.restype = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int], None

    def tanh_(t: torch.Tensor) -> torch.Tensor:
        kernel(t.data_ptr(), t.numel(), torch.get_num_threads())
        return t

    return tanh_


def _softplus_kernel():
    library = _load("softplus", "the softplus sum's",
                    "its PyTorch form runs instead (the same result to float32 rounding, slower)")
    return None if library is None else _once("softplus", lambda: _softplus_ops(library))


def _softplus_ops(library):
    """The softplus kernel's function and its operator ``vaelab::softplus_sum`` (registered by ``_once``)."""
    kernel = library.softplus_sum_f32
    kernel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                       ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    kernel.restype = None

    def direct(y: torch.Tensor, base2: bool, bias: torch.Tensor | None = None,
               data: torch.Tensor | None = None) -> torch.Tensor:
        y = y.contiguous()
        bias = None if bias is None else bias.to(torch.float32).contiguous()
        if bias is not None and bias.shape != y.shape[-1:]:
            raise ValueError(f"a bias of shape {tuple(bias.shape)} for logits of shape {tuple(y.shape)}")
        out = torch.empty(y.shape[:-1], dtype=y.dtype)
        rows = out.numel()
        if data is not None:
            data = data.to(torch.float32).contiguous()
            if data.dim() != 2 or data.shape[1] != y.shape[-1] or (rows and (len(data) == 0 or rows % len(data))):
                raise ValueError(f"data of shape {tuple(data.shape)} for logits of shape {tuple(y.shape)}: (B, "
                                 f"{y.shape[-1]}) wanted, B dividing the {rows} rows")
        kernel(y.data_ptr(), None if bias is None else bias.data_ptr(), None if data is None else data.data_ptr(),
               0 if data is None else data.shape[0], out.data_ptr(), rows, y.shape[-1], int(base2),
               torch.get_num_threads())
        return out

    @torch.library.custom_op("vaelab::softplus_sum", mutates_args=(), device_types="cpu")
    def softplus_sum_op(y: torch.Tensor, bias: torch.Tensor | None, data: torch.Tensor | None,
                        base2: bool) -> torch.Tensor:
        """Σⱼ softplus over the last axis, minus Σⱼ xⱼℓⱼ with data (softplus.cpp), as an operator a compiled graph
        calls as one node."""
        return direct(y, base2, bias, data)

    @softplus_sum_op.register_fake
    def _(y, bias, data, base2):
        return y.new_empty(y.shape[:-1])

    def softplus_sum(y: torch.Tensor, base2: bool, bias: torch.Tensor | None = None,
                     data: torch.Tensor | None = None) -> torch.Tensor:
        """Σⱼ softplus(ℓⱼ) over the last axis of y (…, D) float32 with ``bias`` (D,) added (none: zeros), ℓ = y + bias,
        or (y + bias) / log₂e where ``base2`` (softplus.cpp). With ``data`` x (B, D), the rows being draws of B
        digits (the digits innermost: row i is digit i mod B), the Bernoulli negative log-likelihood
        Σⱼ softplus(ℓⱼ) − xⱼℓⱼ = −log p(x|ℓ) instead, each pixel's term summed whole. Traced into a compiled graph as
        the operator ``vaelab::softplus_sum``, called directly otherwise (the operator's dispatch costs ~13 µs a
        call)."""
        if torch.compiler.is_compiling():
            return softplus_sum_op(y, bias, data, base2)
        return direct(y, base2, bias, data)

    return softplus_sum


def _denormal_switch(library):
    # No warning where the library cannot be had (``_quiet``): the calling thread flushes as it always did, and the
    # kernels that compute the results (``_load``'s) say for themselves that they run without theirs.
    kernel = library.flush_denormal_all_threads
    kernel.argtypes = [ctypes.c_int, ctypes.c_int]
    kernel.restype = ctypes.c_int

    def flush_denormal_all_threads(on: bool) -> int:
        """FTZ and DAZ set (``on``) or cleared on every thread of torch's OpenMP team; the number of threads."""
        return kernel(int(on), torch.get_num_threads())

    return flush_denormal_all_threads


# torch's CPU generator state (CPUGeneratorImplState of ATen/CPUGeneratorImpl.cpp, torch 2.x): the initial seed
# (uint64), left (int32), seeded (int32), next (uint64), MT19937's 624 words (uint64 each), then the normal samples'
# cache; 5056 bytes in all. Another size is another layout: torch.randint draws then.
GENERATOR_STATE_BYTES = 5056
MT_WORDS = 624


def _binarize_kernel(library):
    kernel = library.binarize_mt19937
    kernel.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
    kernel.restype = None

    def binarize_into(grey: torch.Tensor, out: torch.Tensor, generator: torch.Generator,
                      rows: torch.Tensor | None = None) -> bool:
        """out ← randint(0, 255) < grey[rows] (grey itself without ``rows``) as torch.randint would draw it from
        ``generator``, which is left where torch.randint leaves it; False (nothing done) where the tensors or the
        generator's state are not what the kernel takes. grey (N, D) or (n,), out (len(rows), D) or grey's shape,
        rows (int64 indices into grey's rows)."""
        tensors = (grey, out) if rows is None else (grey, out, rows)
        if not (grey.dtype == out.dtype == torch.uint8 and generator.device.type == "cpu"
                and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)
                and (out.shape == grey.shape if rows is None else
                     rows.dtype == torch.int64 and grey.dim() == 2 and out.shape == (len(rows), grey.shape[1]))):
            return False
        if rows is not None and len(rows):
            low, high = (int(v) for v in torch.aminmax(rows))                   # one pass over the index
            if low < 0 or high >= len(grey):
                raise ValueError(f"row indices {low} … {high} for {len(grey)} rows of grey levels")
        state = generator.get_state()                                   # (5056,) uint8, a copy
        if state.numel() != GENERATOR_STATE_BYTES:
            return False
        left, next_ = int(state[8:12].view(torch.int32)), int(state[16:24].view(torch.int64))
        if not (1 <= left <= MT_WORDS and 0 <= next_ and next_ + left - 1 <= MT_WORDS):
            return False
        words = state[24:24 + 8 * MT_WORDS].view(torch.int64)          # (624,) the words, in a view of the copy
        position = torch.tensor([left, next_], dtype=torch.int64)
        kernel(words.data_ptr(), position.data_ptr(), grey.data_ptr(), None if rows is None else rows.data_ptr(),
               grey.shape[-1], out.data_ptr(), out.numel())
        state[8:12].view(torch.int32)[0] = int(position[0])
        state[16:24].view(torch.int64)[0] = int(position[1])
        generator.set_state(state)
        return True

    return binarize_into


def _gather_kernel():
    library = _load("gather", "the gradient gather's", "torch.cat writes the flat gradient and clipping takes its "
                    "norm in a second pass (the same gradient; its norm rounded differently)")
    if library is None:
        return None
    kernel = library.gather_squares_f32
    kernel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    kernel.restype = ctypes.c_double

    def gather_squares(parts: list[torch.Tensor], out: torch.Tensor) -> float:
        """out ← the concatenation of ``parts`` (contiguous float32 CPU tensors, flattened, Σ numel = out's), and
        ‖out‖² summed in double, in blocks added in a fixed order: the same bits for any number of threads."""
        if not all(p.dtype == torch.float32 and p.device.type == "cpu" and p.is_contiguous() for p in parts + [out]):
            raise ValueError("gather_squares takes contiguous float32 CPU tensors")
        if sum(p.numel() for p in parts) != out.numel():
            raise ValueError(f"parts of {sum(p.numel() for p in parts)} numbers for a buffer of {out.numel()}")
        count = len(parts)
        pointers = (ctypes.c_void_p * count)(*(p.data_ptr() for p in parts))
        sizes = (ctypes.c_int64 * count)(*(p.numel() for p in parts))
        return kernel(pointers, sizes, count, out.data_ptr(), torch.get_num_threads())

    return gather_squares


def _planar_ops():
    library = _load("planar", "the planar flow's", "the flow runs its PyTorch loop instead (the same result, slower)")
    return None if library is None else _once("planar", lambda: _planar_operators(library))


class PlanarOps(NamedTuple):
    """The planar flow's operators (``planar.cpp``): its two recursions, and the per-step work before and after."""
    forward: Callable            # (s, M, c) → (a, log-det)
    backward: Callable           # (M, a, ûᵀg, c, ℓ or None) → (p, ∂L/∂c)
    quantities: Callable         # (params, ε) → (û, [κ, c, wᵀu, ‖w‖²])
    parameter_gradient: Callable  # (params, scalars, ∂û, ∂w, ∂c, p, ε) → ∂params


def _planar_operators(library) -> PlanarOps:
    """The operators ``vaelab::planar_forward``, ``…_backward``, ``…_quantities`` and ``…_parameter_gradient`` over its
    kernels (registered by ``_once``)."""
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    kernels = {}
    for dtype, suffix in ((torch.float32, "f32"), (torch.float64, "f64")):
        functions = [getattr(library, f"planar_{name}_{suffix}")
                     for name in ("forward", "backward", "quantities", "parameter_gradient")]
        for function, argtypes in zip(functions, (
                [pointer] * 5 + [size] * 3 + [ctypes.c_int], [pointer] * 7 + [size] * 3 + [ctypes.c_int],
                [pointer] * 3 + [size] * 2 + [ctypes.c_double, ctypes.c_int],
                [pointer] * 7 + [size] * 3 + [ctypes.c_double, ctypes.c_int])):
            function.argtypes, function.restype = argtypes, None
        kernels[dtype] = functions

    def address(t: torch.Tensor | None):
        return None if t is None else t.data_ptr()

    @torch.library.custom_op("vaelab::planar_forward", mutates_args=(), device_types="cpu")
    def planar_forward(s: torch.Tensor, m: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, Σₜ log(1 + (1 − aₜ²)cₜ)) with aₜ = tanh(sₜ + Σ_{r<t} M[r][t] aᵣ), for s (N, T, R), M (N, T, T) and
        c (N, T): a (N, T, R) and the log-determinant (N, R) (planar.cpp)."""
        s, m, c = s.contiguous(), m.contiguous(), c.contiguous()
        a = torch.empty_like(s)
        log_det = s.new_empty(s.shape[0], s.shape[2])
        kernels[s.dtype][0](m.data_ptr(), c.data_ptr(), s.data_ptr(), a.data_ptr(), log_det.data_ptr(), s.shape[1],
                            s.shape[0], s.shape[2], torch.get_num_threads())
        return a, log_det

    @planar_forward.register_fake
    def _(s, m, c):
        return (torch.empty_like(s, memory_format=torch.contiguous_format),
                s.new_empty(s.shape[0], s.shape[2]))

    @torch.library.custom_op("vaelab::planar_backward", mutates_args=(), device_types="cpu")
    def planar_backward(m: torch.Tensor, a: torch.Tensor, d: torch.Tensor, c: torch.Tensor,
                        ell: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(p, ∂L/∂c) for a, d = ûᵀg (N, T, R), M (N, T, T), c (N, T) and ℓ = ∂L/∂log-det (N, R) or None: with
        Dₜ = dₜ − 2ℓaₜcₜ/(1 + (1 − aₜ²)cₜ), pₜ = (Dₜ + Σ_{r>t} M[t][r] pᵣ)(1 − aₜ²) from t = T − 1 down, and
        ∂L/∂cₜ = Σ_draws ℓ(1 − aₜ²)/(1 + (1 − aₜ²)cₜ) (zeros without ℓ) (planar.cpp)."""
        m, a, d, c = m.contiguous(), a.contiguous(), d.contiguous(), c.contiguous()
        ell = None if ell is None else ell.contiguous()
        p = torch.empty_like(d)
        grad_c = torch.empty_like(c) if ell is not None else torch.zeros_like(c)
        kernels[d.dtype][1](m.data_ptr(), a.data_ptr(), d.data_ptr(), c.data_ptr(), address(ell), p.data_ptr(),
                            grad_c.data_ptr(), d.shape[1], d.shape[0], d.shape[2], torch.get_num_threads())
        return p, grad_c

    @planar_backward.register_fake
    def _(m, a, d, c, ell):
        return torch.empty_like(d, memory_format=torch.contiguous_format), torch.empty_like(c)

    @torch.library.custom_op("vaelab::planar_quantities", mutates_args=(), device_types="cpu")
    def planar_quantities(params: torch.Tensor, min_squared_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(û (N, T, d), [κ, c, wᵀu, ‖w‖²] (4, N, T)) for the steps' parameters [u, w, b] (N, T, 2d + 1), with
        κ = m(wᵀu)/max(‖w‖², ε), û = u + κw, c = wᵀu + κ‖w‖² (planar.cpp)."""
        params = params.contiguous()
        n, steps, d = params.shape[0], params.shape[1], (params.shape[2] - 1) // 2
        u_hat, scalars = params.new_empty(n, steps, d), params.new_empty(4, n, steps)
        kernels[params.dtype][2](params.data_ptr(), u_hat.data_ptr(), scalars.data_ptr(), n * steps, d,
                                 min_squared_norm, torch.get_num_threads())
        return u_hat, scalars

    @planar_quantities.register_fake
    def _(params, min_squared_norm):
        n, steps, d = params.shape[0], params.shape[1], (params.shape[2] - 1) // 2
        return params.new_empty(n, steps, d), params.new_empty(4, n, steps)

    @torch.library.custom_op("vaelab::planar_parameter_gradient", mutates_args=(), device_types="cpu")
    def planar_parameter_gradient(params: torch.Tensor, scalars: torch.Tensor, grad_u_hat: torch.Tensor,
                                  grad_w: torch.Tensor, grad_c: torch.Tensor, p: torch.Tensor,
                                  min_squared_norm: float) -> torch.Tensor:
        """[∂u, ∂w, ∂b] (N, T, 2d + 1) from ∂L/∂û and the steps' direct ∂L/∂w (N, T, d), ∂L/∂c (N, T) and
        p = ∂L/∂s (N, T, R), through û = u + κw and c = wᵀu + κ‖w‖² (planar.cpp)."""
        params, scalars, p = params.contiguous(), scalars.contiguous(), p.contiguous()
        grad_u_hat, grad_w, grad_c = grad_u_hat.contiguous(), grad_w.contiguous(), grad_c.contiguous()
        out = torch.empty_like(params)
        kernels[params.dtype][3](params.data_ptr(), scalars.data_ptr(), grad_u_hat.data_ptr(), grad_w.data_ptr(),
                                 grad_c.data_ptr(), p.data_ptr(), out.data_ptr(), params.shape[0] * params.shape[1],
                                 grad_u_hat.shape[-1], p.shape[-1], min_squared_norm, torch.get_num_threads())
        return out

    @planar_parameter_gradient.register_fake
    def _(params, scalars, grad_u_hat, grad_w, grad_c, p, min_squared_norm):
        return torch.empty_like(params, memory_format=torch.contiguous_format)

    return PlanarOps(planar_forward, planar_backward, planar_quantities, planar_parameter_gradient)
