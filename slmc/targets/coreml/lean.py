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

lean_conversion adds what keeps a conversion's weights off the heap and out of the RSS
(bench/results/memory.md, phases of the Core ML compile):
- reduce_transposes re-infers every op after its rewrite, consts too, and each const's check
  `np.any(new != old)` compares the whole weight with itself: every fp32 page is read back
  (the checkpoint's mapped file) and a bool copy made. A const's value cannot change, so its
  re-inference is skipped;
- the fp16 cast of each fp32 weight (cast's value inference, numpy's astype) is written to an
  unlinked scratch file a chunk at a time and mapped back, the fp32 pages it read let go:
  the fp16 program's weights are file pages, not 260 MiB of heap for SmolLM2-135M;
- the serializer writes each float constant from the array itself (coremltools' own branch
  copies it twice first, flatten then tobytes) and lets its pages go once written.
Values are unchanged: the same numpy casts, the same bytes in the package. Letting pages go
(spill.let_go) is safe for these arrays because nothing writes into a constant's storage: its
private mapping has no page of its own to lose.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from ...compiler import spill as _spill

CHUNK = 1 << 20  # values per step: 4 MiB of fp32 and its bool masks
FP16_MAX, INF_LIKE = 65504, 1e38  # coremltools' bounds: above 1e38 counts as infinity (masks)


def overflows_fp16(value) -> bool:
    """Whether a finite (|x| < 1e38) value of `value` is beyond fp16's range."""
    flat = np.asarray(value).reshape(-1)
    read = _spill.releaser(flat)  # each part is read once here: a mapped file's pages go
    for a in range(0, flat.size, CHUNK):
        m = np.abs(flat[a:a + CHUNK])
        read(flat[a:a + CHUNK])
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


@contextmanager
def lean_conversion():
    """Within: one coremltools conversion with lean_fp16_check and the three changes in this
    module's docstring; everything is restored after."""
    from coremltools.converters.mil.backend.mil import helper
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.operation import Operation
    from coremltools.converters.mil.mil.ops.defs.iOS15.elementwise_unary import cast

    reinfer, cast_value, write = Operation.type_value_inference, cast.__dict__["get_cast_value"], \
        helper._get_offset_by_writing_data
    scratch = _spill.Spill("coremltools fp16 weights")

    def type_value_inference(self, overwrite_output=False):
        if overwrite_output and self.op_type == "const" and self._output_vars is not None:
            return None  # a const's type and value cannot change
        return reinfer(self, overwrite_output)

    def get_cast_value(cls, input_var, dtype_val):
        v = input_var.val
        if dtype_val == "fp16" and isinstance(v, np.ndarray) and v.dtype == np.float32 and v.nbytes >= _spill.MIN_BYTES:
            return scratch.converted_array(v, np.float16)
        return cast_value.__func__(cls, input_var, dtype_val)

    def writing_data(output_var, blob_writer):
        val = output_var.val
        if (output_var.dtype in (types.fp16, types.fp32) and isinstance(val, np.ndarray)
                and val.dtype in (np.float16, np.float32) and val.flags.c_contiguous):
            # coremltools' own branch copies the constant first (flatten, and tobytes for fp16)
            flat = val.reshape(-1)
            offset = (blob_writer.write_fp16_data(flat.view(np.uint16)) if val.dtype == np.float16
                      else blob_writer.write_float_data(flat))
        else:
            offset = write(output_var, blob_writer)
        if isinstance(val, np.ndarray):
            _spill.let_go(_spill.array_ranges([val]))
        return offset

    Operation.type_value_inference = type_value_inference
    cast.get_cast_value = classmethod(get_cast_value)
    helper._get_offset_by_writing_data = writing_data
    try:
        with lean_fp16_check():
            yield
    finally:
        Operation.type_value_inference, helper._get_offset_by_writing_data = reinfer, write
        cast.get_cast_value = cast_value
