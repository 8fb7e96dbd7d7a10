"""The import rules of ARCHITECTURE.md, checked on the source (every import, also those
inside functions), so the layers stay as designed:

- compiler imports nothing from passes, targets, runtime_tests, api or cli;
- the lowering and the targets never import the reference executor (validation must not
  share numerics with what it checks);
- a target never imports another target, nor passes, runtime_tests, api or cli;
- passes never import targets or runtime_tests; runtime_tests never import passes;
- the CLI and the benchmarks import only slmc.api and slmc.errors from slmc (the CLI's `build` also
  slmc.build, whose no-op check must not import torch);
- no import cycle among slmc's modules.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "slmc"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    p = ROOT.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """The slmc modules `path` imports (relative imports resolved; `from pkg import mod`
    counts as an import of pkg.mod when that is a module)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "slmc")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "slmc":
                continue
            subs = [f"{mod}.{a.name}" for a in node.names if is_module(f"{mod}.{a.name}")]
            out.update(subs or [mod])
    return out


def graph(files) -> dict[str, set[str]]:
    return {module_name(f): imports_of(f) for f in files}


SLMC = graph(sorted(PKG.rglob("*.py")))


def under(mod: str, *prefixes: str) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def violations(rule) -> list[str]:
    return [f"{m} imports {i}" for m, deps in sorted(SLMC.items()) for i in sorted(deps) if rule(m, i)]


RULES = {
    "compiler imports no upper layer": lambda m, i: under(m, "slmc.compiler") and under(
        i, "slmc.passes", "slmc.targets", "slmc.runtime_tests", "slmc.api", "slmc.cli", "slmc.recipes"),
    "lowering and targets never use the reference": lambda m, i: under(
        m, "slmc.compiler.lowering", "slmc.targets") and under(i, "slmc.compiler.reference"),
    "targets never import passes, checks, api, cli": lambda m, i: under(m, "slmc.targets") and under(
        i, "slmc.passes", "slmc.runtime_tests", "slmc.api", "slmc.cli", "slmc.recipes"),
    "a target never imports another target": lambda m, i: (
        under(m, "slmc.targets") and under(i, "slmc.targets") and len(m.split(".")) > 3
        and len(i.split(".")) > 3 and is_package(i.split(".")[2]) and i.split(".")[2] != m.split(".")[2]),
    "passes never import targets or checks": lambda m, i: under(m, "slmc.passes") and under(
        i, "slmc.targets", "slmc.runtime_tests", "slmc.api", "slmc.cli"),
    "checks never import passes": lambda m, i: under(m, "slmc.runtime_tests") and under(i, "slmc.passes"),
    "the CLI uses only the API": lambda m, i: m in ("slmc.cli", "slmc.cli_print") and i not in (
        "slmc.api", "slmc.errors", "slmc.build", "slmc.cli_print"),
}


def is_package(name: str) -> bool:
    return (PKG / "targets" / name / "__init__.py").is_file()


@pytest.mark.parametrize("rule", sorted(RULES))
def test_layer_rule(rule):
    assert violations(RULES[rule]) == []


def test_bench_scripts_use_only_the_api():
    bad = [f"{f.name} imports {i}" for f in sorted((ROOT / "bench").glob("*.py"))
           for i in sorted(imports_of(f)) if i not in ("slmc.api", "slmc.errors")]
    assert bad == []


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def _without_package_reexports(g):
    # `import slmc.x.y` runs slmc/x/__init__ first; an __init__ that re-exports its own
    # modules is not a cycle of the code's design, so edges from a module to the
    # packages that contain it are dropped
    return {m: {i for i in deps if not m.startswith(i + ".")} for m, deps in g.items()}


def test_no_import_cycles():
    assert cycles(_without_package_reexports(SLMC)) == []


def test_the_checks_can_fail():
    """Control: each rule and the cycle finder see a planted violation."""
    assert RULES["lowering and targets never use the reference"]("slmc.targets.coreml.module",
                                                                  "slmc.compiler.reference")
    assert RULES["a target never imports another target"]("slmc.targets.coreml.target",
                                                           "slmc.targets.executorch.program")
    assert not RULES["a target never imports another target"]("slmc.targets.coreml.target", "slmc.targets.base")
    assert RULES["compiler imports no upper layer"]("slmc.compiler.pass_manager", "slmc.passes")
    assert RULES["the CLI uses only the API"]("slmc.cli", "slmc.targets")
    assert RULES["the CLI uses only the API"]("slmc.cli_print", "slmc.compiler.ir")
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_recipe_names_a_registered_target():
    from slmc.recipes import RECIPES
    from slmc.targets import TARGETS, load_all

    load_all()
    bad = [(r.name, f) for r in RECIPES.values() for f in r.flows
           if f.split(":")[0] not in TARGETS
           or ":" in f and f.split(":")[1] not in TARGETS[f.split(":")[0]].backends]
    assert bad == []
