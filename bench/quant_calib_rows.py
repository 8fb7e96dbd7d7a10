"""bench/quant_calib.py's method rows (issue 18's remaining gaps): each changes the method against
a measured row, at a calibration amount that row used. GPTQ alone at 128x512 on Emma (AWQ's scales
beat it at 16x256 only by losing: +8.4 vs +7.6 %), quant.rotate (QuaRot/SpinQuant R1+R2, fused into
the weights) before GPTQ, calibrated and data-free, and GPTQ's own options. quant.rotate unties
SmolLM2's head (untie=true: the final norm's scale is not uniform), so the rotated rows carry a
float head table of their own in 'weights MiB'; the block linears are int4 g32 as in every row.
Rows whose options start with "autoround:" end in quant.autoround (block-wise learned rounding,
AutoRound) with those options instead of quant.gptq.
"""

from __future__ import annotations

Q = "bits=4,group_size=32"
ROTATE = "quant.rotate:untie=true"
GPTQ = "act_order=true,clip=true"
OPTIONS_GONE, OPTIONS_AT = ("refine", "float_target", "clip_steps"), "26b4d17"
AR = "autoround:"  # options that replace quant.gptq by quant.autoround with the rest as its options
AR_STEPS = "iters=100,batch=4"  # 100 signed-gradient steps of 4x256 tokens per block: ~25 min on 1 thread
AWQ = "awq-scales"  # quant.awq:quantize=false at the row's amount and calibration (the recipes' method)

# (name, calibration kind, n_seqs x seq_len, passes before GPTQ, GPTQ options added (or AR + quant.autoround's
# options, which then replaces GPTQ), against, what it tests)
METHODS = (
    ("gptq calibrated 128x512", "calibrated", "128x512", (), "", "awq-scales+gptq calibrated 128x512",
     "GPTQ (clip) alone, without AWQ's scales"),
    ("rotate+gptq calibrated 128x512", "calibrated", "128x512", (ROTATE,), "", "gptq calibrated 128x512",
     "quant.rotate (R1+R2, head untied) before GPTQ (clip)"),
    ("rotate+gptq clip", "data-free", "16x256", (ROTATE,), "", "gptq clip",
     "quant.rotate (R1+R2, head untied) before GPTQ (clip)"),
    ("rotate+gptq calibrated", "calibrated", "16x256", (ROTATE,), "", "gptq calibrated",
     "quant.rotate (R1+R2, head untied) before GPTQ (clip)"),
    ("rotate+awq-scales+gptq clip", "data-free", "16x256", (ROTATE, AWQ), "", "rotate+gptq clip",
     "AWQ's scales (quantize=false) between quant.rotate and GPTQ (clip)"),
    ("rotate+gptq clip 64x256", "data-free", "64x256", (ROTATE,), "", "awq-scales+gptq clip 64x256",
     "quant.rotate (R1+R2, head untied) before GPTQ (clip), instead of AWQ's scales"),
    # quant.gptq's options, screened first at the passes' default amount (16x256)
    ("gptq calibrated refine 2", "calibrated", "16x256", (), "refine=2", "gptq calibrated",
     "refine=2: least-squares group scales for GPTQ's codes, then GPTQ again with them (2 rounds)"),
    ("gptq calibrated float-target", "calibrated", "16x256", (), "float_target=true", "gptq calibrated",
     "float_target=true: GPTAQ's asymmetric calibration (the float model's output as each linear's target)"),
    ("awq-scales+gptq clip steps 20", "data-free", "16x256", (AWQ,), "clip_steps=20", "awq-scales+gptq clip",
     "clip_steps=20: the clip search's ratios at half the step (1, 0.975, ..., 0.525)"),
    ("awq-scales+gptq calibrated clip steps 20", "calibrated", "16x256", (AWQ,), "clip_steps=20",
     "awq-scales+gptq calibrated 16x256",
     "clip_steps=20: the clip search's ratios at half the step (1, 0.975, ..., 0.525)"),
    ("awq-scales+gptq calibrated clip steps 20 seed 1", "calibrated", "16x256 seed 1", (AWQ,), "clip_steps=20",
     "awq-scales+gptq calibrated 16x256 seed 1",
     "clip_steps=20 at calibration seed 1 (other windows of the text): is seed 0's gain more than the seed spread"),
    ("awq-scales+gptq calibrated 64x256 clip steps 20", "calibrated", "64x256", (AWQ,), "clip_steps=20",
     "awq-scales+gptq calibrated 64x256", "clip_steps=20 at 16k calibration tokens"),
    ("awq-scales+gptq calibrated 128x512 clip steps 20", "calibrated", "128x512", (AWQ,), "clip_steps=20",
     "awq-scales+gptq calibrated 128x512", "clip_steps=20 at 64k calibration tokens"),
    ("gptq clip refine 2", "data-free", "16x256", (), "refine=2", "gptq clip",
     "refine=2: least-squares group scales for GPTQ's codes, then GPTQ again with them (2 rounds)"),
    ("gptq clip float-target", "data-free", "16x256", (), "float_target=true", "gptq clip",
     "float_target=true: GPTAQ's asymmetric calibration (the float model's output as each linear's target)"),
    # the same passes as the row it is against; since 1a6e25b quant.gptq takes quant.awq's samples
    # (carried across the fold, which keeps the float function) instead of drawing its own
    ("awq-scales+gptq clip samples carried", "data-free", "16x256", (AWQ,), "", "awq-scales+gptq clip",
     "the recipes' method since 1a6e25b: GPTQ calibrates on AWQ's data-free samples instead of a second draw"),
    # block-wise output reconstruction with learned rounding instead of GPTQ
    ("autoround calibrated 16x256", "calibrated", "16x256", (), AR + AR_STEPS, "awq-scales+gptq calibrated 16x256",
     "quant.autoround (RTN start, rounding and group ranges learned per block) instead of AWQ scales + GPTQ"),
    ("autoround 16x256", "data-free", "16x256", (), AR + AR_STEPS, "awq-scales+gptq clip",
     "quant.autoround (RTN start, rounding and group ranges learned per block) instead of AWQ scales + GPTQ"),
    ("awq-scales+autoround calibrated 16x256", "calibrated", "16x256", (AWQ,), AR + AR_STEPS,
     "autoround calibrated 16x256", "AWQ's scales (quantize=false) before quant.autoround"),
    ("awq-scales+autoround 16x256", "data-free", "16x256", (AWQ,), AR + AR_STEPS, "awq-scales+gptq clip samples carried",
     "quant.autoround instead of GPTQ after AWQ's scales (both on AWQ's data-free samples)"),
    ("awq-scales+autoround calibrated 64x256", "calibrated", "64x256", (AWQ,), AR + AR_STEPS,
     "awq-scales+gptq calibrated 64x256", "AWQ's scales + quant.autoround at 16k calibration tokens (same steps)"),
    ("awq-scales+autoround calibrated 64x256 iters 200", "calibrated", "64x256", (AWQ,), AR + "iters=200,batch=4",
     "awq-scales+autoround calibrated 64x256", "200 steps per block (AutoRound's default) instead of 100"),
    ("awq-scales+autoround 64x256 iters 200", "data-free", "64x256", (AWQ,), AR + "iters=200,batch=4",
     "awq-scales+gptq clip 64x256", "the calibrated +3.6 % row's method data-free: AWQ's scales + quant.autoround, "
     "200 steps, on 16k sampled tokens"),
)


def method_variants(calib: str, q) -> list[tuple[str, str, str, list[str]]]:
    """(name, kind, what it tests, passes); q shrinks a spec's amount in the quick run."""
    out = []
    for name, kind, size, before, extra, against, what in METHODS:
        n, L = size.split()[0].split("x")  # "16x256" or "16x256 seed 1"
        last, opts = (("quant.autoround", extra[len(AR):]) if extra.startswith(AR)
                      else ("quant.gptq", GPTQ + (f",{extra}" if extra else "")))
        amount = q(f"n_seqs={n},seq_len={L}") + (f",seed={size.split()[-1]}" if "seed" in size else "")
        spec = f"{amount},{opts}" + (f",calib={calib}" if kind == "calibrated" else "")
        amount += f",calib={calib}" if kind == "calibrated" else ""
        before = [f"quant.awq:{Q},quantize=false,{amount}" if b == AWQ else b for b in before]
        out.append((name, kind, f"{what}, against {against}", [*before, f"{last}:{Q},{spec}"]))
    return out


def method_table(score: dict[str, tuple[dict, float]]) -> list[str]:
    """Each measured method row against the row it changes: mean Δ, points, pass time."""
    have = [m for m in METHODS if m[0] in score]
    if not have:
        return []
    out = ["", "Method rows, each against the row it changes (same calibration amount; negative is better; "
           "rotated rows carry an untied float head in 'weights MiB'):", "",
           "| variant | calibration | n_seqs x seq_len | against | mean Δ | vs that row (points) | pass s |",
           "|---|---|---|---|---|---|---|"]
    for name, kind, size, _, _, against, _ in have:
        r, d = score[name]
        vs = f"{d - score[against][1]:+.1f}" if against in score else "-"
        thr = f" ({r['threads']} thr)" if "threads" in r else ""
        out.append(f"| {name} | {kind} | {size} | {against} | {d:+.1f} % | {vs} | {r['pass_seconds']}{thr} |")
    if any(o in " ".join(score[m[0]][0].get("passes", [])) for m in have for o in OPTIONS_GONE):
        out += ["", f"quant.gptq's {', '.join(OPTIONS_GONE)} were options from commit {OPTIONS_AT} (these rows "
                "ran there or in ac85bec): none gained clearly over the row it changes, so they were removed."]
    return out
