"""KV-cache rows written into the cache buffers in place, safely (backend_config's passes).

A decoder writes each step's K/V rows with index_copy_ on a cache buffer. Exported, that is a
functional index_put whose result goes back to the buffer: ExecuTorch's portable index_put.out
copies the whole cache to a new tensor and a copy_ writes it back, two whole-cache copies per
cache per call (bench/README: 60 of each per SmolLM2-135M decode step). ExecuTorch's
`run_reinplace_pass` turns it into index_put_ on the buffer. It leaves two hazards, which this
pass removes before ExecuTorch's own passes run (tests/test_et_cache_inplace.py has both as controls):

- A view of the in-place result becomes an alias (ReplaceViewCopyWithViewPass) bound to the
  result's TensorSpec, which memory planning then swaps for the buffer's spec; the view keeps the
  stale one and reads memory the write never reached (the portable decoder read garbage). So
  every reader of index_put_(buffer, ...) other than the graph output reads the buffer itself:
  the same values, since the write comes first in the plan and nothing reads the old cache.
- index_put_ on anything but a placeholder (an intermediate, possibly a view-to-be of another
  tensor that the reinplace check saw as a copy) goes back to the functional index_put.

  before:  %w = index_put_(%k_cache, [None, None, %pos], %rows)   ; %r = view_copy(%w, [...])
  after:   %w = index_put_(%k_cache, [None, None, %pos], %rows)   ; %r = view_copy(%k_cache, [...])
"""

from __future__ import annotations

import torch


class InPlaceCacheWrites:
    """An ExecuTorch pass (a callable on the GraphModule, as config.passes takes). It runs after
    the reinplace pass, which makes index_put_ on a placeholder only when that placeholder is a
    mutable buffer or a mutable input."""

    def __call__(self, gm: torch.fx.GraphModule):
        from executorch.exir.dialects._ops import ops
        from executorch.exir.pass_base import PassResult

        inplace, functional = ops.edge.aten.index_put_.default, ops.edge.aten.index_put.default
        changed = False
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target != inplace:
                continue
            base = node.args[0]
            if base.op == "placeholder":
                for user in list(node.users):
                    if user.op != "output":
                        user.replace_input_with(node, base)
                        changed = True
            else:
                node.target = functional
                changed = True
        if changed:
            gm.recompile()
        return PassResult(gm, changed)
