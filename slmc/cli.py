"""The `slmc` command line. Bad input: one line on stderr, exit code 2."""

from __future__ import annotations

import functools
import json
import logging
import sys
import warnings
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from .errors import SlmcError, ValidationFailed, ValidationInconclusive

console = Console(stderr=True, highlight=False)


NOISY = ("torch", "executorch", "torchao", "transformers", "coremltools", "litert_torch", "ai_edge_litert")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(format="slmc: %(levelname)s: %(message)s",
                        level=logging.INFO if verbose else logging.WARNING)
    if verbose:
        return
    # The toolchains warn about their own internals on every compile; a user can act on
    # none of it, so it only shows with -v. slmc's own warnings always show.
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="|".join(rf"{m}(\..*)?" for m in NOISY))
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)  # torch pytree, via copyreg


def friendly(fn):
    """Turn SlmcError into one line + exit 2 (ValidationFailed: exit 1, ValidationInconclusive: 3)."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except ValidationFailed as e:
            console.print(f"[red]slmc: validation failed:[/] {escape(str(e))}", soft_wrap=True)
            sys.exit(e.exit_code)
        except ValidationInconclusive as e:
            console.print(f"[yellow]slmc: validation inconclusive:[/] {escape(str(e))}", soft_wrap=True)
            sys.exit(e.exit_code)
        except SlmcError as e:  # paths and names are text, never rich markup ("model[v2]")
            console.print(f"[red]slmc: error:[/] {escape(str(e))}", soft_wrap=True)
            sys.exit(2)

    return wrapper


class _Progress:
    """A spinner naming the current step (gone when done). With -v each step is also
    logged; without, stderr holds nothing but the outcome (one line on error)."""

    def __init__(self, enabled: bool):
        self.enabled, self.status = enabled, None
        ctx = click.get_current_context(silent=True)
        self.log = bool(ctx and ctx.find_root().params.get("verbose"))

    def __enter__(self):
        if self.enabled:
            self.status = console.status("starting")
            self.status.__enter__()
        return self

    def __call__(self, msg: str) -> None:
        if self.status is not None:
            if self.log:
                console.log(escape(msg))
            self.status.update(escape(msg))

    def __exit__(self, *exc):
        if self.status is not None:
            self.status.__exit__(*exc)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log what each step does.")
@click.version_option(package_name="slmc")
def main(verbose: bool) -> None:
    """slmc: compile small language models for phones.

    MODEL is a Hugging Face folder (config.json + safetensors), a .gguf file, an
    slmc IR folder, or `default` (the built-in SmolLM2-135M-Instruct).
    """
    _setup_logging(verbose)


@main.command()
@click.argument("model")
@click.option("--target", "-t", default="executorch", show_default=True, help="executorch")
@click.option("--backend", "-b", default=None, help="Target backend (see `slmc list`).")
@click.option("--out", "-o", "out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--pass", "passes", multiple=True, metavar="NAME[:k=v,...]", help="Run a pass (repeatable).")
@click.option("--recipe", default=None, help="A named pass list, checked against the target (see `slmc list`).")
@click.option("--calib", "calib", multiple=True, type=click.Path(),
              help="Your calibration text (repeatable); default: data-free samples from the model.")
@click.option("--max-seq-len", type=int, default=None, help="KV-cache length (default: min(limit, 2048)).")
@click.option("--strict", is_flag=True, help="Fail, rather than warn, on NaN/Inf weights.")
@click.option("--keep-codes", is_flag=True,
              help="Keep a pre-quantized checkpoint's own codes (GGUF Q4_0/Q4_1/Q8_0, AutoAWQ, GPTQ).")
@click.option("--dump-ir", type=click.Path(path_type=Path), default=None, help="Write the IR after each pass.")
@click.option("--validate/--no-validate", "do_validate", default=False, help="Validate right after compiling.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@friendly
def compile(model, target, backend, out, passes, recipe, calib, max_seq_len, strict, keep_codes, dump_ir,
            do_validate, as_json):
    """Compile MODEL for a target into the folder OUT."""
    from . import api

    opts = api.CompileOptions(model, target=target, backend=backend, out=out, passes=tuple(passes), recipe=recipe,
                              calib=tuple(calib), max_seq_len=max_seq_len, strict=strict, keep_codes=keep_codes,
                              dump_ir=dump_ir)
    with _Progress(not as_json) as progress:
        path, manifest = api.compile(opts, progress)
        if do_validate:
            progress("validating")
            report = api.validate(path)
            manifest["validation"] = json.loads(report.to_json())
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
    else:
        size = sum(manifest["files"].values())
        console.print(f"[green]wrote[/] {escape(str(path))} ({manifest['target']}/{manifest['backend']}, "
                      f"{size / 2**20:.1f} MiB, {manifest['compile_seconds']} s)")
    if do_validate:
        _print_report(report, as_json=False) if not as_json else None
        api.require_pass(report)


def _print_report(report, as_json: bool) -> None:
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


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--steps", default=32, show_default=True, help="Free-running greedy decode steps to compare.")
@click.option("--prompt", default=None, help="Prompt text (default: a fixed English sentence).")
@click.option("--reference", default=None, help="Reference model (default: the manifest's source + passes).")
@click.option("--positions", default=512, show_default=True,
              help="Teacher-forced positions to compare, at least (a statistical PASS needs 512).")
@click.option("--long", "long_", is_flag=True, help="Windows as long as the KV cache: past every window and ring wrap.")
@click.option("--text", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="UTF-8 text to teacher-force (default: text the reference samples, fixed seed).")
@click.option("--json", "as_json", is_flag=True)
@friendly
def validate(artifact, steps, prompt, reference, positions, long_, text, as_json):
    """Run ARTIFACT in its runtime and compare it with the reference executor.
    Exit 0: PASS, 1: FAIL, 3: INCONCLUSIVE (see the README's acceptance rules)."""
    from . import api

    report = api.validate(artifact, api.ValidateOptions(steps=steps, prompt=prompt, reference=reference,
                                                        positions=positions, long=long_, text=text))
    _print_report(report, as_json)
    api.require_pass(report)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", "-p", required=True)
@click.option("--max-new-tokens", "-n", default=64, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0 is greedy.")
@click.option("--chat/--raw", default=True, show_default=True, help="Apply the model's chat template.")
@friendly
def run(artifact, prompt, max_new_tokens, temperature, chat):
    """Generate text with ARTIFACT in its own runtime (streams tokens, reports tok/s)."""
    from . import api

    opts = api.RunOptions(prompt, max_new_tokens=max_new_tokens, temperature=temperature, chat=chat)
    stats = api.run(artifact, opts, on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    sys.stdout.write("\n")
    console.print(f"prefill: {stats['prompt_tokens']} tokens at {stats['prefill_tok_s']:.1f} tok/s, "
                  f"decode: {stats['generated_tokens']} tokens at {stats['decode_tok_s']:.1f} tok/s "
                  f"({stats['runtime']})")


@main.command()
@click.argument("model")
@click.option("--pass", "passes", multiple=True, metavar="NAME[:k=v,...]", help="Run passes, then print.")
@click.option("--max-seq-len", type=int, default=None)
@click.option("--save-ir", type=click.Path(path_type=Path), default=None, help="Also save the IR folder.")
@click.option("--keep-codes", is_flag=True, help="Keep a pre-quantized checkpoint's own codes.")
@friendly
def inspect(model, passes, max_seq_len, save_ir, keep_codes):
    """Print MODEL's IR (after the given passes)."""
    from . import api

    text = api.inspect(model, api.InspectOptions(passes=tuple(passes), max_seq_len=max_seq_len,
                                                  keep_codes=keep_codes, save_ir=save_ir))
    click.echo(text, nl=False)


@main.command("eval")
@click.argument("subject")
@click.option("--text", "texts", multiple=True, required=True, type=click.Path(),
              help="Your own UTF-8 text file(s) (repeatable).")
@click.option("--pass", "passes", multiple=True, metavar="NAME[:k=v,...]", help="Passes to apply to a MODEL.")
@click.option("--window", default=512, show_default=True)
@click.option("--stride", default=None, type=int, help="Window step (default: window / 2).")
@click.option("--max-tokens", default=4096, show_default=True)
@click.option("--reference", default=None, help="fp32 reference model (default: the source, no passes).")
@click.option("--json", "as_json", is_flag=True)
@friendly
def eval_(subject, texts, passes, window, stride, max_tokens, reference, as_json):
    """Perplexity of SUBJECT (a model or an artifact) on text; KL and top-1 vs the fp32 reference."""
    from . import api

    r = api.evaluate(subject, api.EvalOptions(tuple(texts), passes=tuple(passes), window=window,
                                              stride=stride or max(1, window // 2), max_tokens=max_tokens,
                                              reference=reference))
    if as_json:
        click.echo(json.dumps(r.to_dict(), indent=2))
        return
    line = f"perplexity {r.perplexity:.3f} over {r.tokens_scored} tokens (window {r.window}, stride {r.stride})"
    if r.kl_divergence is not None:
        line += (f"; reference perplexity {r.reference_perplexity:.3f}, KL {r.kl_divergence:.4f} nats, "
                 f"top-1 agreement {r.top1_agreement:.1%}")
    click.echo(line)


@main.command("list")
def list_() -> None:
    """List families, passes, targets and recipes."""
    from . import api

    c = api.catalog()
    click.echo("architectures: " + ", ".join(c.architectures))
    click.echo("passes: " + ", ".join(c.passes))
    for name, backends in c.targets.items():
        click.echo(f"target {name}: backends {', '.join(backends)}")
    for name, flows, about in c.recipes:
        click.echo(f"recipe {name} ({', '.join(flows)}): {about}")


@main.command("default-model")
@friendly
def default_model() -> None:
    """Prepare the built-in SmolLM2-135M-Instruct (once) and print its folder."""
    from . import api

    click.echo(str(api.default_model()))


if __name__ == "__main__":
    main()
