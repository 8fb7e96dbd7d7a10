"""litert_torch's converter with one whole-program decomposition per signature, not two.

litert_torch 0.10's default converter (`Converter.convert`, core.convert_signatures) exports
each signature and then runs two `run_decompositions` over it, each a full re-trace of the
program through AOTAutograd, both forced (`can_skip=False`):
- `pre_convert_decomp`, right after torch.export, before litert_torch's FX passes;
- `pre_lower_decomp`, in `exported_program_to_mlir`, before lowering.
The second table holds the first (litert_torch's decomp.py adds every pre-convert
decomposition to the pre-lower table and removes a pre-lower one from both), and the second
trace also turns export's training IR into inference IR, so the first changes nothing that
reaches the lowering. litert_torch's own V2 converter (converter_v2.export_to_dir) skips it
for that reason: `export_torch_signature(..., run_decompositions=False)`, "the extra
AOTAutograd trace is expensive on large models". V2 itself needs a TensorFlow build with
`convert_mlir_bytecode`, which slmc does not install, so slmc keeps the default converter and
makes the same call V2 makes.

On SmolLM2-135M each of these traces took about 30 s of a 196 s LiteRT compile (bench/README.md).
The flatbuffer is byte-identical to the default converter's for every family and for float
and 8da4w weights (tests/test_tflite_decompositions.py; the family sweep is a slow test).
"""

from __future__ import annotations

import contextlib
import inspect


@contextlib.contextmanager
def pre_convert_decomposition_skipped():
    import litert_torch._convert.core as core

    export = core.export_torch_signature
    if "run_decompositions" not in inspect.signature(export).parameters:
        yield  # another litert_torch: its steps are not the ones read here; change nothing
        return

    def export_torch_signature(sig, *args, **kwargs):
        return export(sig, *args, **kwargs, run_decompositions=False)

    core.export_torch_signature = export_torch_signature
    try:
        yield
    finally:
        core.export_torch_signature = export
