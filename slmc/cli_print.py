"""How the command line prints validation, diff and block-isolated reports (rich tables)."""

from __future__ import annotations

import click
from rich.console import Console
from rich.markup import escape


def print_report(report, as_json: bool) -> None:
    if as_json:
        click.echo(report.to_json())
        return
    from rich.table import Table

    t = Table(title=f"validation of {report.artifact} ({report.runtime}; {report.flow})")
    t.add_column("check")
    t.add_column("value", justify="right")
    t.add_column("bound", justify="right")
    tol = report.tolerance
    exact = tol.get("max_abs") is not None
    t.add_row(f"positions compared ({report.windows} windows of ≤ {report.window_len})", str(report.positions),
              f"≥ {tol['min_positions']}" if tol.get("min_positions") else "-")
    t.add_row("max |Δ| logits, teacher-forced + prefill", f"{report.prefill_max_abs:.3g}",
              f"≤ {tol['max_abs']:g}" if exact else "-")
    t.add_row(f"max |Δ| logits, greedy decode ({report.decode_steps} steps)", f"{report.decode_max_abs:.3g}",
              f"≤ {tol['max_abs']:g}" if exact else "-")
    t.add_row("top-1 agreement", f"{report.top1_agreement:.1%}", f"≥ {tol['min_top1']:.1%}" if tol else "-")
    t.add_row("mean KL(reference ‖ artifact), nats", f"{report.mean_kl:.3g}",
              f"≤ {tol['max_kl']:g}" if tol.get("max_kl") is not None else "-")
    t.add_row(f"Δ perplexity ({report.reference_ppl:.4g} → {report.artifact_ppl:.4g})", f"{report.delta_ppl:+.3%}",
              f"≤ ±{tol['max_dppl']:.2%}" if tol.get("max_dppl") is not None else "-")
    if report.noise_floor:
        nf = report.noise_floor
        t.add_row(f"noise floor (reference nudged {nf['nudge']:g}): KL / top-1 / Δppl",
                  f"{nf['mean_kl']:.3g} / {nf['top1']:.1%} / {nf['delta_ppl']:+.3%}", "diagnostic")
    t.add_row("greedy text equal", "yes" if report.greedy_equal else
              f"no (first diff at {report.first_divergence})", "required" if tol.get("greedy_equal") else "-")
    colour = {"PASS": "green", "FAIL": "red"}.get(report.verdict, "yellow")
    t.add_row("verdict", f"[{colour}]{report.verdict}[/]", "")
    Console().print(t)
    for line in report.reasons:
        Console().print(f"{report.verdict.lower()}: {escape(line)}", soft_wrap=True)
    for line in report.notes:
        Console().print(f"note: {escape(line)}", soft_wrap=True)
    Console().print(f"text: {report.text_source}\nreference: {report.reference_text!r}\n"
                    f"artifact:  {report.artifact_text!r}", soft_wrap=True)


def debug_check_line(c: dict) -> str:
    return (f"debug variant vs the artifact's own last logits: rel RMS {c['rel_rms']:.3g} "
            f"(≤ {c['bound']:.3g}: {'matches' if c['matches'] else 'DIFFERS'})")


def print_isolated(r, by_block: bool = False) -> None:
    from rich.table import Table

    t = Table(title=f"{r.artifact}: block-isolated check ({r.runtime}, {r.prompt_tokens} prompt tokens)")
    for col in ("stage", "isolated rel", "max |Δ|", "cosine", "noise floor", f"rel ≤ {r.bound:.3g}"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    for s in r.stages:
        t.add_row(s["stage"], f"{s['rel']:.3g}", f"{s['max_abs']:.3g}", f"{s['cosine']:.6f}", f"{s['floor']:.3g}",
                  "yes" if s["within"] else "[red]no[/]")
    out = Console()
    out.print(t)
    out.print(f"{escape(r.how)}; rel: a block's ‖Δ out‖ / ‖reference update‖, else ‖Δ‖ / ‖reference‖", soft_wrap=True)
    if r.artifact_check:
        out.print(debug_check_line(r.artifact_check))
    out.print(f"bound: {escape(r.bound_why)}", soft_wrap=True)
    for n in r.notes:
        out.print(f"[yellow]note:[/] {escape(n)}", soft_wrap=True)
    e = r.end_to_end
    if e is not None:
        out.print(f"end-to-end verdict (recorded; {escape(str(e.get('flow')))}, ran in {escape(str(e.get('runtime')))}): "
                  f"{e.get('verdict')}"
                  + (f": {escape('; '.join(e.get('reasons') or []))}" if e.get("reasons") else ""), soft_wrap=True)
    elif by_block:
        out.print("end-to-end verdict: none recorded in the manifest (run `slmc validate` without --by-block)")
    colour = {"PASS": "green", "FAIL": "red"}.get(r.verdict, "yellow")
    where = f"first stage past the bound: {r.first_past}" if r.first_past else "every stage within the bound"
    out.print(f"{escape(r.what)}", soft_wrap=True)
    out.print(f"block-isolated verdict: [{colour}]{r.verdict}[/] ({where})")


def print_diff(r) -> None:
    from rich.table import Table

    t = Table(title=f"{r.a} vs {r.b} ({r.mode}, {r.prompt_tokens} prompt tokens)")
    for col in ("stage", "max |Δ|", "rel RMS", "cosine", f"rel RMS ≤ {r.bound:.3g}"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    for s in r.stages:
        ok = "yes" if s["within"] else "[red]no[/]"
        t.add_row(s["stage"], f"{s['max_abs']:.3g}", f"{s['rel_rms']:.3g}", f"{s['cosine']:.6f}", ok)
    out = Console()
    out.print(t)
    for s in r.sides:
        out.print(f"{escape(s['label'])}: {escape(s['how'])}", soft_wrap=True)
        if s.get("artifact_check"):
            out.print("  " + debug_check_line(s["artifact_check"]))
    out.print(f"bound: {escape(r.bound_why)}", soft_wrap=True)
    for n in r.notes:
        out.print(f"[yellow]note:[/] {escape(n)}", soft_wrap=True)
    if r.mode == "float-vs-quantized":
        where = r.first_past or "nowhere"
        out.print(f"quantization error first exceeds one rounding of the scheme at: {where}")
    elif any(s.get("artifact_check") and not s["artifact_check"]["matches"] for s in r.sides):
        out.print("[red]no verdict on the blocks: a debug variant does not reproduce its artifact[/]")
    else:
        out.print(f"first stage past the bound: [red]{r.first_past}[/]" if r.first_past
                  else "[green]every stage within the bound[/]")
        if r.verdict == "INCONCLUSIVE":
            out.print("[yellow]INCONCLUSIVE[/]: the reference's own noise floor is past the bound there (note above)")
