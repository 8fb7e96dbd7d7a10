"""`slmc build` benchmark: a two-platform slmc.toml (Android: ExecuTorch 8da4w + LiteRT 8da4w;
iOS: Core ML int4 g32), built cold, again (a no-op), and after one change (iOS's max length).

    SLMC_CACHE=/tmp/slmc-cache flock /work/coord/heavy.lock python bench/build.py   # SmolLM2-135M
    python bench/build.py --quick        # tiny random Llama, a few minutes

Each `slmc build --json` runs in a fresh process with a fresh build cache (--cache under the
work folder); wall time is the whole command (Python start, config, digests, compiles and
validation); per artifact, the status and compile+validate seconds slmc reports.
Writes bench/results/build{,-quick}.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT, bench_setup, machine, write_results

TOML = """
[models.chat]
path = "{model}"

[platforms.android]
out = "out/android"

[[platforms.android.artifacts]]
name = "chat-et"
model = "chat"
target = "executorch"
backend = "xnnpack"
recipe = "int8da-int4w-g32"
max_seq_len = {msl}

[[platforms.android.artifacts]]
name = "chat-litert"
model = "chat"
target = "tflite"
backend = "cpu"
recipe = "int8da-int4w-g32"
max_seq_len = {msl}

[platforms.ios]
out = "out/ios"

[[platforms.ios.artifacts]]
name = "chat-coreml"
model = "chat"
target = "coreml"
backend = "all"
recipe = "int4-g32-coreml"
max_seq_len = {ios_msl}
"""


def run_build(proj: Path, cache: Path) -> dict:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "slmc.cli", "build", "--json", "--cache", str(cache)], cwd=proj,
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.monotonic() - t0
    if p.returncode != 0:
        raise SystemExit(f"slmc build failed: {p.stderr[-2000:]}")
    rep = json.loads(p.stdout)
    return {"wall_s": round(wall, 2),
            "artifacts": {a["id"]: {"status": a["status"], "seconds": a["seconds"]} for a in rep["artifacts"]}}


def main(a) -> None:
    work, model = bench_setup(a, "slmc-bench-build-")
    msl = a.max_seq_len or (64 if a.quick else 512)
    proj, cache = work / "app", work / "cache"
    proj.mkdir()
    (proj / "slmc.toml").write_text(TOML.format(model=model, msl=msl, ios_msl=msl))
    runs = {"cold": run_build(proj, cache), "no-op": run_build(proj, cache)}
    (proj / "slmc.toml").write_text(TOML.format(model=model, msl=msl, ios_msl=msl // 2))
    runs["ios max_seq_len changed"] = run_build(proj, cache)
    write_results("build-quick" if a.quick else "build",
                  {"model": "tiny random Llama" if a.quick else str(a.model), "max_seq_len": msl,
                   "machine": machine(), "runs": runs})


def markdown(data: dict) -> str:
    ids = list(next(iter(data["runs"].values()))["artifacts"])
    lines = [f"# slmc build: {data['model']}, max_seq_len {data['max_seq_len']}", "",
             f"{data['machine']['cores']} cores, {data['machine']['date']}; wall time of the whole command, "
             "per artifact what slmc did (compile + validate seconds).", "",
             "| run | wall s | " + " | ".join(ids) + " |", "|---|---:|" + "---|" * len(ids)]
    for name, r in data["runs"].items():
        cells = [f"{r['artifacts'][i]['status']}" + (f" ({r['artifacts'][i]['seconds']} s)"
                                                     if r["artifacts"][i]["seconds"] else "") for i in ids]
        lines.append(f"| {name} | {r['wall_s']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--max-seq-len", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    main(ap.parse_args())
