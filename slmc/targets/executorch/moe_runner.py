"""The reference runner for expert-offload artifacts (format "pte-moe"), on ExecuTorch's runtime.

It implements the policy the manifest describes (manifest["moe_offload"]):
- the backbone program stays loaded: embed, layer_d (attention + KV cache + router), head;
- routed experts are separate programs; at most K of them (all MoE layers together) are
  resident, in an LRU cache: an expert is loaded when a token is routed to it and not
  resident (a miss), evicting the least recently used;
- after MoE depth d, the next MoE depth's experts are scored with the predictor table,
  score(e') = sum over this depth's routed (e, w) of w * P(e' | e), and the top_k best
  that are not resident are preloaded (on a phone this read overlaps with the next
  layer's attention; here it is counted, not overlapped);
- once that next depth has run, its preloaded experts that no token used are dropped:
  a wrong guess then holds a slot for one layer, not until LRU reaches it. Without this,
  with K near the per-token working set, wrong guesses turn LRU's reuse across tokens
  into thrashing (on the upcycled SmolLM2 trace, K=60: 69 expert loads per token
  instead of 36; bench/arch_moe.py).
`serve_layer` and `after_layer` are the policy; the session and the benchmark's
simulation both call them.
The runner combines expert outputs itself: y = x + sum_k w_k * expert_k(ffn_in), the
reference executor's arithmetic in fp32.

Counters (`stats()`): demand hits and misses, preloads and how many of them were used,
bytes read from expert files, the most experts ever resident, tokens processed.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Hashable

import torch

from ...errors import SlmcError
from .session import require_host_runnable


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    preloads: int = 0
    preloads_used: int = 0  # preloaded experts that a token then asked for
    preloads_dropped: int = 0  # preloaded experts the predicted layer did not use
    bytes_read: int = 0
    evictions: int = 0
    max_resident: int = 0

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else float("nan")


class ExpertCache:
    """LRU cache of at most `capacity` loaded experts. `load(key)` makes one resident,
    `size(key)` is the bytes that reads. Independent of the runtime, so the policy can be
    checked on its own."""

    def __init__(self, capacity: int, load: Callable[[Hashable], object], size: Callable[[Hashable], int]):
        if capacity < 1:
            raise ValueError("an expert cache holds at least one expert")
        self.capacity, self.load, self.size = capacity, load, size
        self.entries: OrderedDict = OrderedDict()
        self.preloaded: set = set()
        self.stats = CacheStats()

    def _insert(self, key) -> object:
        while len(self.entries) >= self.capacity:
            old, _ = self.entries.popitem(last=False)
            self.preloaded.discard(old)
            self.stats.evictions += 1
        value = self.load(key)  # after eviction: never more than `capacity` resident
        self.entries[key] = value
        self.stats.bytes_read += self.size(key)
        self.stats.max_resident = max(self.stats.max_resident, len(self.entries))
        return value

    def resident(self, key) -> bool:
        return key in self.entries

    def get(self, key) -> object:
        if key in self.entries:
            self.stats.hits += 1
            if key in self.preloaded:
                self.preloaded.discard(key)
                self.stats.preloads_used += 1
            self.entries.move_to_end(key)
            return self.entries[key]
        self.stats.misses += 1
        return self._insert(key)

    def preload(self, key) -> None:
        if key in self.entries:
            return
        self.stats.preloads += 1
        self._insert(key)
        self.preloaded.add(key)

    def drop_unused(self, belongs: Callable[[Hashable], bool]) -> None:
        """Unload the still-unused preloads that `belongs` picks."""
        for key in [k for k in self.preloaded if belongs(k)]:
            self.preloaded.discard(key)
            del self.entries[key]
            self.stats.preloads_dropped += 1


def serve_layer(cache: ExpertCache, depth: int, experts: list[int], run: Callable[[int, object], None]) -> None:
    """Fetch and run each routed expert of a depth; resident ones first, so a miss never
    evicts an expert this layer still needs."""
    for e in sorted(experts, key=lambda e: not cache.resident((depth, e))):
        run(e, cache.get((depth, e)))


def after_layer(cache: ExpertCache, depth: int, next_depth: int | None, transition, routed: torch.Tensor,
                weights: torch.Tensor, k: int) -> None:
    """Drop this depth's unused preloads; preload the next depth's k likeliest experts."""
    cache.drop_unused(lambda key: key[0] == depth)
    if next_depth is not None and transition is not None:
        for e in predict_next(transition, routed, weights, k):
            cache.preload((next_depth, e))


def predict_next(transition: list[list[float]], routed: torch.Tensor, weights: torch.Tensor, k: int) -> list[int]:
    """The k next-depth experts with the highest sum_e w_e * P(e' | e) over routed (e, w)."""
    t = torch.tensor(transition, dtype=torch.float64)
    score = (t[routed.flatten()] * weights.flatten().double()[:, None]).sum(0)
    return score.topk(min(k, t.shape[1])).indices.tolist()


class MoEOffloadSession:
    """step(tokens, start_pos) -> last position's logits, like every slmc session."""

    runtime = "executorch (slmc moe offload runner)"

    def __init__(self, folder: Path, manifest: dict, cache_experts: int | None = None, predict: bool = True):
        import importlib

        importlib.import_module("executorch.kernels.quantized")  # registers the quantized kernels
        from executorch.runtime import Runtime

        self.folder, self.plan = Path(folder), manifest["moe_offload"]
        self.rt = Runtime.get()
        pred = json.loads((self.folder / self.plan["predictor"]).read_text())
        self.layers = {L["depth"]: L for L in self.plan["layers"]}
        self.next_depth = dict(zip(pred["moe_depths"], pred["moe_depths"][1:]))
        self.transitions = dict(zip(pred["moe_depths"], pred["transitions"]))
        self.predict = predict
        k = cache_experts if cache_experts is not None else self.plan["policy"]["cache_experts"]
        self.cache = ExpertCache(k, self._load_expert, self._expert_bytes)
        self.tokens = 0
        self.reset()

    @classmethod
    def from_artifact(cls, folder: Path, manifest: dict) -> "MoEOffloadSession":
        require_host_runnable(folder, manifest, "an offload artifact")
        return cls(Path(folder), manifest)

    def _expert_bytes(self, key) -> int:
        d, e = key
        return self.layers[d]["expert_bytes"][e]

    def _load_expert(self, key):
        d, e = key
        path = self.folder / self.layers[d]["experts"][e]
        prog = self.rt.load_program(str(path))
        return prog, prog.load_method("forward")  # the method needs its program alive

    def reset(self) -> None:
        # Fresh methods, fresh planned memory: empty KV caches. Experts hold no state and stay.
        try:
            self.backbone = self.rt.load_program(str(self.folder / self.plan["backbone"]))
        except Exception as e:  # the runtime raises bare RuntimeErrors
            raise SlmcError(f"ExecuTorch could not load the backbone: {e}", str(self.folder)) from None
        self.n_layers = sum(1 for m in self.backbone.method_names if m.startswith("layer_"))
        names = ["embed", "head"] + [f"layer_{d}" for d in range(self.n_layers)]
        self.methods = {n: self.backbone.load_method(n) for n in names}

    def _moe(self, d: int, x: torch.Tensor, n: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        n, w, idx = n[0], w[0], idx[0]
        out = torch.zeros_like(n)

        def run(e, loaded):
            rows, slot = (idx == e).nonzero(as_tuple=True)
            y = loaded[1].execute([n[rows].contiguous()])[0]
            out.index_add_(0, rows, y * w[rows, slot, None])

        serve_layer(self.cache, d, idx.unique().tolist(), run)
        nxt = self.next_depth.get(d) if self.predict else None
        after_layer(self.cache, d, nxt, self.transitions.get(d), idx, w, self.layers[nxt]["top_k"] if nxt is not None else 0)
        return x + out[None]

    def step(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        x = self.methods["embed"].execute([torch.tensor([tokens], dtype=torch.int64)])[0].clone()
        pos = torch.tensor([start_pos], dtype=torch.int64)
        for d in range(self.n_layers):
            outs = [o.clone() for o in self.methods[f"layer_{d}"].execute([x, pos])]
            x = outs[0] if len(outs) == 1 else self._moe(d, *outs)
        self.tokens += len(tokens)
        logits = self.methods["head"].execute([x[:, -1].contiguous()])[0]
        return logits.reshape(-1).clone()

    def step_all(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        """Logits of every position: the head method takes the last row, so one token per call."""
        return torch.stack([self.step([t], start_pos + i) for i, t in enumerate(tokens)])

    def stats(self) -> dict:
        s = self.cache.stats
        return {**asdict(s), "hit_rate": s.hit_rate, "tokens": self.tokens, "cache_experts": self.cache.capacity,
                "predict": self.predict, "bytes_read_per_token": s.bytes_read / max(self.tokens, 1)}


def open_moe(folder: Path, manifest: dict) -> MoEOffloadSession:
    return MoEOffloadSession.from_artifact(folder, manifest)
