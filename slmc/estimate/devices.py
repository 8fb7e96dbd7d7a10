"""The phones `slmc estimate` knows, as data: memory bandwidth and the peak throughput of each
compute unit, every figure with where it comes from.

Bandwidth is the DRAM interface's peak: data rate (MT/s) x bus width (bits) / 8. CPU peaks are
the cores an LLM runtime's thread pool runs on (the fastest four on Android, the two
performance cores on iPhone: ExecuTorch and LiteRT both size their pools so), each core's
clock x its 128-bit SIMD pipes x per-instruction work: 8 fp32 flops (4-lane FMA) or 32 int8
ops (SDOT: 16 multiply-adds), the same 4:1 ratio AVX-512 VNNI has to fp32 FMA on the host
(bench/estimate.py's "this host" row). The i8mm extension (SMMLA) these cores also have would
double the int8 peak; the fitted eff_compute (runtimes.py) absorbs whether a runtime uses it.
The clock a per-layer overhead runs at is the mean of the pool's cores. GPU and NPU figures
are given only where the vendor publishes one; None where it does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import SlmcError

# 128-bit SIMD pipes per core, from Arm's and Apple's microarchitecture disclosures.
PIPES = {"Cortex-X2": 4, "Cortex-X3": 4, "Cortex-X4": 4, "Cortex-A710": 2, "Cortex-A715": 2,
         "Cortex-A720": 2, "Apple A17 P-core": 4}
PIPES_SOURCE = ("Arm Cortex-X2/X3/X4: 4x128-bit SIMD pipes, Cortex-A710/A715/A720: 2x128-bit (Arm TechDay "
                "2021-2023 disclosures); Apple performance cores: 4x128-bit (AnandTech, Apple A14/M1 "
                "Firestorm analysis, unchanged since)")
PER_PIPE = {"fp32": 8,    # 4 lanes x FMA
            "fp16": 16,   # 8 lanes x FMA
            "int8": 32}   # SDOT: 16 int8 multiply-adds


@dataclass(frozen=True)
class Cores:
    count: int
    core: str
    ghz: float


@dataclass(frozen=True)
class Device:
    name: str
    key: str
    soc: str
    memory: str  # LPDDR generation
    mts: int  # data rate, MT/s
    bus_bits: int
    memory_source: str
    cpu: tuple[Cores, ...]  # the cores a runtime's thread pool uses
    cpu_source: str
    gpu_gflops_fp16: float | None = None
    npu_tops_int8: float | None = None
    accel_source: str = "no public GPU/NPU throughput figure from the vendor"
    note: str = ""
    assumed: tuple[str, ...] = field(default=())  # figures not published by the vendor

    @property
    def bandwidth_gbs(self) -> float:
        return self.mts * self.bus_bits / 8 / 1000

    @property
    def threads(self) -> int:
        return sum(c.count for c in self.cpu)

    @property
    def clock_ghz(self) -> float:
        """Mean clock of the runtime's cores (what a per-layer overhead in cycles runs at)."""
        return sum(c.count * c.ghz for c in self.cpu) / self.threads

    def cpu_peak(self, kind: str) -> float:
        """Peak GOPS of the runtime's cores: kind 'fp32', 'fp16' or 'int8'."""
        return sum(c.count * c.ghz * PIPES[c.core] * PER_PIPE[kind] for c in self.cpu)

    def peak(self, unit: str, kind: str) -> float:
        """Peak GOPS of a compute unit ('cpu', 'gpu', 'npu')."""
        if unit == "cpu":
            return self.cpu_peak(kind)
        v = self.gpu_gflops_fp16 if unit == "gpu" else self.npu_tops_int8 * 1000 if self.npu_tops_int8 else None
        if v is None:
            raise SlmcError(f"{self.name} has no published {unit.upper()} throughput figure; "
                            "slmc estimates its CPU only there", "--device")
        return v


_SD8G1 = "Qualcomm Snapdragon 8 Gen 1 product brief (SM8450): LPDDR5 up to 3200 MHz"
_SD8G3 = "Qualcomm Snapdragon 8 Gen 3 product brief (SM8650): LPDDR5X up to 4800 MHz"
_BUS = "64-bit bus (4 x 16-bit channels), as in every flagship phone SoC of these years"

DEVICES: dict[str, Device] = {d.key: d for d in (
    Device(
        "Galaxy S22", "galaxy-s22", "Snapdragon 8 Gen 1 (SM8450)", "LPDDR5", 6400, 64,
        f"{_SD8G1} (6400 MT/s), {_BUS}",
        (Cores(1, "Cortex-X2", 3.0), Cores(3, "Cortex-A710", 2.5)),
        "Qualcomm product brief: 1x Cortex-X2 @ 3.0 GHz, 3x Cortex-A710 @ 2.5 GHz (+4x A510)",
        note="the Snapdragon model (US S22, the kind device farms such as AWS Device Farm carry, where "
             "ExecuTorch's published phone benchmarks run); the Exynos 2200 model has the same LPDDR5-6400 "
             "and 1x X2 @ 2.8 + 3x A710 @ 2.52 GHz (5 % less CPU peak)"),
    Device(
        "Galaxy S24 Ultra", "galaxy-s24-ultra", "Snapdragon 8 Gen 3 for Galaxy (SM8650-AC)", "LPDDR5X", 8533, 64,
        f"{_SD8G3} (9600 MT/s is the SoC's limit); the phone's LPDDR5X runs at 8533 MT/s (Samsung newsroom "
        f"2023-10: LPDDR5X 8.5 Gbps validated on Snapdragon 8 Gen 3); {_BUS}",
        (Cores(1, "Cortex-X4", 3.39), Cores(3, "Cortex-A720", 3.1)),
        "Samsung: Snapdragon 8 Gen 3 for Galaxy, 1x Cortex-X4 @ 3.39 GHz, 3x Cortex-A720 @ 3.1 GHz "
        "(+2x A720 @ 2.9, 2x A520)",
        assumed=("memory data rate (Samsung does not publish the S24 Ultra's)",)),
    Device(
        "Pixel 8", "pixel-8", "Google Tensor G3", "LPDDR5X", 8533, 64,
        f"Google: 8 GB LPDDR5X; data rate not published by Google, 8533 MT/s assumed (the LPDDR5X rate "
        f"of 2023 flagships); {_BUS}",
        (Cores(1, "Cortex-X3", 2.91), Cores(3, "Cortex-A715", 2.37)),
        "Google Tensor G3: 1x Cortex-X3 @ 2.91 GHz, 4x Cortex-A715 @ 2.37 GHz (+4x A510); a 4-thread pool "
        "gets the X3 and three A715",
        assumed=("memory data rate",)),
    Device(
        "iPhone 15 Pro", "iphone-15-pro", "Apple A17 Pro", "LPDDR5", 6400, 64,
        f"8 GB LPDDR5-6400 (teardowns; Apple publishes no memory figures); {_BUS}",
        (Cores(2, "Apple A17 P-core", 3.78),),
        "Apple A17 Pro: 2 performance cores @ 3.78 GHz (+4 efficiency cores); ExecuTorch's iOS runner "
        "uses the performance cores",
        npu_tops_int8=35.0, accel_source="Apple newsroom 2023-09-12: 16-core Neural Engine, 35 trillion "
                                         "operations per second; GPU: no figure published",
        assumed=("memory data rate (Apple does not publish it)",)),
    Device(
        "OnePlus 12", "oneplus-12", "Snapdragon 8 Gen 3 (SM8650)", "LPDDR5X", 8533, 64,
        f"{_SD8G3}; OnePlus: LPDDR5X, rate not published, 8533 MT/s assumed as in the Galaxy S24 Ultra; "
        f"{_BUS}",
        (Cores(1, "Cortex-X4", 3.3), Cores(3, "Cortex-A720", 3.15)),
        "Qualcomm product brief: 1x Cortex-X4 @ 3.3 GHz, 3x Cortex-A720 @ 3.15 GHz (+2x A720 @ 2.96, 2x A520)",
        assumed=("memory data rate",)),
)}


def device(name: str) -> Device:
    """The device by key or name, case and punctuation aside ('Galaxy S22', 'galaxy-s22')."""
    norm = "".join(ch for ch in name.lower() if ch.isalnum())
    for d in DEVICES.values():
        if norm in ("".join(ch for ch in d.key if ch.isalnum()), "".join(ch for ch in d.name.lower() if ch.isalnum())):
            return d
    raise SlmcError(f"unknown device {name!r}; devices: {', '.join(DEVICES)}", "--device")
