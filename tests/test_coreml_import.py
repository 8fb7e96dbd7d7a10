"""coremltools is imported without scikit-learn (targets/coreml_import.py): a Core ML compile never
loads it, coremltools' own view of it is what a plain import gives, and the user can still import it."""

import subprocess
import sys

import pytest

pytest.importorskip("coremltools")
pytest.importorskip("sklearn")  # with no scikit-learn there is nothing to hide


def _run(code: str) -> list[str]:
    """What the code printed, one string per line."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()


PROBE = "import sys; from coremltools._deps import _HAS_SKLEARN; print('sklearn' in sys.modules, _HAS_SKLEARN)"


@pytest.fixture(scope="module")
def plain() -> list[str]:
    return _run("import coremltools; " + PROBE)[-1].split()


def test_plain_import_loads_sklearn(plain):
    """The control: what the guard avoids does happen without it."""
    assert plain[0] == "True"


def test_guarded_import_leaves_sklearn_out_and_the_same_converters_on(plain):
    guarded, after = _run("from slmc.targets.coreml_import import coremltools; coremltools(); " + PROBE
                          + "; import sklearn; print(sys.modules['sklearn'].__name__)")[-2:]
    assert after == "sklearn", "the user could not import scikit-learn after slmc imported coremltools"
    loaded, has = guarded.split()
    assert loaded == "False"
    # sklearn's converters are off under both imports with these pins; if a pin made a plain
    # import turn them on, the guard would change what coremltools offers: this says so
    assert has == plain[1], "hiding scikit-learn turned coremltools' sklearn converters off"


def test_a_coreml_compile_never_loads_sklearn(tiny_llama_dir, tmp_path):
    code = (f"import sys; from slmc import api; "
            f"api.compile_model({str(tiny_llama_dir)!r}, 'coreml', 'cpu:deployment_target=ios17', {str(tmp_path / 'out')!r}, max_seq_len=32); "
            f"print('sklearn' in sys.modules, 'coremltools' in sys.modules)")
    assert _run(code)[-1] == "False True"
