"""ExecuTorch layout for expert offload (an IR carrying a moe.offload plan).

The executorch target hands such a model here. The artifact loads lazily:

  backbone.pte            methods embed, layer_0 .. layer_{L-1}, head (+ runner metadata);
                          each layer_d holds depth d's attention and its K/V cache
                          (mutable buffers k_cache_d / v_cache_d, one shared arena),
                          then the dense MLP or the MoE router (+ shared expert)
  experts/L{d}_E{e}.pte   one program per routed expert, method forward(x[N, H]) -> [N, H];
                          all of that expert's weights and nothing else, so loading it
                          reads exactly its bytes
  moe_predictor.json      per MoE depth: expert frequencies and the transition table
                          P(expert e' at the next MoE depth | expert e here)

manifest["moe_offload"] lists every file with its size and the cache policy;
targets/executorch/moe_runner.py is the reference runner that implements it.
"""

from __future__ import annotations

import json

from ...compiler.ir import MoE, Model, QuantWeight, named_weights
from ...compiler.lowering import LoweringSpec
from ...compiler.lowering.segments import export_segments, moe_depths
from ..base import Artifact
from .backends import BACKENDS
from .program import ExecuTorchSpec, backend_config, delegation_summary, runner_metadata, to_pte

FORMAT = "pte-moe"
PREDICTOR = "moe_predictor.json"


def has_offload_plan(model: Model) -> bool:
    return any(isinstance(b.ffn, MoE) and b.ffn.offload is not None for b in model.blocks)


def offload_supports(model: Model) -> str | None:
    """What the segment layout adds to the executorch target's own checks (KV, quantization)."""
    for d in moe_depths(model):
        b = model.block_at(d)
        if b.ffn.offload is None:
            return f"MoE depth {d} has no offload plan (run moe.offload on the whole model)"
        if b.post_ffn_norm is not None:
            return f"MoE depth {d} has a post-FFN norm, which the offload runner does not apply"
    return None


def expert_file(depth: int, expert: int) -> str:
    return f"experts/L{depth:02d}_E{expert:03d}.pte"


def _weight_bytes(obj) -> int:
    return sum(w.nbytes() for _, w in named_weights(obj))


class ExpertLowering:
    """Lowers expert programs, sharing ExecuTorch's edge generation between experts of one shape.

    Most of a small program's lowering time is to_edge's decompositions, which depend only
    on the graph, and every expert of a layer shape has the same graph (one to five
    shapes per model, dozens to hundreds of experts). So the first expert of a graph goes
    through edge generation once (with the partitioners' do-not-decompose sets, as
    to_edge_transform_and_lower does); each expert then gets a copy of that edge program
    with its own weights swapped in by name, and is partitioned and serialized alone.
    A graph whose weights do not map one to one (name, shape, dtype) is lowered the plain way.
    """

    def __init__(self, spec: ExecuTorchSpec):
        self.spec, self.templates = spec, {}
        self.shared = 0  # experts lowered from a template

    def __call__(self, ep) -> tuple[bytes, dict]:
        import copy

        code = ep.graph_module.code
        if code not in self.templates:
            self.templates[code] = (dict(ep.constants), self._template(ep))
        constants, template = self.templates[code]
        same = template is not None and constants.keys() == ep.constants.keys() and all(
            _equal(v, ep.constants[k]) for k, v in constants.items())  # constants the graph made
        weights = _edge_weights(template.exported_program(), ep) if same else None
        if weights is None:
            data, dlg = to_pte(ep, self.spec)
            return data, dlg["forward"]
        edge = copy.deepcopy(template)
        edge.exported_program().state_dict.update(weights)
        for p in BACKENDS[self.spec.backend].partitioners(self.spec):
            edge = edge.to_backend(p)
        self.shared += 1
        return edge.to_executorch(backend_config()).buffer, delegation_summary(edge)

    def _template(self, ep):
        try:
            from executorch.exir import EdgeCompileConfig
            from executorch.exir.program._program import _gen_edge_manager_for_partitioners
        except ImportError:  # another ExecuTorch: every expert the plain way
            return None
        parts = {"forward": BACKENDS[self.spec.backend].partitioners(self.spec)}
        return _gen_edge_manager_for_partitioners(parts, {"forward": ep}, EdgeCompileConfig(_check_ir_validity=False),
                                                  None)


def _flat(t) -> list:
    """A tensor subclass's plain tensors in __tensor_flatten__ order (how export's
    unwrapping names them parametrizations.<name>.original<i>)."""
    if not hasattr(t, "__tensor_flatten__"):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [x for n in names for x in _flat(getattr(t, n))]


def _edge_weights(edge_ep, ep) -> dict | None:
    """{edge state_dict name: this expert's tensor}, or None if they do not map one to one."""
    import torch

    raw, out, used = ep.state_dict, {}, set()
    for name, old in edge_ep.state_dict.items():
        if name in raw:
            new = raw[name]
            used.add(name)
        elif ".parametrizations." in name:
            owner, _, rest = name.partition(".parametrizations.")
            attr, _, orig = rest.partition(".original")
            key = f"{owner}.{attr}"
            parts = _flat(raw[key]) if key in raw else []
            if not orig.isdigit() or int(orig) >= len(parts):
                return None
            new = parts[int(orig)]
            used.add(key)
        else:
            return None
        if new.shape != old.shape or new.dtype != old.dtype:
            return None
        out[name] = torch.nn.Parameter(new.detach(), requires_grad=False) if isinstance(old, torch.nn.Parameter) \
            else new
    # every weight of the expert must land somewhere (names that alias one tensor count once)
    covered = {_ident(raw[k]) for k in used}
    return out if all(_ident(t) in covered for t in raw.values()) else None


def _ident(t) -> int:
    try:
        return t.data_ptr()
    except RuntimeError:  # a tensor subclass without storage of its own: the object itself
        return id(t)


def _equal(a, b) -> bool:
    import torch

    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return a is b
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def lower_offload(model: Model, spec: ExecuTorchSpec, step) -> Artifact:
    backend = BACKENDS[spec.backend]
    lspec = LoweringSpec()
    step("torch.export of the segments")
    backbone, experts = export_segments(model, lspec, dynamic=backend.dynamic)
    meta = runner_metadata(model, backend.dynamic)
    files, delegation = {}, {}
    files["backbone.pte"], delegation["backbone"] = to_pte(backbone, spec, meta, step, shared_state=True)
    del backbone
    lower = ExpertLowering(spec)
    for i, ((d, e), ep) in enumerate(sorted(experts.items())):
        step(f"expert {i + 1}/{len(experts)} (depth {d}, expert {e})")
        files[expert_file(d, e)], delegation[expert_file(d, e)] = lower(ep)
        experts[(d, e)] = None  # free each exported program once lowered
    depths = moe_depths(model)
    plans = [model.block_at(d).ffn.offload for d in depths]
    predictor = {"moe_depths": depths, "frequencies": [p.frequencies for p in plans],
                 "transitions": [p.transition for p in plans],
                 "meaning": "transitions[i][e][e2] = P(expert e2 at moe_depths[i+1] | expert e at "
                            "moe_depths[i]); the last MoE depth has none"}
    files[PREDICTOR] = (json.dumps(predictor) + "\n").encode()
    layers = []
    for d in depths:
        moe = model.block_at(d).ffn
        layers.append({"depth": d, "method": f"layer_{d}", "top_k": moe.top_k,
                       "experts": [expert_file(d, e) for e in range(len(moe.experts))],
                       "expert_bytes": [len(files[expert_file(d, e)]) for e in range(len(moe.experts))]})
    routed = [ex for d in depths for ex in model.block_at(d).ffn.experts]
    expert_w = sum(_weight_bytes(ex) for ex in routed)
    routed_ids = {id(w) for ex in routed for _, w in named_weights(ex)}
    plan = plans[0]
    manifest = {
        "format": FORMAT,
        "artifact": "backbone.pte",
        "host_runnable": backend.host_runnable,
        "backend_note": backend.note,
        "delegation": delegation,
        "runner": {"convention": "slmc.targets.executorch.moe_runner (segments + expert cache); the stock "
                                 "TextLLMRunner cannot run this layout", "metadata_methods": meta},
        "kv_cache": {"kind": "mutable_buffers", "buffers_per_layer": ["k_cache_{d}", "v_cache_{d}"],
                     "where": "method layer_{d} of backbone.pte; one shared arena for all layers"},
        "io": {
            "embed": {"inputs": [["tokens", "int64", [1, "T"]]], "outputs": [["x", "float32", [1, "T", "H"]]]},
            "layer_{d}": {"inputs": [["x", "float32", [1, "T", "H"]], ["input_pos", "int64", [1]]],
                          "outputs_dense": [["x", "float32", [1, "T", "H"]]],
                          "outputs_moe": [["x_plus_attention_and_shared", "float32", [1, "T", "H"]],
                                          ["ffn_in", "float32", [1, "T", "H"]],
                                          ["top_w", "float32", [1, "T", "k"]], ["top_i", "int64", [1, "T", "k"]]]},
            "head": {"inputs": [["x_last", "float32", [1, "H"]]], "outputs": [["logits", "float32", [1, "V"]]]},
            "expert forward": {"inputs": [["rows", "float32", ["N", "H"]]], "outputs": [["y", "float32", ["N", "H"]]]},
            "T": f"1..{model.kv.max_len - 1}" if backend.dynamic else "1",
        },
        "moe_offload": {
            "backbone": "backbone.pte",
            "backbone_bytes": len(files["backbone.pte"]),
            "layers": layers,
            "expert_files_bytes": sum(len(files[expert_file(d, e)]) for d, e in experts),
            "predictor": PREDICTOR,
            "experts_from_shared_edge_program": lower.shared,
            "expert_bits": plan.expert_bits,
            "quantized_backbone": any(isinstance(w, QuantWeight) for _, w in named_weights(model)
                                      if id(w) not in routed_ids),
            "expert_weight_bytes": expert_w,
            "backbone_weight_bytes": _weight_bytes(model) - expert_w,
            "policy": {
                "cache": "lru", "cache_experts": plan.cache_experts,
                "scope": "at most cache_experts routed experts resident, over all MoE layers together",
                "on_activation": "load the expert's file if it is not resident (evicting the least recently used)",
                "preload": "after MoE depth d, score next-depth experts by sum over the routed (e, w) of "
                           "w * transitions[d][e] and load the top_k best that are not resident",
            },
        },
    }
    return Artifact(files=files, manifest=manifest)

