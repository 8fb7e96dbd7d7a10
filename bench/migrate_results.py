"""One-off (2026-12-02): bring the committed results/*.json to the shared conventions.

- memory and size keys in MiB end in `_mib` (they were `_mb`, `_mb_after`, `weights_mb_ir`, ...),
  a worker's wall time is `wall_s`, the in-worker peak after a pass is `peak_rss_pass_mib`;
- every file is written by _common.dumps (indent 2, final newline);
- figures that README prose quoted but no results file held move into the results file's
  `notes`: compile.json's earlier full run (read from git history) and compile_targets.json's
  paragraph figures (parsed from the paragraph compile_targets.md carried).
Values are not touched: the script checks each file reads back equal to the original with
the old key names. Run once from the repository root: `python bench/migrate_results.py`.
"""

from __future__ import annotations

import json
import re
import subprocess

from _common import RESULTS, ROOT, dumps

RENAME = {
    "peak_rss_mb": "peak_rss_mib", "peak_rss_mb_after": "peak_rss_mib_after",
    "peak_rss_mb_after_pass": "peak_rss_mib_after_pass", "peak_rss_load_mb": "peak_rss_load_mib",
    "peak_rss_pass_mb": "peak_rss_pass_mib", "peak_rss_total_mb": "peak_rss_total_mib",
    "pass_peak_rss_mib": "peak_rss_pass_mib", "model_rss_mb": "model_rss_mib",
    "artifact_mb": "artifact_mib", "backbone_mb": "backbone_mib", "weights_mb_ir": "ir_weights_mib",
    "expert_weights_mb": "expert_weights_mib", "backbone_weights_mb": "backbone_weights_mib",
    "kv_cache_mb": "kv_cache_mib", "expert_file_kb": "expert_file_kib",
    "worker_wall_s": "wall_s", "wall_seconds": "wall_s",
}


def renamed(o, names: dict):
    if isinstance(o, dict):
        return {names.get(k, k): renamed(v, names) for k, v in o.items()}
    if isinstance(o, list):
        return [renamed(v, names) for v in o]
    return o


def git_json(rev: str, path: str) -> dict:
    return json.loads(subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True,
                                     check=True).stdout)


def compile_notes() -> dict:
    old = git_json("57a5fc5^", "bench/results/compile.json")  # the run README's "earlier full run" quoted
    pick = {k: {"wall_s": old[k]["wall_s"], "peak_rss_mib": old[k]["peak_rss_mb"],
                "decode_tok_s": old[k]["decode_tok_s"]} for k in ("slmc", "reference")}
    return {"earlier_run": {"source": "bench/results/compile.json at git 57a5fc5^", "date": old["machine"]["date"],
                            **pick, "greedy_agree": old["greedy"]["agree"]}}


def compile_targets_notes() -> dict:
    md = subprocess.run(["git", "show", "HEAD:bench/results/compile_targets.md"], cwd=ROOT, capture_output=True,
                        text=True, check=True).stdout
    para = " ".join(md[md.index("Notes ("):].split())
    date = re.search(r"Notes \(([\d-]+)\)", para).group(1)
    tf = re.search(r"tensorflow ([\d.]+)", para).group(1)
    lo, _, rlo, _ = map(float, re.search(r"decoded at ([\d.]+)-([\d.]+) tok/s \(([\d.]+)-([\d.]+)x\)", para).groups())
    pairs = re.findall(r"([\d.]+) vs ([\d.]+)", para.split("Standalone re-timings")[1].split("tok/s")[0])
    run = git_json("f346510", "bench/results/compile_targets.json")  # the run before the lowering change
    return {"date": date, "ref_tensorflow": tf,
            "decode_before_change": [
                {"slmc_tok_s": lo, "ratio": rlo, "source": "timed by hand (README paragraph of 2026-12-02)"},
                {"slmc_tok_s": run["paths"]["tflite-slmc"]["decode_tok_s"],
                 "reference_tok_s": run["paths"]["tflite-ref"]["decode_tok_s"],
                 "source": f"bench/results/compile_targets.json at git f346510 ({run['machine']['date']})"}],
            "standalone_retimings_tok_s": [{"slmc": float(a), "reference": float(b),
                                            "source": "timed by hand (README paragraph of 2026-12-02)"}
                                           for a, b in pairs]}


def main() -> None:
    back = {v: k for k, v in RENAME.items()}
    for f in sorted(RESULTS.glob("*.json")):
        text = f.read_text()
        data = json.loads(text)
        new = renamed(data, RENAME)
        if f.stem == "compile" and "notes" not in new:
            new["notes"] = compile_notes()
        if f.stem == "compile_targets" and "notes" not in new:
            new["notes"] = compile_targets_notes()
        out = dumps(new)
        check = {k: v for k, v in json.loads(out).items() if k != "notes" or "notes" in data}
        # a key renamed from two old names (wall_s) maps back to either: compare per file
        if renamed(check, {v: k for k, v in back.items()}) != renamed(data, RENAME):
            raise SystemExit(f"{f.name}: values changed")
        if out != text:
            f.write_text(out)
            print(f"migrated {f.name}")


if __name__ == "__main__":
    main()
