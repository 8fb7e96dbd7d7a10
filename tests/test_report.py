"""The HTML report (issue 14, item 5): one self-contained page, rendered by a real browser
(Debian's headless chromium) with its plot drawn; a page without the plot is the control
(none of the plot's line colour on screen)."""

from __future__ import annotations

import dataclasses
import enum
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from slmc import api
from slmc.compiler.families import FAMILIES, load_all
from slmc.runtime_tests.report import COLORS, render, verdict_word

load_all()

PLOT_RGB = tuple(int(COLORS[0][i:i + 2], 16) for i in (1, 3, 5))  # the first pair's line


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from tiny import save_ascii_tokenizer, save_hf_model

    d = tmp_path_factory.mktemp("llama")
    cfg = FAMILIES["llama"].tiny_config()
    save_hf_model(cfg, d)
    save_ascii_tokenizer(d, cfg["vocab_size"])
    # LiteRT: the page is target-agnostic, and its compile is a third of ExecuTorch 8da's on the CI machine
    folder, _ = api.compile_model(d, "tflite", "cpu", tmp_path_factory.mktemp("a") / "tfl", max_seq_len=32,
                                  passes=["quant.rtn:bits=8,group_size=0,scale_dtype=bfloat16,act_bits=8,symmetric=true"])
    return folder, api.reference_model(folder, api.read_manifest(folder))


@pytest.fixture(scope="module")
def pages(artifact, tmp_path_factory):
    folder, ir = artifact
    report = api.validate_artifact(folder, steps=4, model=ir, record=False)
    diff = api.diff(folder, model_a=ir)
    out = tmp_path_factory.mktemp("html")
    full = api.write_report(out / "full.html", artifact=folder, validation=report, diffs=[diff], model=ir)
    bare = api.write_report(out / "bare.html", artifact=folder, validation=report, model=ir)
    return full, bare, report, diff


def test_page_is_self_contained(pages, artifact):
    full, _, report, diff = pages
    page = full.read_text()
    # nothing to fetch: no scripts, links, sources, CSS urls or imports
    assert not re.search(r"<script|<link|<img|<iframe|\bsrc=|\bhref=|url\(|@import", page, re.I)
    assert page.count("<svg") >= 2 and "<polyline" in page
    assert f">{verdict_word(report)}</span>" in page and diff.passed and ">PASS</span>" in page
    assert "Pass pipeline" in page and "quant.rtn" in page
    for p in api.read_manifest(artifact[0])["pipeline"]:  # every pass the artifact's manifest lists
        assert p["name"] in page, p["name"]
    for s in diff.stages:
        assert f">{s['stage']}<" in page
    assert "attention" in page and "int8" in page  # size by tensor kind and scheme
    assert f"{report.prompt_tokens}" in page


def test_validation_rendered_from_its_fields():
    """Whatever the validation report's fields are (validate's rules change), they are shown."""
    class Verdict(enum.Enum):
        INCONCLUSIVE = "inconclusive"

    @dataclasses.dataclass
    class Report:
        artifact: str
        verdict: Verdict
        mean_kl: float
        tolerance: dict
        notes: list

    r = Report("x", Verdict.INCONCLUSIVE, 0.0123, {"max_kl": 0.05}, ["noise floor above the bound"])
    assert verdict_word(r) == "INCONCLUSIVE"
    page = render("t", validation=r)
    assert "INCONCLUSIVE" in page and "mean_kl" in page and "0.0123" in page and "max_kl" in page
    assert "noise floor above the bound" in page


def _screenshot(page: Path, out: Path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1000,1600",
           f"--screenshot={out}", page.resolve().as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    dom = subprocess.run([*cmd[:5], "--dump-dom", page.resolve().as_uri()], check=True, capture_output=True,
                         timeout=120, text=True).stdout
    return out, dom


def test_browser_renders_the_plot(pages, tmp_path):
    Image = pytest.importorskip("PIL.Image")
    full, bare, _, _ = pages
    png, dom = _screenshot(full, tmp_path / "full.png")
    assert "<svg" in dom and "<polyline" in dom and "Per-block error" in dom
    img = Image.open(png).convert("RGB")
    colors = img.getcolors(maxcolors=1 << 20)
    assert len(colors) > 20  # text, tables, badges: not a blank page
    line = sum(n for n, c in colors if all(abs(a - b) <= 8 for a, b in zip(c, PLOT_RGB)))
    assert line > 200, f"the plot's line is not on screen ({line} pixels)"
    # control: the same page without the plot has none of its colour
    png, dom = _screenshot(bare, tmp_path / "bare.png")
    colors = Image.open(png).convert("RGB").getcolors(maxcolors=1 << 20)
    assert sum(n for n, c in colors if all(abs(a - b) <= 8 for a, b in zip(c, PLOT_RGB))) == 0
    assert "<polyline" not in dom


def test_validate_cli_writes_the_report(artifact, tmp_path):
    from click.testing import CliRunner

    from slmc.cli import main

    folder, _ = artifact
    page = tmp_path / "v.html"
    r = CliRunner().invoke(main, ["validate", str(folder), "--steps", "2", "--report", str(page)])
    assert r.exit_code in (0, 1), r.output  # the verdict is validate's; the page is written either way
    text = page.read_text()
    assert "Validation" in text and ("PASS" in text or "FAIL" in text) and "Pass pipeline" in text
