"""What every benchmark shares: paths, peak RSS, phases, worker processes, the machine,
the results writer and renderer.

A benchmark script `bench/NAME.py` writes `results/NAME{,-quick}.json` through
`write_results` and renders `results/NAME{,-quick}.md` from that JSON alone with its
`markdown(data)`; its `notes(data)` (optional) renders the prose paragraph bench/README.md
carries for it. `python bench/render.py` re-renders all of them from the committed JSON.
Sizes and memory are in MiB (2**20 bytes) under keys ending in `_mib`; worker wall time is `wall_s`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
CORPUS = ROOT.parent / "shared" / "corpus"
MiB = 1 << 20
if str(ROOT) not in sys.path:  # this checkout's slmc, not another installed one
    sys.path.insert(0, str(ROOT))


# ------------------------------------------------------------------ memory and time


def peak_rss_mib() -> float:
    """This process's own peak RSS so far: VmHWM, the high-water mark of the memory it has had
    since its exec. Not ru_maxrss: Linux carries the parent's RSS at fork into a child's
    ru_maxrss (and so into wait4's figure), so a worker started by a parent holding 2.4 GB
    reported 2.4 GB before it had read a weight (bench/results/scale.md before 2026-12-04T21).
    Where /proc is missing, ru_maxrss (Linux counts KiB)."""
    try:
        return status_mib("VmHWM")
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def status_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process from /proc. Not ru_maxrss where the
    figure must exclude the parent: a child's ru_maxrss carries the parent's RSS from
    before exec, and a parent holding several models would dominate it."""
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) / 1024


class Phases:
    """Progress callback that times each step: rows of phase, seconds, peak RSS after it."""

    def __init__(self):
        self.t0 = self.last = time.perf_counter()
        self.name, self.rows = "startup+imports", []

    def __call__(self, name: str):
        now = time.perf_counter()
        self.rows.append({"phase": self.name, "seconds": round(now - self.last, 2),
                          "peak_rss_mib_after": round(peak_rss_mib(), 1)})
        self.name, self.last = name, now


def phase_table(name: str, phases: list[dict]) -> list[str]:
    lines = [f"{name} phases (in-worker; peak RSS so far):", "", "| phase | s | peak RSS (MiB) |", "|---|---:|---:|"]
    return lines + [f"| {p['phase']} | {p['seconds']} | {p['peak_rss_mib_after']:.0f} |" for p in phases] + [""]


# ------------------------------------------------------------------ worker processes


def spawn(script: str | Path, args: list[str], result: Path, python: str = sys.executable, env: dict | None = None,
          cwd: Path | None = None, rusage: bool = True, errors: str = "raise") -> dict:
    """Run `script` with args + `--result FILE` in a fresh interpreter; return what it wrote
    there. rusage: add its wall_s, cpu_s and whole-process peak_rss_mib (os.wait4).
    errors="record": a failed worker returns {"error": its last stderr line} instead of exiting."""
    t0 = time.perf_counter()
    err = tempfile.TemporaryFile(mode="w+") if errors == "record" else None
    p = subprocess.Popen([python, str(Path(script).resolve()), *args, "--result", str(result)],
                         env=env, cwd=cwd, stderr=err)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        if err is None:
            raise SystemExit(f"worker {args[:2]} failed with exit code {code}")
        err.seek(0)  # slmc's own one-line error is the last line (e.g. a group size that does not divide)
        last = [ln for ln in err.read().splitlines() if ln.strip()][-1:] or [f"exit {code}"]
        return {"error": last[0][:300]}
    out = json.loads(Path(result).read_text())
    if rusage:
        # a worker that reports its own peak (own_peak_rss_mib: its VmHWM or a higher sampled
        # VmRSS) is judged on that: wait4's ru_maxrss includes this parent's RSS at the fork
        # (see peak_rss_mib), which is what /usr/bin/time -v avoids by forking from itself
        own = out.get("own_peak_rss_mib")
        out.update(wall_s=round(wall, 2), cpu_s=round(ru.ru_utime + ru.ru_stime, 2),
                   wait4_peak_rss_mib=round(ru.ru_maxrss / 1024, 1),
                   peak_rss_mib=own if own is not None else round(ru.ru_maxrss / 1024, 1))
    return out


def busy_processes() -> list[str]:
    """Other python/slmc processes (not ours) running while we measure."""
    r = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout.splitlines()
    me = {os.getpid(), os.getppid()}
    return [l.strip()[:120] for l in r[1:] if ("python" in l or "slmc" in l) and int(l.split()[0]) not in me
            and int(l.split()[1]) not in me and "ps -eo" not in l]


def others_seen(procs: list[str]) -> list[str]:
    if not procs:
        return []
    return ["Other python/slmc processes seen during the run (timings may overlap them):", ""] + \
        [f"- `{p}`" for p in procs] + [""]


# the vector extensions the runtimes' kernels are picked by (MLAS, XNNPACK); the model name alone
# ("AMD EPYC" here) does not say which a host had
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "asimd", "i8mm", "sve")


def cpu_name() -> str:
    """The CPU's model name with its SIMD extensions, e.g. "AMD EPYC (avx2 fma)"."""
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    name = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), platform.processor())
    flags = set(next((l.split(":", 1)[1].split() for l in lines if l.startswith(("flags", "Features"))), []))
    simd = [f for f in SIMD_FLAGS if f in flags]
    return f"{name} ({' '.join(simd)})" if simd else name


def machine() -> dict:
    vers = {k: metadata.version(k) for k in ("torch", "executorch", "transformers")}
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    return {"cores": os.cpu_count(), "cpu": cpu_name(), "mem_gib": round(mem, 1),
            "python": platform.python_version(), **vers,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def head_commit() -> str:
    """The slmc commit measured (rows of different commits share a table: say which is which);
    "+changes" when slmc/ has uncommitted edits."""
    git = ["git", "-C", str(ROOT)]
    c = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "slmc"], capture_output=True, text=True).stdout
    return c + ("+changes" if dirty.strip() else "") if c else "unknown"


# ------------------------------------------------------------------ models and settings


def tiny_model(work: Path, name: str = "tiny", **overrides) -> str:
    """--quick: a tiny random Llama (config overrides allowed) with a byte-level tokenizer."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import save_ascii_tokenizer, save_hf_model

    from slmc import api

    d = Path(work) / name
    if not (d / "config.json").is_file():
        cfg = {**api.tiny_llama_config(), **overrides}
        save_hf_model(cfg, d)
        save_ascii_tokenizer(d, cfg["vocab_size"])
    return str(d)


def bench_setup(a, prefix: str) -> tuple[Path, Path]:
    """A fresh work folder and the model folder (--quick: a tiny random Llama made in it)."""
    os.environ.setdefault("SLMC_CACHE", "/tmp/slmc-cache")
    work = Path(tempfile.mkdtemp(prefix=prefix))
    from slmc import api

    return work, api.resolve_model_path(tiny_model(work) if a.quick else a.model)


def common_args(ap, steps: int, repeats: int) -> None:
    """The options the compile benchmarks take (model, cache length, --quick, decode timing)."""
    ap.add_argument("--model", default="default", help="HF folder, or 'default' (SmolLM2-135M-Instruct)")
    ap.add_argument("--max-seq-len", type=int, default=None, help="KV cache length (default 512; 128 with --quick)")
    ap.add_argument("--quick", action="store_true", help="tiny random Llama, for a fast smoke test")
    ap.add_argument("--steps", type=int, default=steps, help="decode steps per repeat")
    ap.add_argument("--repeats", type=int, default=repeats, help="timed repeats (after one warm-up)")


PROMPT = "The quick brown fox jumps over the lazy dog. Write a short story about a robot who"


def quality_args(ap, eval_text: str) -> None:
    """The arguments of the text-quality benchmarks (quant.py, quant_rotate.py): a worker mode,
    the model, calibration on one novel and evaluation on another (`eval_text` in the corpus)."""
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--render", action="store_true", help="only re-render results/*.md from the .json")
    ap.add_argument("--name", default="")
    ap.add_argument("--pass", dest="passes", action="append", default=[])
    ap.add_argument("--model", default="default")
    ap.add_argument("--corpus", default=str(CORPUS))
    ap.add_argument("--calib-text", default=None, help="default: CORPUS/austen_emma.txt")
    ap.add_argument("--eval-text", default=None, help=f"default: CORPUS/{eval_text} (another novel)")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--n-seqs", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--append", action="store_true",
                    help="keep the measured rows of the last results file; run only the missing or failed ones")


def quality_texts(a, eval_text: str, quick_name: str) -> str:
    """Fill in the default texts; --quick swaps in a tiny random model and short texts.
    Returns the results suffix ("-quick" or "")."""
    corpus = Path(a.corpus)
    a.calib_text = a.calib_text or str(corpus / "austen_emma.txt")
    a.eval_text = a.eval_text or str(corpus / eval_text)
    if not a.quick:
        return ""
    a.model = tiny_model(Path("/tmp"), quick_name)
    a.eval_tokens, a.window, a.n_seqs, a.seq_len = 600, 128, 4, 64
    return "-quick"


def prompt_ids(model_dir: Path, vocab: int) -> list[int]:
    if (model_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(PROMPT).ids[:16]
    return [(7 * i + 3) % vocab for i in range(16)]


def weight_count(model_dir: Path) -> int:
    """Parameters in the safetensors files of a Hugging Face folder."""
    import math

    from safetensors import safe_open

    n = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return n


def dir_bytes(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


# ------------------------------------------------------------------ results


def dumps(data: dict) -> str:
    return json.dumps(data, indent=2) + "\n"


def decode_bytes(subject: str, opts: dict, prompt: int, generated: int) -> dict:
    """What one decode step reads at the middle of `generated` steps after `prompt` tokens, by
    slmc's cost model without runtime overheads (bare): subject an slmc folder (its manifest
    gives the storage) or a model folder with opts (passes, max_seq_len)."""
    from slmc import api

    e = api.estimate(subject, api.EstimateOptions("galaxy-s22", prompt_len=prompt, decode_tokens=generated,
                                                  bare=True, **opts))
    return {"bytes_per_token": round(e["decode"]["bytes_per_token"]), "position": e["decode_position"],
            "storage": e["storage"]}


def write_results(stem: str, data: dict, echo: bool = True) -> None:
    """results/STEM.json, then everything rendered from it (results/STEM.md, README notes).
    The last file's `notes` (figures for README's prose, dated) are kept unless `data` has its own."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{stem}.json"
    if "notes" not in data and path.is_file():
        notes = json.loads(path.read_text()).get("notes")
        data = {**data, "notes": notes} if notes else data
    path.write_text(dumps(data))
    render(script_of(stem))
    if echo:
        print((RESULTS / f"{stem}.md").read_text())


def script_of(stem: str) -> str:
    """results/compile-quick.json -> compile (bench/compile.py renders it)."""
    return stem.removesuffix("-quick")


def load_script(name: str):
    """bench/NAME.py as a module (its markdown/notes), without running it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_bench_{name}", HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


NOTES_START = "<!-- notes from results/{stem}.json (bench/render.py writes this block) -->"
NOTES_END = "<!-- end notes -->"


def rendered(only: str | None = None, readme: str | None = None) -> dict[Path, str]:
    """Every file rendered from results/*.json (each .md, and bench/README.md with its notes
    blocks filled in), as it should read; `only`: one script's files; `readme`: the README
    text to fill in (default: the file's)."""
    out, mods = {}, {}
    readme = (HERE / "README.md").read_text() if readme is None else readme
    for f in sorted(RESULTS.glob("*.json")):
        name = script_of(f.stem)
        if only and name != only:
            continue
        mod = mods.setdefault(name, load_script(name))
        data = json.loads(f.read_text())
        out[f.with_suffix(".md")] = mod.markdown(data)
        text = getattr(mod, "notes", lambda d: None)(data)
        start = NOTES_START.format(stem=f.stem)
        if text is not None:
            if start not in readme:
                raise SystemExit(f"bench/README.md has no notes block for {f.stem}: add the line {start!r}")
            i = readme.index(start) + len(start)
            j = readme.index(NOTES_END, i)
            readme = readme[:i] + "\n" + text.rstrip("\n") + "\n" + readme[j:]
            out[HERE / "README.md"] = readme
    return out


def render(only: str | None = None) -> None:
    """Write what `rendered` gives (the .md files and README's notes) and say which changed."""
    for path, text in rendered(only).items():
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            print(f"rendered {path.relative_to(ROOT)}")
