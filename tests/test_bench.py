"""bench/: every committed results .md (and bench/README.md's notes blocks) is exactly what
its script renders from the committed JSON; scripts use slmc only through slmc.api."""

import ast
import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def common(monkeypatch):
    """bench/_common.py, with bench/ on sys.path for the scripts it loads (as when run)."""
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("_common", BENCH / "_common.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_results_render_byte_identical(common):
    files = common.rendered()
    results = sorted((BENCH / "results").glob("*.json"))
    assert results and {p.with_suffix(".md") for p in results} <= set(files)
    assert BENCH / "README.md" in files  # the notes blocks are rendered too
    for path, text in files.items():
        assert path.read_text() == text, f"{path.name} differs from what its JSON renders to: python bench/render.py"


def test_notes_block_is_rendered_not_kept(common):
    """A hand edit inside a README notes block is replaced by what the JSON renders to."""
    c = common
    readme = (BENCH / "README.md").read_text()
    start = c.NOTES_START.format(stem="compile")
    edited = readme.replace(start + "\n", start + "\nEarlier full run took 1 s.\n", 1)
    assert edited != readme
    assert c.rendered("compile", readme=edited)[BENCH / "README.md"] == readme


def test_results_keys_uniform():
    """Memory is in MiB under *_mib keys in every results file (no *_mb left)."""
    def keys(o):
        if isinstance(o, dict):
            for k, v in o.items():
                yield k
                yield from keys(v)
        elif isinstance(o, list):
            for v in o:
                yield from keys(v)

    for f in sorted((BENCH / "results").glob("*.json")):
        bad = sorted({k for k in keys(json.loads(f.read_text())) if k.endswith("_mb") or "_mb_" in k})
        assert not bad, f"{f.name}: {bad}"


def test_bench_imports_only_the_api():
    for f in sorted(BENCH.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            if isinstance(node, ast.ImportFrom) and node.module == "slmc":
                names = [f"slmc.{a.name}" for a in node.names]
            for n in names:
                if n == "slmc" or n.startswith("slmc."):
                    assert n in ("slmc.api", "slmc.errors"), f"{f.name} imports {n}"


def test_scale_calib_components_add_up_to_the_pass(common):
    """bench/scale_calib.py: a profiled path's own time (less the followed calls inside it) goes
    to one component, the head's GPTQ apart from the layers', and each pass's time outside every
    followed function is its 'outside' (a synthetic profile)."""
    m = common.load_script("scale_calib")

    def paths(*rows):
        prof = m.PathProfiler()
        prof.paths = {tuple(p.split(" > ")): [1, t] for p, t in rows}
        return prof.own_seconds()

    g = "passes/quant_gptq.py:"
    run = {"pass_seconds": {"quant.awq": 10.0, "quant.gptq": 40.0}, "paths": {
        "quant.awq": paths(("passes/quant_awq.py:apply", 9.0),
                           ("passes/quant_awq.py:apply > compiler/calib.py:sample_ids", 4.0),
                           ("passes/quant_awq.py:apply > compiler/calib.py:run_block", 3.0)),
        "quant.gptq": paths((f"{g}run", 38.0), (f"{g}run > compiler/calib.py:run_block", 15.0),
                            (f"{g}run > compiler/calib.py:run_block > {g}_site", 9.0),
                            (f"{g}run > compiler/calib.py:run_block > {g}_site > compiler/calib.py:gram", 1.0),
                            (f"{g}run > compiler/calib.py:run_block > {g}_site > {g}gptq", 7.0),
                            (f"{g}run > compiler/calib.py:run_block > {g}_site > {g}gptq > {g}_hinv_upper", 2.0),
                            (f"{g}run > {g}_head", 20.0), (f"{g}run > {g}_head > {g}gptq", 16.0),
                            (f"{g}run > {g}_head > {g}gptq > {g}_hinv_upper", 5.0))}}
    got = m.components(run)
    c, scope = {k: v[0] for k, v in got.items()}, {k: v[1] for k, v in got.items()}
    assert c["quant.gptq: block forward"] == 6.0 and scope["quant.gptq: block forward"]  # 15 less the hook's 9
    assert c["quant.gptq: column loop"] == 5.0  # the sites' gptq, 7, less their factorization's 2
    assert c["quant.gptq: factor"] == 2.0 and c["quant.gptq, head: factor"] == 5.0
    assert scope["quant.gptq: factor"] and not scope["quant.gptq, head: factor"]  # per layer, once
    assert c["quant.gptq, head: column loop"] == 11.0 and c["quant.gptq, head: rest"] == 4.0
    assert c["quant.gptq: Hessian (X^T X)"] == 1.0 and c["quant.gptq: site rest"] == 1.0
    assert c["quant.gptq: rest"] == 3.0 and not scope["quant.gptq: rest"]  # run's own code
    assert c["quant.gptq: outside"] == 2.0 and c["quant.awq: outside"] == 1.0
    assert c["quant.awq, samples: rest (steps, embedding, model copy)"] == 4.0
    assert abs(sum(v for k, v in c.items() if k.startswith("quant.gptq")) - 40.0) < 1e-9
    # the work model: a GPTQ site's factorization is cols^3, summed over q/k/v, o, gate/up, down
    w = m.work({"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}, 2, 8)
    assert w["quant.gptq: factor"] == 3 * 64 ** 3 + 128 ** 3
    assert w["quant.gptq: Hessian (X^T X)"] == 16 * (3 * 64 ** 2 + 128 ** 2)
