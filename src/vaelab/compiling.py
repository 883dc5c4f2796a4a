"""torch.compile, as vaelab uses it: whole graphs or an error, a bounded number of them, and a C++ compiler first.

``--engine compiled`` (training) and ``evaluate --compiled`` (the IWAE log weights) hand a function to TorchInductor,
which fuses its elementwise kernels (and, in training, their backward) into generated C++ on the CPU. ``compile``
asks for the whole function as one graph (``fullgraph``: a part the compiler cannot take is an error, never a
silent return to Python for that part) with static shapes; ``limits`` lets one process compile ``GRAPHS`` graphs
(architectures × batch sizes …) and makes the next an error rather than a silent fall back to eager execution.
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from typing import Callable

import torch

from vaelab import native
from vaelab.errors import UsageError

GRAPHS = 64     # graphs one process may compile for one function before it is an error


def compile(fn: Callable) -> Callable:
    native.prepare()            # the native kernels a graph calls are built (or found missing) before any trace
    return torch.compile(fn, dynamic=False, fullgraph=True)


def forget() -> None:
    """Drop every graph this process has compiled (``torch._dynamo.reset``). A sweep's worker trains one trial after
    another in one process, each a model of its own: the graphs of trials done would otherwise stay in memory and
    count against ``GRAPHS`` (an error at the 33rd trial of a preset whose epochs end in a short batch). The next call
    of a compiled function compiles again (TorchInductor's cache on disk keeps that short for a model seen before)."""
    torch._dynamo.reset()


# TorchInductor's advice on a GPU with TensorFloat-32 units. vaelab keeps float32 products IEEE float32 on every device
# (TF32 rounds their operands to 10-bit mantissas; the lower precision it offers is --precision bf16), so the
# advice, which no vaelab flag could follow, is not shown as a warning of every compiled run.
TF32_ADVICE = "TensorFloat32 tensor cores for float32 matrix multiplication available but not enabled"


@contextlib.contextmanager
def limits():
    """The context a compiled function (and its backward) is called in: dynamo's graph limit (a cheap patch of its
    config), without the TF32 advice."""
    with torch._dynamo.config.patch(recompile_limit=GRAPHS, fail_on_recompile_limit_hit=True), \
            warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=TF32_ADVICE, category=UserWarning)
        yield


def _compiler_names() -> tuple[str, ...]:
    """The C++ compilers TorchInductor would build CPU kernels with, in its order."""
    from torch._inductor import config as inductor

    names = inductor.cpp.cxx if isinstance(inductor.cpp.cxx, (list, tuple)) else (inductor.cpp.cxx,)
    return tuple(name for name in names if name)


def compiler_found(device: torch.device) -> bool:
    """Whether torch.compile can build kernels for ``device``: on a CPU, one of its C++ compilers is on the PATH."""
    return device.type != "cpu" or any(shutil.which(name) for name in _compiler_names())


def require_compiler(device: torch.device, flag: str, instead: str | None = None) -> None:
    """Refuse ``flag`` on a CPU without the C++ compiler TorchInductor builds its kernels with; ``instead``: the
    other way the message offers (default: run without ``flag``)."""
    if not compiler_found(device):
        names = _compiler_names()
        raise UsageError(f"{flag} needs a C++ compiler on the CPU (torch.compile builds its kernels with one of "
                         f"{', '.join(names)}; none was found): install one (apt install g++) or set "
                         f"CXX to it, or {instead or f'run without {flag}'}")
