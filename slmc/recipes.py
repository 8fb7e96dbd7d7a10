"""Recipes: named, frozen pass lists, each with the flows it is legal for.

A recipe is what an app developer asks for by name (`--recipe int8da-int4w-g32`); it
expands to ordinary passes, so `--dump-ir` and the manifest show exactly what ran.
Legality is checked before any pass runs (calibration can take minutes), and the
target's own quantization rules check the result again before lowering.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import SlmcError


@dataclass(frozen=True)
class Recipe:
    name: str
    passes: tuple[str, ...]
    flows: tuple[str, ...]  # "target" or "target:backend" it is built for
    about: str
    measured: str = ""  # "FILE.json:row" in bench/results measuring its method (`slmc list` shows it)
    calib_only: str = ""  # why the recipe refuses to run without --calib ("" : data-free is allowed)

    def legal_for(self, target: str, backend: str) -> bool:
        return target in self.flows or f"{target}:{backend.split(':')[0]}" in self.flows


RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
_XNN = "scale_dtype=bfloat16,act_bits=8,symmetric=true"
_CML = "scale_dtype=float16,symmetric=true"
# Every int4 recipe quantizes the embedding and the head too (issue 17): left in float, the
# tied 49152 x 576 table alone is most of SmolLM2's artifact. XNNPACK holds 8-bit weights per
# channel only, so the head is quantized as a linear (GPTQ, 8da) and the embedding takes its
# codes (quant.gptq share_tied): one table, stored once by LiteRT (one tensor) and ExecuTorch
# (model.ptd, which embedding_byte/embedding_4bit and the XNNPACK head both read).
_ENDS8 = "embed_bits=8,head_bits=8,ends_group_size=0"  # int8 rows: near float quality
_ENDS4 = "embed_bits=4,head_bits=4"  # int4 g32: half the bytes the decode reads for the head
_SHARED8 = "embed_bits=8,ends_group_size=0"  # a tied table stays one table, int8 rows
# The block linears' method, by measurement on text no calibration saw (SmolLM2-135M, int4 g32,
# Northanger Abbey, bench/results/quant_calib.md): AWQ's scale search folded into the weights, then
# GPTQ with its clip search quantizes. Data-free (what a recipe does without --calib) +10.0 %, against
# GPTQ alone +13.0 % (first token BOS +11.6 %), AWQ alone +13.6 %, the GPTQ before +23.7 %; with
# calibration text +6.9 % against GPTQ +7.6 % and AWQ +12.7 %. quant.rotate helps only GPTQ and makes
# AWQ worse (bench/results/quant_rotate.md), so no recipe rotates. Since 1a6e25b GPTQ takes AWQ's
# data-free samples instead of drawing its own (half the sampling time): +10.7 % measured, within the
# seed spread of the two-draw +10.0 % (data-free 64x256: +9.1 % seed 0, +10.4 % seed 1).
_CITE = ("method chosen by bench/results/quant_calib.md (data-free: AWQ scales + GPTQ +10.0 %, +10.7 % with one "
         "sample draw for both passes as run now; GPTQ +13.0 %, AWQ +13.6 %)")
_MEASURED = "quant_calib.json:awq-scales+gptq clip samples carried"  # embedding and head float there


_AR_AMOUNT = "n_seqs=64,seq_len=256"  # 16k calibration tokens for both passes, as the row measured
_AR_STEPS = "iters=200,batch=4"  # AutoRound's default; 100 measured +5.2 %, 200 +3.6 %


def _int4(scheme: str) -> tuple[str, str]:
    """The recipes' int4 g32 method: AWQ's scales searched and folded (no quantizer), then GPTQ
    (act-order, clip search) quantizes in the target's `scheme`."""
    return ("quant.awq:bits=4,group_size=32,quantize=false", f"quant.gptq:bits=4,group_size=32,{scheme}")


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    # ExecuTorch's own Llama export (-qmode 8da4w -E 4,32) quantizes the output head and the
    # embedding too; left in float, the tied table alone is most of a small model's .pte
    Recipe("int8da-int4w-g32", _int4(f"{_XNN},{_ENDS4}"),
           ("executorch:xnnpack", "tflite"),
           "XNNPACK 8da4w: AWQ scales + GPTQ int4 weights in groups of 32 (bf16 scales; data-free calibration unless "
           "--calib), int8 dynamic activations; head 8da4w (GPTQ) and embedding int4 g32 looking up the head's "
           "codes: one table, stored once (ExecuTorch: model.ptd). The smallest and fastest int4 recipe; its int4 "
           "head costs quality: data-free +19.1 % perplexity, calibrated +12.4 %, against int4-g32-xnnpack's "
           "+14.3 / +10.1 % (bench/results/quant_split.md; the RTN head before: +29.9 %)",
           "quant_split.json:int8da-int4w-g32"),
    # the old int8da-int4w-g32 pass: the same artifact layout, compiled in seconds instead of
    # minutes of calibration, and what torchao's RTN exports give (to compare compile times)
    Recipe("int8da-int4w-g32-rtn", (f"quant.rtn:bits=4,group_size=32,{_XNN},{_ENDS4}",),
           ("executorch:xnnpack", "tflite"),
           "int8da-int4w-g32 with round-to-nearest codes: no calibration, so a fast compile, but +53.9 % "
           "perplexity (bench/results/quant_split.md)", "quant_split.json:int8da-int4w-g32-rtn"),
    Recipe("int8da-int8w", (f"quant.rtn:bits=8,group_size=0,{_XNN},{_ENDS8}",), ("executorch:xnnpack", "tflite"),
           "XNNPACK 8da8w: int8 weights per channel, int8 dynamic activations; head 8da8w, embedding int8 rows"),
    Recipe("int4-g32-xnnpack", _int4(f"{_XNN},{_ENDS8}"),
           ("executorch:xnnpack", "tflite"),
           "AWQ scales + GPTQ int4 g32 (data-free calibration unless --calib) for XNNPACK's 8da4w (ExecuTorch, or "
           "LiteRT's CPU); head 8da8w (GPTQ) and embedding int8 rows (quality first): data-free +14.3 %, calibrated "
           f"+10.1 % (bench/results/quant_split.md); {_CITE}", "quant_split.json:int4-g32-xnnpack"),
    Recipe("int4-g32-xnnpack-mixed", (_int4(f"{_XNN},{_ENDS8}")[0], "quant.mixed:budget=0.1,bits=4,group_size=32",
                                      _int4(f"{_XNN},{_ENDS8}")[1]),
           ("executorch:xnnpack", "tflite"),
           "int4-g32-xnnpack with quant.mixed: the block linears whose rounding costs most (by a Fisher estimate on "
           "the calibration tokens) take 10 % more bytes at int8 per channel (8da8w), the rest AWQ scales + GPTQ int4 "
           "g32; head 8da8w, embedding int8 rows. The most accurate 8da recipe measured: data-free +8.0 % against "
           "int4-g32-xnnpack's +11.8 % in the same run (+14.3 % re-measured at one thread), with --calib +4.7 % "
           "(bench/results/quant_split.md); end to end with --calib, "
           ".pte +4.7 % and .tflite +4.4 % (bench/results/quant_e2e.md)", "quant_split.json:int4-g32-xnnpack + quant.mixed 10 %"),
    # AutoRound (signed-gradient rounding per block) after AWQ's scales: the best calibrated method measured,
    # +3.6 % at 200 steps per block (+5.2 % at 100) against AWQ scales + GPTQ's +7.4 % on the same 16k tokens;
    # data-free it loses (+10.2 % against +9.1 %, 200 steps on 64x256 sampled tokens) for ~20x the compile
    # time, so it needs --calib
    Recipe("int4-g32-xnnpack-autoround",
           (f"quant.awq:bits=4,group_size=32,quantize=false,{_AR_AMOUNT}",
            f"quant.autoround:bits=4,group_size=32,{_AR_AMOUNT},{_AR_STEPS},{_XNN},{_ENDS8}"),
           ("executorch:xnnpack", "tflite"),
           "int4-g32-xnnpack's layout (8da4w block linears, head 8da8w, embedding int8 rows) with AutoRound's "
           "learned rounding after AWQ's scales, on 64 x 256 tokens of your --calib text: the most accurate int4 "
           "g32 method measured, +3.6 % weight-only against +7.4 % for AWQ scales + GPTQ on the same tokens "
           "(bench/results/quant_calib.md), end to end in the .tflite with int8 activations +5.1 % "
           "(bench/results/quant_e2e.md); slow: 52 min for SmolLM2-135M on one thread, ~20x GPTQ's",
           "quant_calib.json:awq-scales+autoround calibrated 64x256 iters 200",
           calib_only="without calibration text AutoRound is worse than AWQ scales + GPTQ (data-free +10.2 % "
                      "against +9.1 %, bench/results/quant_calib.md) and takes ~20x as long: pass --calib FILE, "
                      "or use int4-g32-xnnpack"),
    Recipe("gptq-int4-g32-xnnpack", (f"quant.gptq:bits=4,group_size=32,act_order=true,clip=true,{_XNN},{_ENDS8}",),
           ("executorch:xnnpack", "tflite"),
           "GPTQ int4 g32 (act-order, Hessian-weighted clip search) for XNNPACK's 8da4w, head 8da8w, embedding "
           "int8 rows: data-free +13.0 % (without the clip search +23.7 %), with your --calib text +7.6 % "
           "(bench/results/quant_calib.md)",
           "quant_calib.json:gptq clip"),
    Recipe("awq-int4-g32-xnnpack", (f"quant.awq:bits=4,group_size=32,{_XNN},{_ENDS8}",),
           ("executorch:xnnpack", "tflite"),
           "AWQ int4 g32 alone for XNNPACK's 8da4w (ExecuTorch, or LiteRT's CPU); head 8da8w, embedding int8 rows: "
           "data-free +13.6 %, calibrated +12.7 % (bench/results/quant_calib.md)", "quant_calib.json:awq"),
    Recipe("int4-g32-coreml", _int4(f"{_CML},{_ENDS8}"), ("coreml",),
           "AWQ scales + GPTQ int4 g32 with fp16 scales: constexpr_blockwise_shift_scale, exact in fp16 compute; "
           f"head and embedding int8 rows; {_CITE}", _MEASURED),
    Recipe("int4-g32-litert", _int4(f"symmetric=true,{_SHARED8}"), ("tflite",),
           "AWQ scales + GPTQ int4 g32 with float32 scales and one int8 table for the embedding and the tied head, "
           "float activations: exact, but grouped weights are dequantized on every call (decode slower "
           f"than fp32; int4-g32-xnnpack is the fast one); {_CITE}", _MEASURED),
    Recipe("int8-litert", ("quant.rtn:bits=8,group_size=0,symmetric=true,embed_bits=8",), ("tflite",),
           "int8 weights and embedding per channel (per-axis DEQUANTIZE, runs once at load)"),
    Recipe("int4-g32-onnx", ("quant.rtn:bits=4,group_size=32,symmetric=true,embed_bits=8",), ("onnx",),
           "onnxruntime-genai's int4: RTN int4 g32 weights as MatMulNBits (fp32 scales, float activations) and "
           "an int8 g32 embedding (GatherBlockQuantized; the tied head reads the same codes through MatMulNBits); "
           "RTN as the model builder does: AWQ is not yet measured on this target (bench/results/compile_targets.md)"),
    Recipe("int8-coreml", (f"quant.rtn:bits=8,group_size=0,{_CML},{_ENDS8}",), ("coreml",),
           "int8 weights per channel, fp16 scales; head and embedding int8 rows"),
)}


def measured_quality(r: Recipe) -> str:
    """What bench/results measured for this recipe's method (`measured` = "FILE.json:row"): the
    perplexity increase over fp32 on text no calibration saw (mean over the texts) and the
    weights' size; "not measured" without such a row (or without the results, e.g. installed)."""
    stem, _, variant = r.measured.partition(":")
    path = RESULTS / stem
    if not variant or not path.is_file():
        return "not measured"
    data = json.loads(path.read_text())
    # quant_calib.json rows ("variant"): the block linears' method weight-only; quant_split.json
    # rows ("row"): a recipe's own passes, int8 activations and quantized ends included
    rows = {x.get("variant", x.get("row")): x for x in data["rows"] if "perplexity" in x}
    row, base = rows.get(variant), rows.get("fp32")
    if row is None or base is None:
        return "not measured"
    ppl, ref = row["perplexity"], base["perplexity"]
    if not isinstance(ppl, dict):  # one evaluation text
        ppl, ref = {"text": ppl}, {"text": ref}
    d = [100 * (ppl[t] / ref[t] - 1) for t in ref if t in ppl]  # the texts the row was evaluated on
    if not d:
        return "not measured"
    how = "weight-only" if "variant" in row else "the recipe's passes in slmc's reference executor"
    kind = row.get("kind") or ("calibrated" if "--calib" in variant else "data-free")
    return (f"measured {sum(d) / len(d):+.1f} % perplexity ({kind}, {how}, mean of "
            f"{len(d)} unseen text{'s' if len(d) > 1 else ''}; weights {row['weight_bytes'] / 2**20:.0f} MiB in that row) "
            f"(bench/results/{stem.replace('.json', '.md')}: {variant})")


def recipe_passes(name: str, target: str, backend: str) -> list[str]:
    """The recipe's passes for a flow. Every runtime stores a tied table quantized at one scheme
    once (LiteRT: one tensor; ExecuTorch: model.ptd), so GPTQ's share_tied stays on everywhere."""
    if name not in RECIPES:
        raise SlmcError(f"unknown recipe {name!r}; recipes: {', '.join(RECIPES)}", "--recipe")
    r = RECIPES[name]
    if not r.legal_for(target, backend):
        fits = [n for n, x in RECIPES.items() if x.legal_for(target, backend)]
        raise SlmcError(f"recipe {name} is built for {', '.join(r.flows)}, not {target}:{backend}; "
                        f"recipes for this flow: {', '.join(fits) or 'none'}",
                        "--recipe")
    return list(r.passes)


def check_calibration(name: str, calib) -> None:
    """A calib_only recipe without --calib: refused before any pass runs."""
    r = RECIPES.get(name)
    if r is not None and r.calib_only and not calib:
        raise SlmcError(f"recipe {name} needs --calib: {r.calib_only}", "--recipe")
