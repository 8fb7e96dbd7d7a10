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
