"""coremltools, imported without scikit-learn.

coremltools' `__init__` imports scikit-learn (which imports scipy.stats) only to decide whether
its sklearn converters are on. slmc converts torch programs only, and ExecuTorch requires a
scikit-learn (>= 1.7.1) newer than coremltools supports, so coremltools turns them off anyway.
The import alone was a large share of a Core ML compile's peak memory (bench/results/memory.md),
so the first import goes through `coremltools()`, which hides scikit-learn while coremltools
loads. The one effect outside slmc: in a process that imported coremltools through slmc, its
sklearn converters stay off, as they are with today's pins.

It sits beside the target packages, not in coreml/, because ExecuTorch's Core ML delegate
imports coremltools too, and a target never imports another target (tests/test_layering.py).
"""

from __future__ import annotations

import sys

_HIDDEN = ("sklearn",)


def coremltools():
    """The coremltools module, imported here the first time."""
    if "coremltools" not in sys.modules:
        hidden = [m for m in _HIDDEN if m not in sys.modules]
        for m in hidden:
            sys.modules[m] = None  # `import sklearn` raises ImportError: coremltools carries on without it
        try:
            import coremltools  # noqa: F401
        finally:
            for m in hidden:  # a later `import sklearn` by the user works as before
                if m in sys.modules and sys.modules[m] is None:
                    del sys.modules[m]
    return sys.modules["coremltools"]
