"""AutoAWQ (GEMM) and GPTQ pre-quantized Hugging Face checkpoints as QuantWeights.

config.json's `quantization_config` says how each quantized linear `<base>` is stored: its
`<base>.weight` is replaced by packed int32 tensors. Integers are packed low bits first: lane k
of a word is (word >> k*b) & (2^b - 1), p = 32 / b lanes per word. g = group_size input columns
per group (-1: the whole row), G = in / g groups; scales are fp16 (bf16/fp32 accepted).

GPTQ (AutoGPTQ, GPTQModel, optimum; quant_method "gptq"), b in {4, 8}:
  qweight  int32 [in / p, out]  packed along the INPUT dim:  lane k of [r, o] = q[o, r*p + k]
  qzeros   int32 [G, out / p]   packed along the OUTPUT dim: lane k of [j, c] = z[c*p + k, j]
  scales         [G, out]
  g_idx    int32 [in]           each input column's group (optional; i // g when absent)
  w[o, i] = (q[o, i] - z[o, g_idx[i]]) * scales[g_idx[i], o]
  checkpoint_format "gptq" (v1, the default) stores z - 1 (AutoGPTQ's pack subtracts 1, its
  kernels add it back); "gptq_v2" (GPTQModel) stores z. sym=true quantizes with z = 2^(b-1).
AutoAWQ GEMM (quant_method "awq", version "gemm"), b = 4, packed along the OUTPUT dim in
AutoAWQ's interleaved order: lane k of a word holds column 8c + AWQ_ORDER[k] of its 8 columns.
  qweight  int32 [in, out / 8]
  qzeros   int32 [G, out / 8]   same packing; the zero itself, no offset
  scales         [G, out]
  w[o, i] = (q[o, i] - z[o, i // g]) * scales[i // g, o]

Onto QuantWeight [out, in] ((code - zero) * scale over contiguous groups of g), exactly:
  GPTQ sym=true with every zero at 2^(b-1): symmetric int8 codes q - 2^(b-1), zeros None
  otherwise (asymmetric GPTQ, AWQ):          uint8 codes q, float32 zeros z
A GPTQ act-order (desc_act) g_idx scatters each group over the input columns, which contiguous
groups cannot express: with keep_codes the exact dequantized weight is re-quantized with RTN at
the same bits, group size and symmetry (the added error is logged); without, it is dequantized.
Without keep_codes every quantized linear becomes its exact dequantized float32 matrix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import SlmcError, UnsupportedError
from ..ir import QuantWeight, Weight
from ..quant import QuantScheme, rtn
from .safetensors_source import SafetensorsSource

log = logging.getLogger("slmc")

SUPPORTED = ("awq", "gptq")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # lane k of a word holds column AWQ_ORDER[k] of its 8
AWQ_LANE_OF = tuple(AWQ_ORDER.index(j) for j in range(8))  # column j sits in lane AWQ_LANE_OF[j]
GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> offset added to the stored zeros
PARTS = ("qweight", "qzeros", "scales", "g_idx")
_DTYPES = {"qweight": ("I32",), "qzeros": ("I32",), "scales": ("F16", "BF16", "F32"), "g_idx": ("I32", "I64")}


@dataclass(frozen=True)
class PrequantConfig:
    method: str  # "gptq" | "awq"
    bits: int
    group_size: int  # -1: one group per row
    sym: bool  # GPTQ sym=true; AWQ GEMM always stores zero points
    zero_offset: int  # GPTQ v1 stores zero - 1
    where: str

    @property
    def algorithm(self) -> str:
        return f"{self.method}-import"

    def describe(self) -> str:
        g = "per row" if self.group_size < 0 else f"g{self.group_size}"
        return f"{'AutoAWQ GEMM' if self.method == 'awq' else 'GPTQ'} {self.bits}-bit {g}"


# ---------------------------------------------------------------- quantization_config


def _int(qc: dict, keys: tuple[str, ...], default, where: str) -> int:
    key = next((k for k in keys if k in qc), keys[0])
    v = qc.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise SlmcError(f"{key} must be an integer, got {v!r}", f"{where}.{key}")
    return v


def _group(qc: dict, keys: tuple[str, ...], where: str) -> int:
    g = _int(qc, keys, 128, where)  # 128: the default of transformers' GPTQConfig and AwqConfig
    if g == 0 or g < -1:
        raise SlmcError(f"group_size {g}: expected a positive size or -1 (one group per row)", where)
    return g


def _gptq(qc: dict, where: str) -> PrequantConfig:
    bits = _int(qc, ("bits",), None, where)
    if bits in (2, 3):
        raise UnsupportedError(f"GPTQ {bits}-bit checkpoints are not supported (4 or 8)", f"{where}.bits")
    if bits not in (4, 8):
        raise SlmcError(f"GPTQ bits {bits}: expected 2, 3, 4 or 8", f"{where}.bits")
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if fmt not in GPTQ_FORMATS:
        raise UnsupportedError(f"GPTQ checkpoint_format {fmt!r} is not supported; supported: "
                               f"{', '.join(GPTQ_FORMATS)}", where)
    if qc.get("dynamic"):
        raise UnsupportedError("GPTQModel per-module overrides (dynamic) are not supported", f"{where}.dynamic")
    if str(qc.get("pack_dtype", "int32")).removeprefix("torch.") != "int32":
        raise UnsupportedError(f"pack_dtype {qc['pack_dtype']!r} is not supported (int32)", f"{where}.pack_dtype")
    sym = qc.get("sym", True)
    if not isinstance(sym, bool):
        raise SlmcError(f"sym must be true or false, got {sym!r}", f"{where}.sym")
    return PrequantConfig("gptq", bits, _group(qc, ("group_size",), where), sym, GPTQ_FORMATS[fmt], where)


def _awq(qc: dict, where: str) -> PrequantConfig:
    # the packing: "version" (AutoAWQ, and what transformers writes) or "format" (transformers 5);
    # "backend" only picks a kernel, except the legacy "llm-awq", which packs in another order
    fmt = str(qc.get("version") or qc.get("format") or "gemm").lower()
    if str(qc.get("backend", "")).lower() == "llm-awq":
        fmt = "llm-awq"
    if fmt != "gemm":
        raise UnsupportedError(f"AWQ format {fmt!r} is not supported; supported: gemm", f"{where}.version")
    bits = _int(qc, ("bits", "w_bit"), 4, where)
    if bits != 4:
        raise UnsupportedError(f"AutoAWQ GEMM {bits}-bit is not supported (4)", f"{where}.bits")
    if qc.get("zero_point", True) is not True:  # AutoAWQ's GEMM packer cannot write one without
        raise UnsupportedError("AutoAWQ GEMM without zero points (zero_point=false) is not supported",
                               f"{where}.zero_point")
    return PrequantConfig("awq", 4, _group(qc, ("group_size", "q_group_size"), where), False, 0, where)


def read_prequant_config(cfg: dict, where: str) -> PrequantConfig | None:
    """The checkpoint's quantization settings (None: not pre-quantized). `where`: config.json."""
    qc = cfg.get("quantization_config")
    if qc is None:
        return None
    where = f"{where}:quantization_config"
    if not isinstance(qc, dict):
        raise SlmcError("expected a JSON object", where)
    method = str(qc.get("quant_method", "")).lower()
    if method == "gptq":
        return _gptq(qc, where)
    if method == "awq":
        return _awq(qc, where)
    raise UnsupportedError(f"pre-quantized checkpoints with quant_method {qc.get('quant_method')!r} are not "
                           f"supported; supported: {', '.join(SUPPORTED)}", where)


# ---------------------------------------------------------------- unpacking


def split_lanes(words: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., n] int32 words -> [..., n, 32 / bits] lanes, low bits first."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    return (words.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)  # the mask undoes sign extension


def unpack_cols(words: torch.Tensor, bits: int, lane_of: tuple[int, ...] | None = None) -> torch.Tensor:
    """[rows, n / p] words packed along the columns -> [rows, n]; column p*c + j is lane lane_of[j]."""
    lanes = split_lanes(words, bits)
    if lane_of is not None:
        lanes = lanes[..., list(lane_of)]
    return lanes.reshape(words.shape[0], -1)


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ qweight [in / p, out] packed along the input dim -> codes [out, in]."""
    return split_lanes(words.T, bits).reshape(words.shape[1], -1)


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-12))


@dataclass
class Unpacked:
    """One linear's integers, [out, in] and [out, G], before it becomes a QuantWeight."""

    q: torch.Tensor  # uint8 codes
    zeros: torch.Tensor  # float32 (the v1 offset applied)
    scales: torch.Tensor  # float32
    group_size: int
    g_idx: torch.Tensor | None  # None: contiguous groups i // g

    def symmetric(self, qc: PrequantConfig) -> bool:
        return qc.sym and bool((self.zeros == 2 ** (qc.bits - 1)).all())

    def exact(self, qc: PrequantConfig) -> QuantWeight:
        if self.symmetric(qc):
            codes = (self.q.to(torch.int16) - 2 ** (qc.bits - 1)).to(torch.int8)
            return QuantWeight(codes, self.scales, None, self.group_size, qc.bits, True, qc.algorithm)
        return QuantWeight(self.q, self.scales, self.zeros, self.group_size, qc.bits, False, qc.algorithm)

    def dequantized(self) -> torch.Tensor:
        gi = self.g_idx.long()
        return (self.q.float() - self.zeros[:, gi]) * self.scales[:, gi]


# ---------------------------------------------------------------- the source


class PrequantSource(SafetensorsSource):
    """SafetensorsSource whose quantized linears answer for `<base>.weight`: a QuantWeight with
    the checkpoint's own codes (keep_codes) or a lazily dequantized float32 Weight."""

    def __init__(self, files: list[Path], qc: PrequantConfig, keep_codes: bool = False):
        super().__init__(files)
        self.qc, self.keep_codes = qc, keep_codes
        self.requantized: list[tuple[str, float]] = []  # act-order weights re-rounded with RTN

    def _base(self, name: str) -> str | None:
        if name.endswith(".weight") and name not in self._where:
            base = name[: -len(".weight")]
            if base + ".qweight" in self._where:
                return base
        return None

    def has(self, name: str) -> bool:
        return super().has(name) or self._base(name) is not None

    def describe(self, name: str) -> str:
        base = self._base(name)
        return super().describe(f"{base}.qweight" if base else name)

    def _shapes(self, base: str) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for part in PARTS if self.qc.method == "gptq" else PARTS[:3]:  # AutoAWQ writes no g_idx
            name = f"{base}.{part}"
            if name not in self._where:
                if part == "g_idx":
                    continue
                raise SlmcError(f"{name} is missing ({self.qc.describe()} layers need qweight, qzeros and "
                                "scales)", self.describe(f"{base}.qweight"))
            info = self._where[name][1]
            if info["dtype"] not in _DTYPES[part]:
                raise SlmcError(f"dtype {info['dtype']}; {part} must be {' or '.join(_DTYPES[part])}",
                                self.describe(name))
            shapes[part] = tuple(info["shape"])
            if len(shapes[part]) != (1 if part == "g_idx" else 2):
                raise SlmcError(f"{part} has shape {list(shapes[part])}", self.describe(name))
        return shapes

    def layout(self, base: str) -> tuple[int, int, int]:
        """(out, in, group size) of a packed linear, every part's shape checked against them."""
        qc, shapes = self.qc, self._shapes(base)
        per = 32 // qc.bits
        n_groups, out = shapes["scales"]
        rows = shapes["qweight"][0]
        inp = rows * per if qc.method == "gptq" else rows
        g = qc.group_size if qc.group_size > 0 else inp
        if inp % g:
            raise SlmcError(f"group size {g} does not divide the input dimension {inp} (qweight "
                            f"{list(shapes['qweight'])}, {qc.describe()})", self.describe(f"{base}.qweight"))
        if out % per:
            raise SlmcError(f"{out} output features cannot be packed {per} per int32 ({qc.describe()})",
                            self.describe(f"{base}.scales"))
        want = {"qweight": (inp // per, out) if qc.method == "gptq" else (inp, out // per),
                "qzeros": (inp // g, out // per), "scales": (inp // g, out), "g_idx": (inp,)}
        for part in ("qweight", "scales", "qzeros", "g_idx"):  # qweight first: it names the culprit best
            if part in shapes and shapes[part] != want[part]:
                raise SlmcError(f"{part} has shape {list(shapes[part])}, but a {qc.describe()} weight "
                                f"[{out}, {inp}] ({n_groups} groups in scales) packs it as {list(want[part])}",
                                self.describe(f"{base}.{part}"))
        return out, inp, g

    def unpack(self, base: str) -> Unpacked:
        qc = self.qc
        out, inp, g = self.layout(base)
        scales = self._load(f"{base}.scales").float().T.contiguous()
        if not bool(scales.isfinite().all()):
            raise SlmcError("scales contain NaN or Inf", self.describe(f"{base}.scales"))
        qweight, qzeros = self._load(f"{base}.qweight"), self._load(f"{base}.qzeros")
        lane_of = AWQ_LANE_OF if qc.method == "awq" else None
        q = unpack_rows(qweight, qc.bits) if qc.method == "gptq" else unpack_cols(qweight, qc.bits, lane_of).T
        zeros = unpack_cols(qzeros, qc.bits, lane_of).T.float() + qc.zero_offset
        g_idx = None
        if f"{base}.g_idx" in self._where:
            g_idx = self._load(f"{base}.g_idx").long()
            if bool(((g_idx < 0) | (g_idx >= inp // g)).any()):
                raise SlmcError(f"g_idx values {int(g_idx.min())}..{int(g_idx.max())} are outside the "
                                f"{inp // g} groups", self.describe(f"{base}.g_idx"))
            if torch.equal(g_idx, torch.arange(inp) // g):
                g_idx = None  # contiguous groups (desc_act=false, or static groups): codes kept as they are
        return Unpacked(q.to(torch.uint8).contiguous(), zeros.contiguous(), scales, g, g_idx)

    def codes(self, base: str) -> QuantWeight:
        u = self.unpack(base)
        if u.g_idx is None:
            return u.exact(self.qc)
        w = u.dequantized()
        scheme = QuantScheme(self.qc.bits, u.group_size, u.symmetric(self.qc))
        qw = rtn(w, scheme, algorithm=f"{self.qc.algorithm}+requant")
        self.requantized.append((base, rel_rms(qw.float(), w)))
        return qw

    def dequantized(self, base: str) -> torch.Tensor:
        u = self.unpack(base)
        return u.exact(self.qc).float() if u.g_idx is None else u.dequantized()

    def weight(self, name: str) -> Weight | QuantWeight:
        base = self._base(name)
        if base is None:
            return super().weight(name)
        out, inp, _ = self.layout(base)  # shapes are checked before anything loads
        self.used.update(n for p in PARTS if (n := f"{base}.{p}") in self._where)
        if self.keep_codes:
            return self.codes(base)
        return Weight(shape=(out, inp), dtype="float32", loader=lambda: self.dequantized(base))

    def report(self) -> None:
        """One warning for every act-order weight re-rounded at import (keep_codes)."""
        if not self.requantized:
            return
        errs = [e for _, e in self.requantized]
        worst = max(self.requantized, key=lambda t: t[1])
        log.warning("%s: %d GPTQ act-order (desc_act) weights scatter their groups over the input columns, "
                    "which contiguous groups cannot hold: re-quantized with RTN (%d-bit, same group size and "
                    "symmetry), added relative RMS error mean %.4f, max %.4f (%s)", self.qc.where,
                    len(errs), self.qc.bits, sum(errs) / len(errs), worst[1], worst[0])


def open_source(files: list[Path], cfg: dict, cfg_where: str, keep_codes: bool) -> SafetensorsSource:
    """The TensorSource for a Hugging Face folder: packed AWQ/GPTQ linears unpacked when its
    config says so; a packed checkpoint without that config is refused."""
    qc = read_prequant_config(cfg, cfg_where)
    if qc is not None:
        return PrequantSource(files, qc, keep_codes)
    src = SafetensorsSource(files)
    packed = next((n for n in src.names() if n.endswith(".qweight")), None)
    if packed is not None:
        raise SlmcError(f"tensor {packed!r} is packed-quantized, but config.json has no quantization_config "
                        f"(supported: {', '.join(SUPPORTED)})", src.describe(packed))
    return src
