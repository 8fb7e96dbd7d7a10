"""A roofline estimate of prefill and decode speed and peak memory of a model on a named
phone: the bytes each token reads and the operations it performs (costs.py), the phone's
bandwidth and compute peaks (devices.py), and the fraction of them a runtime achieves
(runtimes.py, measured on the host).

    decode tok/s  = 1 / max(bytes / (bandwidth x eff_bw), ops / (peak x eff_compute))
    prefill tok/s = T / max(same, for T tokens)
    peak memory   = weights + KV cache at max_len + activations + the runtime's overhead
"""

from __future__ import annotations

from .costs import Scheme, Shape, Storage, decode_cost, memory, prefill_cost
from .devices import DEVICES, Device, device
from .runtimes import RUNTIMES, Runtime, runtime
from .subject import Quant, quant_of, shape_of, storage_of

MiB = 1 << 20


def arithmetic(st: Storage) -> str:
    """What the projections compute in: int8 with int8 activations, else the float width."""
    return "int8" if st.linear.act_bits == 8 else "fp32" if st.float_bits == 32 else "fp16"


def _time(cost: dict, dev: Device, rt: Runtime, kind: str) -> tuple[float, str]:
    t_mem = cost["bytes"] / (dev.bandwidth_gbs * 1e9 * rt.eff_bw)
    t_ops = cost["ops"] / (dev.peak(rt.unit, kind) * 1e9 * rt.eff_compute)
    return max(t_mem, t_ops), "memory" if t_mem >= t_ops else "compute"


def estimate(shape: Shape, st: Storage, dev: Device, rt: Runtime, max_len: int, prompt_len: int = 64,
             decode_tokens: int = 128, ring: int | None = None) -> dict:
    """The estimate as a plain dict (what `slmc estimate --json` prints). Decode is costed at
    the middle of a generation of `decode_tokens` after a `prompt_len`-token prompt."""
    kind = arithmetic(st)
    pos = min(prompt_len + decode_tokens // 2, max_len - 1)
    dec = decode_cost(shape, st, pos, ring)
    pre = prefill_cost(shape, st, prompt_len, ring)
    t_dec, dec_bound = _time(dec, dev, rt, kind)
    t_pre, pre_bound = _time(pre, dev, rt, kind)
    mem = memory(shape, st, max_len, prompt_len, ring)
    peak = sum(mem.values()) / MiB + rt.overhead_mib
    return {
        "device": dev.name, "soc": dev.soc, "runtime": rt.key, "runtime_name": rt.name, "unit": rt.unit,
        "arithmetic": kind, "bandwidth_gbs": round(dev.bandwidth_gbs, 1),
        "peak_gops": round(dev.peak(rt.unit, kind), 1), "threads": dev.threads if rt.unit == "cpu" else None,
        "eff_bw": rt.eff_bw, "eff_compute": rt.eff_compute,
        "storage": {"linear": st.linear.describe(), "embedding": st.embed.describe(), "head": st.head.describe(),
                    "kv_bits": st.kv_bits},
        "max_len": max_len, "prompt_len": prompt_len, "decode_position": pos,
        "decode": {"tok_s": 1 / t_dec, "bound": dec_bound, "bytes_per_token": dec["bytes"],
                   "ops_per_token": dec["ops"], "weight_bytes": dec["weight_bytes"],
                   "kv_read_bytes": dec["kv_read_bytes"], "embed_row_bytes": dec["embed_row_bytes"]},
        "prefill": {"tok_s": prompt_len / t_pre, "bound": pre_bound, "bytes": pre["bytes"], "ops": pre["ops"]},
        "memory_mib": {**{k: v / MiB for k, v in mem.items()}, "runtime_overhead": rt.overhead_mib,
                       "peak": peak},
        "sources": {"memory": dev.memory_source, "cpu": dev.cpu_source, "accelerators": dev.accel_source,
                    "efficiency": rt.source, "assumed": list(dev.assumed), "note": dev.note},
    }


__all__ = ["DEVICES", "RUNTIMES", "Device", "Runtime", "Scheme", "Shape", "Storage", "Quant", "device", "runtime",
           "estimate", "shape_of", "storage_of", "quant_of", "decode_cost", "prefill_cost", "memory", "arithmetic"]
