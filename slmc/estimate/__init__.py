"""An estimate of prefill and decode speed and peak memory of a model on a named phone: the
bytes each token reads and the operations it performs (costs.py), the phone's bandwidth,
compute peak and clock (devices.py), and a runtime's parameters (runtimes.py, fitted to
published phone figures in published.py by fit.py).

    decode s/token  = bytes / (bandwidth x eff_bw) + layers x overhead_cycles / clock
    prefill s/T tok = ops / (peak x eff_compute)
    peak memory     = weights + KV cache at max_len + activations + the runtime's overhead
"""

from __future__ import annotations

from .costs import Scheme, Shape, Storage, decode_cost, memory, prefill_cost
from .devices import DEVICES, Device, device
from .fit import FORMS, NotEstimable, Point, fit, leave_one_out, predict
from .published import FLOWS, PUBLISHED, Figure
from .runtimes import RUNTIMES, Runtime, runtime
from .subject import Quant, quant_of, shape_of, storage_of, unties

MiB = 1 << 20


def arithmetic(st: Storage) -> str:
    """What the projections compute in: int8 with int8 activations, else the float width."""
    return "int8" if st.linear.act_bits == 8 else "fp32" if st.float_bits == 32 else "fp16"


def terms(shape: Shape, dec: dict, pre: dict, dev: Device, unit: str, kind: str) -> dict:
    """Each term of the time per token at parameter 1 (what fit.py fits the parameters on)."""
    return {"decode": {"memory_s": dec["bytes"] / (dev.bandwidth_gbs * 1e9),
                       "layer_cycles_s": shape.layers / (dev.clock_ghz * 1e9)},
            "prefill": {"compute_s": pre["ops"] / (dev.peak(unit, kind) * 1e9)}}


def estimate(shape: Shape, st: Storage, dev: Device, rt: Runtime, max_len: int, prompt_len: int = 64,
             decode_tokens: int = 128, ring: int | None = None) -> dict:
    """The estimate as a plain dict (what `slmc estimate --json` prints). Decode is costed at
    the middle of a generation of `decode_tokens` after a `prompt_len`-token prompt."""
    kind = arithmetic(st)
    pos = min(prompt_len + decode_tokens // 2, max_len - 1)
    dec = decode_cost(shape, st, pos, ring)
    pre = prefill_cost(shape, st, prompt_len, ring)
    x = terms(shape, dec, pre, dev, rt.unit, kind)
    t_mem, t_over = x["decode"]["memory_s"] / rt.eff_bw, x["decode"]["layer_cycles_s"] * rt.overhead_cycles
    t_dec, dec_bound = t_mem + t_over, "memory" if t_mem >= t_over else "overhead"
    t_pre, pre_bound = x["prefill"]["compute_s"] / rt.eff_compute, "compute"
    mem = memory(shape, st, max_len, prompt_len, ring)
    peak = sum(mem.values()) / MiB + rt.overhead_mib
    return {
        "device": dev.name, "soc": dev.soc, "runtime": rt.key, "runtime_name": rt.name, "unit": rt.unit,
        "arithmetic": kind, "bandwidth_gbs": round(dev.bandwidth_gbs, 1),
        "peak_gops": round(dev.peak(rt.unit, kind), 1), "threads": dev.threads if rt.unit == "cpu" else None,
        "clock_ghz": round(dev.clock_ghz, 3), "layers": shape.layers,
        "eff_bw": rt.eff_bw, "overhead_cycles": rt.overhead_cycles, "eff_compute": rt.eff_compute,
        "fitted_on": list(rt.figures),
        "storage": {"linear": st.linear.describe(), "embedding": st.embed.describe(), "head": st.head.describe(),
                    "kv_bits": st.kv_bits},
        "max_len": max_len, "prompt_len": prompt_len, "decode_position": pos,
        "decode": {"tok_s": 1 / t_dec, "bound": dec_bound, "bytes_per_token": dec["bytes"],
                   "ops_per_token": dec["ops"], "weight_bytes": dec["weight_bytes"],
                   "kv_read_bytes": dec["kv_read_bytes"], "embed_row_bytes": dec["embed_row_bytes"],
                   "memory_ms": t_mem * 1e3, "overhead_ms": t_over * 1e3, "terms": x["decode"]},
        "prefill": {"tok_s": prompt_len / t_pre, "bound": pre_bound, "bytes": pre["bytes"], "ops": pre["ops"],
                    "terms": {k: v / prompt_len for k, v in x["prefill"].items()}},
        "memory_mib": {**{k: v / MiB for k, v in mem.items()}, "runtime_overhead": rt.overhead_mib,
                       "peak": peak},
        "sources": {"memory": dev.memory_source, "cpu": dev.cpu_source, "accelerators": dev.accel_source,
                    "efficiency": rt.source, "assumed": list(dev.assumed), "note": dev.note},
    }


__all__ = ["FORMS", "FLOWS", "PUBLISHED", "Figure", "NotEstimable", "Point", "fit", "leave_one_out", "predict",
           "terms", "DEVICES", "RUNTIMES", "Device", "Runtime", "Scheme", "Shape", "Storage", "Quant", "device",
           "runtime",
           "estimate", "shape_of", "storage_of", "unties", "quant_of", "decode_cost", "prefill_cost", "memory", "arithmetic"]
