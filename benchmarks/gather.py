"""The flat gradient's writing, three ways, on a preset's parameter shapes (random values), in one process with
the three alternating round by round: ``torch.cat`` then ``vector_norm`` (what a clipping step did before the
native gather), ``torch.cat`` alone (a step that does not clip), and the native gather (``native/gather.cpp``:
the copy with ‖g‖² summed on the way).

    python benchmarks/gather.py PRESET THREADS      # e.g. planar-80 2

Prints each way's fastest and median round (milliseconds per call, 200 calls a round, 7 rounds).
"""

import statistics
import sys
import time

import torch

from vaelab import native
from vaelab.config import RunConfig
from vaelab.evaluation import hot_loop_settings
from vaelab.models import build_model
from vaelab.presets import apply_preset
from vaelab.training import FlatParameters


def main() -> None:
    name, threads = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(threads)
    gather = native.gather_kernel()
    if gather is None:
        sys.exit("the native gather is not available here (see the warning above)")
    model = build_model(apply_preset(RunConfig(), name).model)
    out = FlatParameters(model).param.grad
    generator = torch.Generator().manual_seed(0)
    parts = [0.01 * torch.randn(p.numel(), generator=generator) for p in model.parameters()]
    ways = {"cat + norm": lambda: torch.linalg.vector_norm(torch.cat(parts, out=out)),
            "cat alone": lambda: torch.cat(parts, out=out),
            "gather": lambda: gather(parts, out)}
    calls, seconds = 200, {way: [] for way in ways}
    with torch.no_grad(), hot_loop_settings():
        for work in ways.values():
            for _ in range(20):
                work()
        for round_ in range(7):
            for way in (list(ways) if round_ % 2 == 0 else list(reversed(ways))):
                start = time.perf_counter()
                for _ in range(calls):
                    ways[way]()
                seconds[way].append((time.perf_counter() - start) / calls * 1e3)
    print(f"{name}: {out.numel()} numbers in {len(parts)} tensors, {threads} thread(s): " + "; ".join(
        f"{way} {min(times):.3f} ms (median {statistics.median(times):.3f})" for way, times in seconds.items()))


if __name__ == "__main__":
    main()
