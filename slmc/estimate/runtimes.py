"""Per-runtime efficiency: the fraction of a machine's memory bandwidth and compute peak a
runtime achieves, measured on slmc's own artifacts on the x86 host (`bench/estimate.py
--calibrate`), never fitted to the phone figures the estimate is compared with.

- eff_bw = host decode tok/s x decode bytes per token (this cost model, the calibration
  artifact's storage) / the host's copy bandwidth (numpy, measured in the same run);
- eff_compute = host prefill tok/s x prefill operations per token / the host's peak at the
  artifact's arithmetic (int8: 4 x the fp32 GEMM rate numpy's BLAS reaches, the VNNI-to-FMA
  ratio; the phone peaks in devices.py use the same SDOT-to-FMA ratio);
- overhead_mib = the runtime's peak RSS while generating, less the RSS before loading and
  less the cost model's weights + KV cache + activations (clamped at 0).

The figures below are copied from bench/results/estimate.json's `calibration` (the test
suite checks they agree). Carrying them from a 2-core x86 server to a phone's big cores
assumes the runtime loses the same fraction there; the README lists why that may not hold.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SlmcError


@dataclass(frozen=True)
class Runtime:
    key: str  # target:backend
    name: str
    unit: str  # the compute unit it runs on
    eff_bw: float
    eff_compute: float
    overhead_mib: float
    source: str


CALIBRATION = "bench/results/estimate.json (calibration), measured with bench/estimate.py --calibrate"
# target:backend -> (name, unit, the calibration artifact)
KNOWN = {
    "executorch:xnnpack": ("ExecuTorch + XNNPACK", "cpu", "an int8da-int4w-g32 .pte in ExecuTorch's TextLLMRunner"),
    "tflite:cpu": ("LiteRT (CPU, XNNPACK delegate)", "cpu", "an int8da-int8w .litertlm in LiteRT-LM's Benchmark"),
}
# target:backend -> (eff_bw, eff_compute, overhead_mib) as measured; a runtime absent here has no
# measured factors yet and `slmc estimate` refuses it without --bare.
MEASURED: dict[str, tuple[float, float, float]] = {
    "executorch:xnnpack": (0.086, 0.105, 46.9),
}

RUNTIMES: dict[str, Runtime] = {k: Runtime(k, KNOWN[k][0], KNOWN[k][1], *v, f"{KNOWN[k][2]} on the host; {CALIBRATION}")
                                 for k, v in MEASURED.items()}

# The compute unit a backend runs on (others: the CPU).
UNITS = {"ane": "npu", "qnn": "npu", "mediatek": "npu", "qualcomm": "npu", "gpu": "gpu", "vulkan": "gpu"}


def runtime(target: str, backend: str, bare: bool = False) -> Runtime:
    """The runtime of target:backend; bare: efficiency 1 (the roofline itself, an upper bound)."""
    key = f"{target}:{backend.split(':')[0]}"
    if bare:
        return Runtime(key, "bare roofline (efficiency 1)", UNITS.get(key.split(":")[1], "cpu"), 1.0, 1.0, 0.0,
                       "no efficiency applied: an upper bound")
    if key not in RUNTIMES:
        raise SlmcError(f"no efficiency factor measured for {key} (measured: {', '.join(RUNTIMES)}); "
                        "--bare prints the roofline without one", "--target")
    return RUNTIMES[key]
