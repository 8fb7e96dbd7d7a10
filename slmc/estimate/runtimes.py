"""Per-runtime parameters of the estimate, fitted to published phone figures (published.py)
with fit.py's form A (decode) and its prefill form, on ALL the runtime's figures:

- eff_bw: the fraction of the DRAM bandwidth a decode step's weight stream reaches;
- overhead_cycles: the fixed cost per layer of a decode step (operator dispatch, thread-pool
  barriers), in CPU cycles at the mean clock of the runtime's cores;
- eff_compute: the fraction of the CPU peak (int8 with int8 activations) prefill reaches;
- overhead_mib: the runtime's memory beside the model, measured on this host (ExecuTorch's
  TextLLMRunner, bench/estimate.py --calibrate); not measured for LiteRT (0).

The values below are copied from bench/results/estimate.json (`fit_all`), which
bench/estimate.py writes from the figures; tests/test_estimate.py refits them from the
figures and the public configs and checks they agree. How well the form predicts a figure it
was not fitted on is bench/results/estimate.md's leave-one-out table, not these numbers.
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
    overhead_cycles: float  # per layer and decode step
    eff_compute: float
    overhead_mib: float
    source: str
    figures: tuple[str, ...] = ()  # keys of the published figures the parameters came from


NAMES = {"executorch:xnnpack": "ExecuTorch + XNNPACK", "tflite:cpu": "LiteRT (CPU, XNNPACK delegate)"}
# target:backend -> (eff_bw, overhead_cycles, eff_compute, overhead_mib, decode figures, prefill figures)
FITTED: dict[str, tuple[float, float, float, float, tuple[str, ...], tuple[str, ...]]] = {
    "executorch:xnnpack": (0.591, 259600.0, 0.496, 46.9, (
        "smollm2-135m/et-8da4w/galaxy-s22/decode", "qwen3-0.6b/et-8da4w/galaxy-s22/decode",
        "llama-3.2-1b/et-8da4w/galaxy-s22/decode", "smollm2-135m/et-8da4w/iphone-15-pro/decode",
        "qwen3-0.6b/et-8da4w/iphone-15-pro/decode", "llama-3.2-1b/et-8da4w/iphone-15-pro/decode",
        "llama-3.2-1b/et-spinquant/oneplus-12/decode", "llama-3.2-3b/et-spinquant/oneplus-12/decode",
        "llama-3-8b/et-8da4w-g128/galaxy-s22/decode", "llama-3-8b/et-8da4w-g128/oneplus-12/decode"), (
        "llama-3.2-1b/et-spinquant/oneplus-12/prefill", "llama-3.2-3b/et-spinquant/oneplus-12/prefill")),
    "tflite:cpu": (0.656, 2903600.0, 0.251, 0.0, (
        "qwen2.5-0.5b/litert-int8/galaxy-s24-ultra/decode", "qwen2.5-1.5b/litert-int8/galaxy-s24-ultra/decode"), (
        "qwen2.5-0.5b/litert-int8/galaxy-s24-ultra/prefill", "qwen2.5-1.5b/litert-int8/galaxy-s24-ultra/prefill")),
}
SOURCE = ("fitted to published phone figures (slmc/estimate/published.py) by bench/estimate.py; "
          "bench/results/estimate.md checks them figure by figure, leave-one-out")

RUNTIMES: dict[str, Runtime] = {
    k: Runtime(k, NAMES[k], "cpu", bw, cyc, comp, mib, SOURCE, dec + pre)
    for k, (bw, cyc, comp, mib, dec, pre) in FITTED.items()}

# The compute unit a backend runs on (others: the CPU).
UNITS = {"ane": "npu", "qnn": "npu", "mediatek": "npu", "qualcomm": "npu", "gpu": "gpu", "vulkan": "gpu"}


def runtime(target: str, backend: str, bare: bool = False) -> Runtime:
    """The runtime of target:backend; bare: efficiency 1 and no overhead (the roofline itself,
    an upper bound)."""
    key = f"{target}:{backend.split(':')[0]}"
    if bare:
        return Runtime(key, "bare roofline (efficiency 1, no overhead)", UNITS.get(key.split(":")[1], "cpu"),
                       1.0, 0.0, 1.0, 0.0, "no efficiency applied: an upper bound")
    if key not in RUNTIMES:
        raise SlmcError(f"no published phone figures to fit {key}'s parameters to (fitted: {', '.join(RUNTIMES)}); "
                        "--bare prints the roofline without them", "--target")
    return RUNTIMES[key]
