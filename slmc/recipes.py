"""Recipes: named, frozen pass lists, each with the flows it is legal for.

A recipe is what an app developer asks for by name (`--recipe int8da-int4w-g32`); it
expands to ordinary passes, so `--dump-ir` and the manifest show exactly what ran.
Legality is checked before any pass runs (calibration can take minutes), and the
target's own quantization rules check the result again before lowering.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SlmcError


@dataclass(frozen=True)
class Recipe:
    name: str
    passes: tuple[str, ...]
    flows: tuple[str, ...]  # "target" or "target:backend" it is built for
    about: str

    def legal_for(self, target: str, backend: str) -> bool:
        return target in self.flows or f"{target}:{backend.split(':')[0]}" in self.flows


_XNN = "scale_dtype=bfloat16,act_bits=8,symmetric=true"
_CML = "scale_dtype=float16,symmetric=true"

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    # ExecuTorch's own Llama export (-qmode 8da4w -E 4,32) quantizes the output head and the
    # embedding too; left in float, the tied table alone is most of a small model's .pte
    Recipe("int8da-int4w-g32", (f"quant.rtn:bits=4,group_size=32,{_XNN},head_bits=4,embed_bits=4",),
           ("executorch:xnnpack", "tflite"),
           "XNNPACK 8da4w: int4 weights in groups of 32 (bf16 scales), int8 dynamic activations; "
           "head 8da4w and embedding int4 g32 (ExecuTorch embedding_4bit; LiteRT looks up the rows' codes)"),
    Recipe("int8da-int8w", (f"quant.rtn:bits=8,group_size=0,{_XNN}",), ("executorch:xnnpack", "tflite"),
           "XNNPACK 8da8w: int8 weights per channel, int8 dynamic activations"),
    Recipe("int4-g32-xnnpack", (f"quant.gptq:bits=4,group_size=32,{_XNN}",), ("executorch:xnnpack", "tflite"),
           "GPTQ int4 g32 (data-free calibration unless calib= is given) for XNNPACK's 8da4w "
           "(ExecuTorch, or LiteRT's CPU)"),
    Recipe("awq-int4-g32-xnnpack", (f"quant.awq:bits=4,group_size=32,{_XNN}",), ("executorch:xnnpack", "tflite"),
           "AWQ int4 g32 for XNNPACK's 8da4w (ExecuTorch, or LiteRT's CPU)"),
    Recipe("int4-g32-coreml", (f"quant.gptq:bits=4,group_size=32,{_CML}",), ("coreml",),
           "GPTQ int4 g32 with fp16 scales: constexpr_blockwise_shift_scale, exact in fp16 compute"),
    Recipe("int4-g32-litert", ("quant.gptq:bits=4,group_size=32,symmetric=true,embed_bits=8",), ("tflite",),
           "GPTQ int4 g32 with float32 scales and an int8 embedding table, float activations: exact, "
           "but grouped weights are dequantized on every call (decode slower than fp32; "
           "int4-g32-xnnpack is the fast one)"),
    Recipe("int8-litert", ("quant.rtn:bits=8,group_size=0,symmetric=true,embed_bits=8",), ("tflite",),
           "int8 weights and embedding per channel (per-axis DEQUANTIZE, runs once at load)"),
    Recipe("int4-g32-onnx", ("quant.rtn:bits=4,group_size=32,symmetric=true,embed_bits=8",), ("onnx",),
           "onnxruntime-genai's int4: RTN int4 g32 weights as MatMulNBits (fp32 scales, float activations) and "
           "an int8 g32 embedding (GatherBlockQuantized; the tied head reads the same codes through MatMulNBits)"),
    Recipe("int8-coreml", (f"quant.rtn:bits=8,group_size=0,{_CML}",), ("coreml",),
           "int8 weights per channel, fp16 scales"),
)}


def recipe_passes(name: str, target: str, backend: str) -> list[str]:
    if name not in RECIPES:
        raise SlmcError(f"unknown recipe {name!r}; recipes: {', '.join(RECIPES)}", "--recipe")
    r = RECIPES[name]
    if not r.legal_for(target, backend):
        fits = [n for n, x in RECIPES.items() if x.legal_for(target, backend)]
        raise SlmcError(f"recipe {name} is built for {', '.join(r.flows)}, not {target}:{backend}; "
                        f"recipes for this flow: {', '.join(fits) or 'none'}",
                        "--recipe")
    return list(r.passes)
