"""bfloat16 matrix products, native and emulated.

A native bf16 product (oneDNN's AVX-512 BF16 or AMX kernels on CPU, tensor cores on GPU) takes bf16
operands, sums their products in float32 and rounds the sum to bf16 once. ``emulated_bf16_mm`` computes the
same thing with float32 products, on any machine, so it can tell whether bf16 would change a result on a CPU
without bf16, where torch's own bf16 products are emulated 22–124× slower than float32 (benchmarks/README.md).
It is a check, never a speed-up.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

Product = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # bf16 (m, k), bf16 (k, n) → bf16 (m, n)


def emulated_bf16_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a · b for bf16 operands, as a native kernel computes it: each product of two bf16 numbers is exact
    in float32 (8 + 8 significant bits fit in 24), the products are summed in float32 and the sum is rounded
    to bf16 once. Only the order of the float32 additions may differ from a native kernel's, which moves a
    result by float32 rounding before it is rounded to bf16: the two agree in all but about 1 in 10⁴ entries,
    and those differ by one bf16 step (tests/test_training.py::test_emulated_bf16_product_equals_torch_bf16)."""
    return torch.mm(a.float(), b.float()).to(torch.bfloat16)


class EmulatedBF16Products(TorchDispatchMode):
    """While active, every matrix product with a bf16 operand (the ones ``torch.autocast`` makes, in the
    forward pass and in autograd's backward) is computed as ``emulated_bf16_mm`` computes it: operands widened
    to float32 (exactly), one float32 product, the result rounded to bf16; an ``addmm``'s bias is added inside
    the float32 sum before that rounding, as a native kernel's bias. Everything else runs untouched. Each
    operation passes through Python on its way, so a step takes 2–3× its float32 time (an epoch of the
    ``cpu-hour`` preset: 11.8–15.0 s against 5.4–6.0 s), against 22–124× for torch's own bf16 products on a CPU
    without bf16.
    """

    PRODUCTS = frozenset({torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
                          torch.ops.aten.baddbmm.default})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.PRODUCTS and any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
            wide = [a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else a for a in args]
            return func(*wide, **kwargs).to(torch.bfloat16)
        return func(*args, **kwargs)


# --precision → the bf16 product it uses (fp32 uses none)
BF16_PRODUCTS: dict[str, Product] = {"bf16": torch.mm, "bf16-emulated": emulated_bf16_mm}
PRECISIONS = ("fp32", *BF16_PRODUCTS)          # of training (train.precision) and of evaluation
