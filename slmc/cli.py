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

from .cli_print import print_diff, print_isolated, print_report
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
        print_report(report, as_json=False) if not as_json else None
        api.require_pass(report)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--steps", default=32, show_default=True, help="Free-running greedy decode steps to compare.")
@click.option("--prompt", default=None, help="Prompt text (default: a fixed English sentence).")
@click.option("--reference", default=None, help="Reference model (default: the manifest's source + passes).")
@click.option("--on", "on", default=None, metavar="DEVICE",
              help="Run the same teacher-forced windows and greedy steps inside a device (qemu-arm64, "
                   "adb[:SERIAL]) with the artifact's own checker (check/), and judge them here.")
@click.option("--positions", default=512, show_default=True,
              help="Teacher-forced positions to compare, at least (a statistical PASS needs 512).")
@click.option("--long", "long_", is_flag=True, help="Windows as long as the KV cache: past every window and ring wrap.")
@click.option("--text", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="UTF-8 text to teacher-force (default: text the reference samples, fixed seed).")
@click.option("--by-block", "by_block", is_flag=True,
              help="The block-isolated check instead: every block fed the artifact's own input to it (with --on: "
                   "its debug program run inside the device); the recorded end-to-end verdict is shown beside it.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--report", "html", type=click.Path(path_type=Path), default=None, help="Also write an HTML report.")
@friendly
def validate(artifact, steps, prompt, reference, on, positions, long_, text, by_block, as_json, html):
    """Run ARTIFACT in its runtime and compare it with the reference executor.
    Exit 0: PASS, 1: FAIL, 3: INCONCLUSIVE (see the README's acceptance rules)."""
    from . import api

    if by_block:
        if text or long_ or html:
            raise SlmcError("--by-block judges blocks on the prompt (--prompt); --text, --long and --report are "
                            "end-to-end validation's", "--by-block")
        r = api.validate_by_block(artifact, api.ValidateOptions(prompt=prompt, reference=reference, on=on))
        click.echo(r.to_json()) if as_json else print_isolated(r, by_block=True)
        api.require_block_pass(r)
        return
    report = api.validate(artifact, api.ValidateOptions(steps=steps, prompt=prompt, reference=reference, on=on,
                                                        positions=positions, long=long_, text=text))
    if html:
        api.write_report(html, artifact=artifact, validation=report)
    print_report(report, as_json)
    api.require_pass(report)


@main.group()
def device() -> None:
    """Devices that `slmc validate --on` runs an artifact's check bundle on."""


@device.command("setup")
@click.argument("name", type=click.Choice(["qemu-arm64"]))
@friendly
def device_setup(name):
    """Build NAME once (cached by a content hash; a second call does nothing): qemu-arm64 is an
    arm64 Debian root filesystem with LiteRT, ExecuTorch and onnxruntime, run under qemu-user."""
    from . import api

    with _Progress(True) as progress:
        d = api.device_setup(name, progress)
    runs = ", ".join(f"{r}: {'ok' if why is None else 'NO (' + why + ')'}" for r, why in d["runtimes"].items())
    console.print(f"{name} {'(cached) ' if d['cached'] else ''}at {escape(d['path'])}; {escape(runs)}; "
                  f"setup seconds {d['seconds']}", soft_wrap=True)


@main.command()
@click.argument("a")
@click.argument("b", required=False)
@click.option("--prompt", default=None, help="Prompt text (default: validate's fixed sentence).")
@click.option("--pass", "passes", multiple=True, metavar="NAME[:k=v,...]",
              help="A is a model: quantize with these passes and compare float vs quantized IR.")
@click.option("--recipe", default=None, help="A is a model: quantize with this recipe's passes.")
@click.option("--max-seq-len", type=int, default=None, help="A is a model: its KV-cache length.")
@click.option("--isolated", is_flag=True, help="A artifact, B omitted: judge every block on the artifact's own "
                                               "input to it (errors do not compound; a tighter bound).")
@click.option("--json", "as_json", is_flag=True)
@click.option("--report", "html", type=click.Path(path_type=Path), default=None, help="Also write an HTML report.")
@friendly
def diff(a, b, prompt, passes, recipe, max_seq_len, isolated, as_json, html):
    """Compare hidden states block by block: artifact A vs its reference IR (B omitted or
    `reference`), vs artifact B, or vs model B; or model A's float vs quantized IR (--pass/--recipe)."""
    from . import api

    if isolated:
        if b is not None and b != "reference" or passes or recipe or html:
            raise SlmcError("--isolated compares artifact A with its own reference IR (no B, --pass, --recipe, "
                            "--report)", "--isolated")
        r = api.diff_isolated(a, api.DiffOptions(prompt=prompt))
        click.echo(r.to_json()) if as_json else print_isolated(r)
        sys.exit({"PASS": 0, "INCONCLUSIVE": 3}.get(r.verdict, 1))
    r = api.diff(a, b, api.DiffOptions(prompt=prompt, passes=tuple(passes), recipe=recipe, max_seq_len=max_seq_len))
    if html:
        api.write_report(html, artifact=a if r.mode != "float-vs-quantized" else None, diffs=[r])
    if as_json:
        click.echo(r.to_json())
    else:
        print_diff(r)
    if r.verdict == "INCONCLUSIVE":
        sys.exit(3)
    if not r.passed:
        sys.exit(1)


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
@click.option("--calib", "calib", multiple=True, type=click.Path(),
              help="Calibration text for the data-aware --pass (repeatable); default: data-free samples.")
@click.option("--json", "as_json", is_flag=True)
@friendly
def eval_(subject, texts, passes, window, stride, max_tokens, reference, calib, as_json):
    """Perplexity of SUBJECT (a model or an artifact) on text; KL and top-1 vs the fp32 reference."""
    from . import api

    r = api.evaluate(subject, api.EvalOptions(tuple(texts), passes=tuple(passes), window=window,
                                              stride=stride or max(1, window // 2), max_tokens=max_tokens,
                                              reference=reference, calib=tuple(calib)))
    if as_json:
        click.echo(json.dumps(r.to_dict(), indent=2))
        return
    line = f"perplexity {r.perplexity:.3f} over {r.tokens_scored} tokens (window {r.window}, stride {r.stride})"
    if r.kl_divergence is not None:
        line += (f"; reference perplexity {r.reference_perplexity:.3f}, KL {r.kl_divergence:.4f} nats, "
                 f"top-1 agreement {r.top1_agreement:.1%}")
    click.echo(line)


@main.command()
@click.option("--config", "-c", default="slmc.toml", show_default=True, type=click.Path(path_type=Path),
              help="The app's slmc.toml.")
@click.option("--platform", "platforms", multiple=True, help="android, ios or host (repeatable; default: all).")
@click.option("--jobs", "-j", default=1, show_default=True, help="Cache misses compiled in parallel.")
@click.option("--cache", default=None, type=click.Path(path_type=Path), help="Cache folder "
              "(default: $SLMC_CACHE/build, else ~/.cache/slmc/build).")
@click.option("--depfile", default=None, type=click.Path(path_type=Path), help="Depfile (default: slmc.d).")
@click.option("--stamp", default=None, type=click.Path(path_type=Path), help="File touched on success.")
@click.option("--out", default=None, type=click.Path(path_type=Path),
              help="Write the platform's artifacts here instead of its out (one --platform).")
@click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON.")
@friendly
def build(config, platforms, jobs, cache, depfile, stamp, out, as_json):
    """Compile and validate what is out of date in slmc.toml (via the shared cache)."""
    # slmc.build, not slmc.api: a no-op build must not pay for importing torch (2 s budget);
    # it imports the compiler only when something must be compiled.
    from .build import build as run_build

    report = run_build(config, tuple(platforms), jobs, cache, depfile, stamp, out,
                       progress=None if as_json else lambda msg: console.print(escape(msg), soft_wrap=True))
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    counts = {}
    for a in report["artifacts"]:
        counts[a["status"]] = counts.get(a["status"], 0) + 1
    console.print(f"[green]slmc build:[/] {', '.join(f'{n} {s}' for s, n in counts.items())} "
                  f"({report['seconds']} s); lock {escape(report['lock'])}", soft_wrap=True)


@main.command()
@click.argument("subject")
@click.option("--device", "-d", "devices", multiple=True, required=True,
              help="A phone (repeatable; `all` for every one): galaxy-s22, galaxy-s24-ultra, pixel-8, "
                   "iphone-15-pro, oneplus-12.")
@click.option("--target", "-t", default=None, help="For a MODEL subject (default executorch).")
@click.option("--backend", "-b", default=None)
@click.option("--recipe", default=None, help="For a MODEL subject: the recipe whose storage to cost.")
@click.option("--pass", "passes", multiple=True, metavar="NAME[:k=v,...]", help="quant.* / kv.cache passes.")
@click.option("--max-seq-len", type=int, default=None, help="KV-cache length (default: the artifact's).")
@click.option("--prompt-len", default=64, show_default=True, help="Prefill length.")
@click.option("--decode-tokens", default=128, show_default=True, help="Decode costed at mid-generation.")
@click.option("--bare", is_flag=True, help="No runtime parameters: the roofline itself.")
@click.option("--json", "as_json", is_flag=True)
@friendly
def estimate(subject, devices, target, backend, recipe, passes, max_seq_len, prompt_len, decode_tokens, bare,
             as_json):
    """Estimate of prefill/decode tok/s and peak memory of SUBJECT (an artifact folder, or a MODEL with
    --target/--recipe; a folder holding only config.json is enough) on named phones, with runtime
    parameters fitted to published phone figures."""
    from . import api

    names = api.estimate_devices() if "all" in devices else list(devices)
    rows = [api.estimate(subject, api.EstimateOptions(
        d, target=target, backend=backend, recipe=recipe, passes=tuple(passes), max_seq_len=max_seq_len,
        prompt_len=prompt_len, decode_tokens=decode_tokens, bare=bare)) for d in names]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    r0 = rows[0]
    click.echo(f"{r0['subject']} on {r0['runtime_name']} ({r0['arithmetic']}; linear {r0['storage']['linear']}, "
               f"head {r0['storage']['head']}, embedding {r0['storage']['embedding']}, "
               f"KV {r0['storage']['kv_bits']}-bit)")
    click.echo(f"parameters: eff_bw {r0['eff_bw']}, overhead {r0['overhead_cycles']:.0f} cycles/layer, "
               f"eff_compute {r0['eff_compute']}; " + (
                   f"fitted on {len(r0['fitted_on'])} published phone figures: {', '.join(r0['fitted_on'])}"
                   if r0["fitted_on"] else "none applied (--bare: the roofline itself)"))
    click.echo(f"{'device':<18}{'GB/s':>7}{'GOPS':>8}{'GHz':>6}{'decode tok/s':>14}{'bound':>10}{'prefill tok/s':>15}"
               f"{'peak MiB':>10}")
    for r in rows:
        click.echo(f"{r['device']:<18}{r['bandwidth_gbs']:>7.1f}{r['peak_gops']:>8.0f}{r['clock_ghz']:>6.2f}"
                   f"{r['decode']['tok_s']:>14.1f}{r['decode']['bound']:>10}{r['prefill']['tok_s']:>15.1f}"
                   f"{r['memory_mib']['peak']:>10.0f}")
    click.echo(f"decode at position {r0['decode_position']}: {r0['decode']['bytes_per_token'] / 2**20:.1f} MiB and "
               f"{r0['decode']['ops_per_token'] / 1e9:.2f} GOP per token, {r0['layers']} layers; prefill "
               f"{r0['prompt_len']} tokens; leave-one-out check: bench/results/estimate.md; sources: `--json`")


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
        click.echo(f"recipe {name} ({', '.join(flows)}): {about} [{c.recipe_quality[name]}]")


@main.command("default-model")
@friendly
def default_model() -> None:
    """Prepare the built-in SmolLM2-135M-Instruct (once) and print its folder."""
    from . import api

    click.echo(str(api.default_model()))


if __name__ == "__main__":
    main()
