"""coremltools' fp16 cast pass, without its whole-constant temporaries.

Converting at compute precision fp16, coremltools asks of every op's fp32 constant whether a
finite value overflows fp16 (FP16ComputePrecision.fp16_overflow) with
`np.max(abs_value[np.where(abs_value < 1e38)])`: a float copy, two int64 index arrays and a
gathered copy of the whole constant, about 6x its bytes at once (680 MiB for SmolLM2's tied
113 MiB table; bench/results/memory.md has the phase). The same question, a chunk at a time:
is there a value with 65504 < |x| < 1e38 (NaN compares false in both)?
Then, casting each constant, it tests `len(var.val.flatten()) < 400` (a copy of the constant to
learn its size) before looking for values that underflow to zero; big constants are skipped
by that test, and np.size answers it without the copy.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

CHUNK = 1 << 20  # values per step: 4 MiB of fp32 and its bool masks
FP16_MAX, INF_LIKE = 65504, 1e38  # coremltools' bounds: above 1e38 counts as infinity (masks)


def overflows_fp16(value) -> bool:
    """Whether a finite (|x| < 1e38) value of `value` is beyond fp16's range."""
    flat = np.asarray(value).reshape(-1)
    for a in range(0, flat.size, CHUNK):
        m = np.abs(flat[a:a + CHUNK])
        if np.any((m > FP16_MAX) & (m < INF_LIKE)):
            return True
    return False


def _fp16_overflow(op) -> bool:
    """FP16ComputePrecision.fp16_overflow's walk over the op's fp32 constants, with the
    chunked test."""
    for _, inputs in op.inputs.items():
        for var in inputs if isinstance(inputs, (list, tuple)) else [inputs]:
            if var.op is not None and var.op.op_type == "const" and var.is_tensor_or_scalar_of(dtype="fp32"):
                if overflows_fp16(var.op.val.val):
                    return True
    return False


UNDERFLOW_MAX_SIZE = 400  # coremltools looks for fp16 underflow in constants smaller than this


@contextmanager
def lean_fp16_check():
    """coremltools' FP16ComputePrecision answers with overflows_fp16 while converting, and
    skips the underflow search for big constants without copying them."""
    from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision as P

    overflow, underflow = P.__dict__["fp16_overflow"], P.__dict__["_check_underflow_to_zero"]

    def check_underflow(self, new_var, var):
        if new_var.val is None or np.size(var.val) >= UNDERFLOW_MAX_SIZE:
            return None  # what coremltools' own test concludes for these
        return underflow(self, new_var, var)

    P.fp16_overflow = staticmethod(lambda op: _fp16_overflow(op))  # a staticmethod there too
    P._check_underflow_to_zero = check_underflow
    try:
        yield
    finally:
        P.fp16_overflow, P._check_underflow_to_zero = overflow, underflow
