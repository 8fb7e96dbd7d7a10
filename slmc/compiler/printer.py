"""A stable, diff-friendly text form of the IR (`slmc inspect`, `--dump-ir`).

Same IR, same text: no addresses, no timestamps, no dict-order surprises.
Shared blocks print once, with every depth that uses them; an attention or FFN that
several blocks share prints once, then as `ffn: shared with blocks.3.ffn`.
"""

from __future__ import annotations

from .ir import MLP, Attention, Linear, Model, MoE, Norm, QuantWeight, param_count, weight_bytes


def _t(w) -> str:
    if w is None:
        return "-"
    if isinstance(w, QuantWeight):
        z = ("" if w.zeros is None else "+zeros") + (f",act int{w.act_bits}" if w.act_bits else "")
        return f"{w.dtype}[{','.join(map(str, w.shape))}]({w.algorithm}{z})"
    short = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}.get(w.dtype, w.dtype)
    return f"{short}[{','.join(map(str, w.shape))}]"


def _lin(lin: Linear | None) -> str:
    if lin is None:
        return "-"
    return _t(lin.weight) + (f"+bias{_t(lin.bias)}" if lin.bias is not None else "")


def _norm(n: Norm | None) -> str:
    if n is None:
        return "-"
    return f"rms(eps={n.eps:g}{', +1' if n.unit_offset else ''}) {_t(n.weight)}"


def _attn(a: Attention, ind: str) -> list[str]:
    rope = f"rope(theta={a.rope.theta:g}, dim={a.rope.dim}" + (
        f", {a.rope.scaling.get('rope_type')}={a.rope.scaling.get('factor')}" if a.rope.scaling else "") + ")"
    head = (f"{ind}attn: heads={a.n_heads} kv_heads={a.n_kv_heads} head_dim={a.head_dim} {rope} "
            f"scale={a.scale:.6g}")
    if a.sliding_window is not None:
        head += f" window={a.sliding_window}"
    if a.logit_softcap is not None:
        head += f" softcap={a.logit_softcap:g}"
    lines = [head]
    if a.fused:
        lines.append(f"{ind}  qkv: {_lin(a.qkv)}")
    else:
        lines += [f"{ind}  q: {_lin(a.q)}", f"{ind}  k: {_lin(a.k)}", f"{ind}  v: {_lin(a.v)}"]
    lines.append(f"{ind}  o: {_lin(a.o)}")
    if a.q_norm is not None:
        lines += [f"{ind}  q_norm: {_norm(a.q_norm)}", f"{ind}  k_norm: {_norm(a.k_norm)}"]
    return lines


def _mlp(m: MLP, ind: str, label: str = "mlp") -> list[str]:
    if m.fused:
        return [f"{ind}{label}({m.act}): gate_up {_lin(m.gate_up)} down {_lin(m.down)}"]
    return [f"{ind}{label}({m.act}): gate {_lin(m.gate)} up {_lin(m.up)} down {_lin(m.down)}"]


def _moe(m: MoE, ind: str) -> list[str]:
    lines = [f"{ind}moe: experts={len(m.experts)} top_k={m.top_k} norm_topk={m.norm_topk_prob} "
             f"router {_lin(m.router)}"]
    for e, ex in enumerate(m.experts):
        lines += _mlp(ex, ind + "  ", f"expert{e}")
    if m.shared is not None:
        lines += _mlp(m.shared, ind + "  ", "shared")
        lines.append(f"{ind}  shared_gate: {_lin(m.shared_gate)}")
    if m.offload is not None:
        o = m.offload
        t = f"[{len(o.transition)},{len(o.transition[0])}]" if o.transition else "- (last MoE depth)"
        lines.append(f"{ind}  offload: cache_experts={o.cache_experts} expert_bits={o.expert_bits} "
                     f"freq=[{','.join(f'{f:.3f}' for f in o.frequencies)}] transition={t}")
    return lines


def print_model(m: Model) -> str:
    kv = m.kv
    out = [
        f"model {m.family} ({m.architecture}) vocab={m.vocab_size} hidden={m.hidden_size} "
        f"layers={m.n_layers} blocks={len(m.blocks)} params={param_count(m) / 1e6:.2f}M "
        f"bytes={weight_bytes(m)}",
        f"  kv_cache: max_len={kv.max_len} layout={kv.layout} dtype={kv.dtype} "
        f"window={kv.window if kv.window is not None else '-'} sinks={kv.sink_tokens} "
        f"arena={'yes' if kv.arena else 'no'} (model limit {m.max_position})",
        f"  tokens: bos={m.bos_id if m.bos_id is not None else '-'} eos={m.eos_ids or '-'}",
        f"  embed: {_t(m.embed)}" + (f" scale={m.embed_scale:.6g}" if m.embed_scale != 1.0 else ""),
    ]
    first: dict[int, str] = {}  # id of an attention/FFN node -> where it printed first
    for i, b in enumerate(m.blocks):
        depths = [d for d, x in enumerate(m.layers) if x == i]
        out.append(f"  block {i} (depth {','.join(map(str, depths))}):")
        out.append(f"    attn_norm: {_norm(b.attn_norm)}")
        seen_attn, seen_ffn = first.get(id(b.attn)), first.get(id(b.ffn))
        first.setdefault(id(b.attn), f"blocks.{i}.attn")
        first.setdefault(id(b.ffn), f"blocks.{i}.ffn")
        out += [f"    attn: shared with {seen_attn}"] if seen_attn else _attn(b.attn, "    ")
        if b.post_attn_norm is not None:
            out.append(f"    post_attn_norm: {_norm(b.post_attn_norm)}")
        out.append(f"    ffn_norm: {_norm(b.ffn_norm)}")
        if seen_ffn:
            out.append(f"    ffn: shared with {seen_ffn}")
        else:
            out += _mlp(b.ffn, "    ") if isinstance(b.ffn, MLP) else _moe(b.ffn, "    ")
        if b.post_ffn_norm is not None:
            out.append(f"    post_ffn_norm: {_norm(b.post_ffn_norm)}")
    out.append(f"  final_norm: {_norm(m.final_norm)}")
    out.append(f"  lm_head: {_lin(m.lm_head) if m.lm_head is not None else 'tied to embed'}"
               + (f" softcap={m.final_logit_softcap:g}" if m.final_logit_softcap is not None else ""))
    return "\n".join(out) + "\n"
