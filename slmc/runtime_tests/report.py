"""One self-contained HTML page (`--report FILE.html`) for `validate` and `diff`: the verdict and
its bounds, the per-block error plot (inline SVG, one line per compared pair), the artifact's
weight bytes by tensor kind and scheme, the pass pipeline and the manifest summary.

Nothing external: inline CSS, inline SVG, no script, no fonts, no links to fetch. A validation
report is rendered from its dataclass fields generically (whatever fields it has: verdict or
passed, the tolerance dict, notes, numbers), so the page follows validate's own rules.
"""

from __future__ import annotations

import dataclasses
import html
import math
from pathlib import Path

from ..compiler.ir import Model, QuantWeight, named_weights

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1000px;color:#1d2430}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #d8dde6;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #d8dde6;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f2f4f8}td.n{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#fff;background:#1f8a4c;padding:2px 10px;border-radius:4px;font-weight:600}
.fail{color:#fff;background:#c0392b;padding:2px 10px;border-radius:4px;font-weight:600}
.other{color:#fff;background:#b7791f;padding:2px 10px;border-radius:4px;font-weight:600}
code{background:#f2f4f8;padding:1px 4px;border-radius:3px}.bad{color:#c0392b;font-weight:600}
"""
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b")


def e(x) -> str:
    return html.escape(str(x))


def _num(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return e(v)


def _kv_table(d: dict) -> str:
    rows = []
    for k, v in d.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={_num(b)}" for a, b in v.items())
        elif isinstance(v, (list, tuple)):
            v = ", ".join(_num(x) for x in v)
        cls = ' class="n"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
        rows.append(f"<tr><th>{e(k)}</th><td{cls}>{_num(v) if not isinstance(v, str) else e(v)}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def _badge(word: str) -> str:
    cls = {"PASS": "pass", "FAIL": "fail"}.get(word.upper(), "other")
    return f'<span class="{cls}">{e(word.upper())}</span>'


def verdict_word(report) -> str:
    """'PASS'/'FAIL' from `passed`, or the report's own `verdict` (a string or an enum)."""
    v = getattr(report, "verdict", None)
    if v is not None:
        return str(getattr(v, "name", getattr(v, "value", v))).upper()
    return "PASS" if getattr(report, "passed", False) else "FAIL"


def validation_section(report) -> str:
    fields = {f.name: getattr(report, f.name) for f in dataclasses.fields(report)}
    tol = fields.pop("tolerance", None)
    notes = fields.pop("notes", None) or []
    texts = {k: fields.pop(k) for k in list(fields) if isinstance(fields[k], str) and len(fields[k]) > 60}
    out = [f"<h2>Validation {_badge(verdict_word(report))}</h2>", _kv_table(fields)]
    if tol:
        out += ["<h3>Bounds</h3>", _kv_table(tol if isinstance(tol, dict) else dataclasses.asdict(tol))]
    if notes:
        out += ["<h3>Notes</h3><ul>", *(f"<li>{e(n)}</li>" for n in notes), "</ul>"]
    for k, v in texts.items():
        out.append(f"<p><b>{e(k)}</b>: <code>{e(v)}</code></p>")
    return "\n".join(out)


def error_plot(diffs, width: int = 900, height: int = 340) -> str:
    """Relative RMS per stage, log scale, one line per compared pair, its bound dashed."""
    pad_l, pad_r, pad_t, pad_b = 60, 70, 20, 90
    n = max(len(d.stages) for d in diffs)
    vals = [s["rel_rms"] for d in diffs for s in d.stages if s["rel_rms"] > 0] + [d.bound for d in diffs if d.bound > 0]
    lo = math.floor(math.log10(min(vals))) if vals else -8
    hi = math.ceil(math.log10(max(vals))) if vals else 0
    hi = max(hi, lo + 1)
    w, h = width - pad_l - pad_r, height - pad_t - pad_b

    def x(i):
        return pad_l + (w * i / max(n - 1, 1))

    def y(v):
        v = max(v, 10.0 ** lo)
        return pad_t + h * (hi - math.log10(v)) / (hi - lo)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 22 * len(diffs)}" '
             f'viewBox="0 0 {width} {height + 22 * len(diffs)}" role="img" aria-label="relative RMS error per stage">',
             f'<rect x="0" y="0" width="{width}" height="{height + 22 * len(diffs)}" fill="#ffffff"/>']
    for p in range(lo, hi + 1):
        parts.append(f'<line x1="{pad_l}" x2="{pad_l + w}" y1="{y(10.0 ** p):.1f}" y2="{y(10.0 ** p):.1f}" '
                     'stroke="#e3e7ee"/>')
        parts.append(f'<text x="{pad_l - 6}" y="{y(10.0 ** p) + 4:.1f}" font-size="11" text-anchor="end">1e{p}</text>')
    names = [s["stage"] for s in max(diffs, key=lambda d: len(d.stages)).stages]
    step = max(1, len(names) // 40)
    for i, name in enumerate(names):
        if i % step == 0 or i == len(names) - 1:
            parts.append(f'<text font-size="11" transform="translate({x(i) + 4:.1f},{pad_t + h + 8}) rotate(60)">'
                         f'{e(name)}</text>')
    parts.append(f'<line x1="{pad_l}" x2="{pad_l}" y1="{pad_t}" y2="{pad_t + h}" stroke="#555"/>'
                 f'<line x1="{pad_l}" x2="{pad_l + w}" y1="{pad_t + h}" y2="{pad_t + h}" stroke="#555"/>'
                 f'<text x="14" y="{pad_t + h / 2}" font-size="12" transform="rotate(-90 14 {pad_t + h / 2})" '
                 'text-anchor="middle">relative RMS</text>')
    for k, d in enumerate(diffs):
        c = COLORS[k % len(COLORS)]
        pts = " ".join(f"{x(i):.1f},{y(s['rel_rms']):.1f}" for i, s in enumerate(d.stages))
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="2"/>')
        parts += [f'<circle cx="{x(i):.1f}" cy="{y(s["rel_rms"]):.1f}" r="3" fill="{c}"/>'
                  for i, s in enumerate(d.stages)]
        if d.bound > 0:
            parts.append(f'<line x1="{pad_l}" x2="{pad_l + w}" y1="{y(d.bound):.1f}" y2="{y(d.bound):.1f}" '
                         f'stroke="{c}" stroke-dasharray="6 4"/>')
        ly = height + 22 * k + 6
        parts.append(f'<line x1="{pad_l}" x2="{pad_l + 30}" y1="{ly}" y2="{ly}" stroke="{c}" stroke-width="2"/>'
                     f'<text x="{pad_l + 38}" y="{ly + 4}" font-size="12">{e(_pair(d))} (dashed: bound '
                     f'{d.bound:.3g})</text>')
    parts.append("</svg>")
    return "".join(parts)


def _pair(d) -> str:
    return f"{Path(d.a).name or d.a} vs {Path(d.b).name or d.b}" if d.mode == "artifact-vs-artifact" \
        else f"{Path(d.a).name or d.a} vs {d.b}"


def diff_section(d) -> str:
    word = (d.verdict or ("PASS" if d.passed else "FAIL")) if d.mode != "float-vs-quantized" else "INFO"
    rows = "".join(
        f"<tr><td>{e(s['stage'])}</td><td class=n>{s['max_abs']:.3g}</td><td class=n>{s['rel_rms']:.3g}</td>"
        f"<td class=n>{s['cosine']:.6f}</td><td>{'yes' if s['within'] else '<span class=bad>no</span>'}</td></tr>"
        for s in d.stages)
    sides = "".join(f"<li><b>{e(s['label'])}</b>: {e(s['how'])} (bound {s['bound']:.3g}: {e(s['why'])})"
                    + (f"; debug variant vs the artifact's own last logits: rel RMS "
                       f"{s['artifact_check']['rel_rms']:.3g} ({'matches' if s['artifact_check']['matches'] else 'DIFFERS'})"
                       if s.get("artifact_check") else "") + "</li>" for s in d.sides)
    first = (f"first stage past the bound: <span class=bad>{e(d.first_past)}</span>" if d.first_past
             else "every stage within the bound")
    notes = "".join(f"<li>{e(n)}</li>" for n in d.notes)
    return (f"<h2>{e(_pair(d))} {_badge(word)}</h2><p>{e(d.mode)}, {d.prompt_tokens} prompt tokens; bound: relative "
            f"RMS ≤ {d.bound:.3g} ({e(d.bound_why)}); {first}.</p><ul>{sides}{notes}</ul>"
            f"<table><tr><th>stage</th><th>max |Δ|</th><th>rel RMS</th><th>cosine</th><th>within</th></tr>{rows}</table>")


def tensor_kind(name: str) -> str:
    if name.startswith("embed"):
        return "embedding"
    if name.startswith("lm_head"):
        return "head"
    if "norm" in name:
        return "norm"
    if ".attn." in name:
        return "attention"
    if ".ffn." in name:
        return "mlp" if ".experts." not in name else "experts"
    return "other"


def size_breakdown(model: Model) -> list[tuple[str, str, int, int]]:
    """(tensor kind, scheme, tensors, bytes of codes + scales + zeros or of the float tensor)."""
    acc: dict[tuple[str, str], list[int]] = {}
    for name, w in named_weights(model):
        scheme = w.dtype + (f"+act_int{w.act_bits}" if isinstance(w, QuantWeight) and w.act_bits else "")
        row = acc.setdefault((tensor_kind(name), scheme), [0, 0])
        row[0] += 1
        row[1] += w.nbytes()
    return [(k, s, n, b) for (k, s), (n, b) in sorted(acc.items(), key=lambda kv: -kv[1][1])]


def size_section(model: Model | None, manifest: dict | None) -> str:
    out = ["<h2>Size</h2>"]
    if model is not None:
        rows = size_breakdown(model)
        total = sum(r[3] for r in rows) or 1
        bar_w = 300
        trs = "".join(
            f"<tr><td>{e(k)}</td><td><code>{e(s)}</code></td><td class=n>{n}</td><td class=n>{b / 2**20:.3f}</td>"
            f"<td class=n>{b / total:.1%}</td><td><svg xmlns='http://www.w3.org/2000/svg' width='{bar_w}' height='12'>"
            f"<rect width='{max(1, round(bar_w * b / total))}' height='12' fill='#7f8c9a'/></svg></td></tr>"
            for k, s, n, b in rows)
        out.append("<p>Weight bytes as the IR stores them (codes at their bit width, scales and zeros), "
                   "each shared tensor once:</p>"
                   "<table><tr><th>tensor kind</th><th>scheme</th><th>tensors</th><th>MiB</th><th>share</th><th></th></tr>"
                   f"{trs}<tr><th colspan=3>total</th><td class=n>{total / 2**20:.3f}</td><td></td><td></td></tr></table>")
    files = (manifest or {}).get("files") or {}
    if files:
        out.append("<p>Artifact files:</p>" + _kv_table({k: f"{v / 2**20:.3f} MiB" for k, v in files.items()}))
    return "\n".join(out)


def pipeline_section(manifest: dict | None, passes=()) -> str:
    steps = (manifest or {}).get("pipeline") or [{"name": p} for p in passes]
    if not steps:
        return "<h2>Pass pipeline</h2><p>no passes</p>"
    rows = "".join(f"<tr><td>{i}</td><td><code>{e(p.get('name'))}</code></td><td>"
                   f"{e(', '.join(f'{k}={v}' for k, v in (p.get('options') or {}).items()))}</td>"
                   f"<td>{_num(p.get('modified'))}</td><td class=n>{_num(p.get('seconds'))}</td></tr>"
                   for i, p in enumerate(steps, 1))
    recipe = (manifest or {}).get("recipe")
    return (f"<h2>Pass pipeline</h2>{'<p>recipe <code>' + e(recipe) + '</code></p>' if recipe else ''}"
            f"<table><tr><th>#</th><th>pass</th><th>options</th><th>modified</th><th>s</th></tr>{rows}</table>")


def manifest_section(manifest: dict | None) -> str:
    if not manifest:
        return ""
    keys = ("target", "backend", "format", "artifact", "recipe", "compile_seconds")
    head = {k: manifest[k] for k in keys if manifest.get(k) is not None}
    out = ["<h2>Manifest</h2>", _kv_table(head)]
    for k in ("model", "kv_cache_spec", "quantization", "source", "versions"):
        if manifest.get(k):
            out += [f"<h3>{e(k)}</h3>", _kv_table(manifest[k])]
    return "\n".join(out)


def render(title: str, validation=None, diffs=(), model: Model | None = None, manifest: dict | None = None) -> str:
    body = [f"<h1>{e(title)}</h1>"]
    if validation is not None:
        body.append(validation_section(validation))
    if diffs:
        body += ["<h2>Per-block error</h2>", error_plot(list(diffs)), *(diff_section(d) for d in diffs)]
    passes = [p for d in diffs for p in getattr(d, "passes", [])]
    body += [size_section(model, manifest), pipeline_section(manifest, passes), manifest_section(manifest)]
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>" + e(title) + "</title><style>"
            + CSS + "</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
