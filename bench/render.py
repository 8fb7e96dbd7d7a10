"""Re-render every bench/results/*.md, and the notes blocks of bench/README.md, from the
results JSON (no benchmark runs). `python bench/render.py [SCRIPT]`; each script's
`--render` does the same for its own results. The suite checks the committed files are
exactly what this writes (tests/test_bench.py)."""

import sys

from _common import render

if __name__ == "__main__":
    render(sys.argv[1] if len(sys.argv) > 1 else None)
