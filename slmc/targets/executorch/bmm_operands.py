"""XNNPACK batch matmuls that read a transposed right operand as stored.

Attention's scores are `bmm(q, keys.transpose(1, 2))`. ExecuTorch's XNNPACK serializer writes
the transpose as a static-transpose node (a copy of the whole K cache, every call) and the bmm
with flags 0, so XNNPACK then packs the copy [hd, L] as a [K, N] right operand with its scalar
`gio` packer, also every call. XNNPACK's batch-matrix-multiply takes XNN_FLAG_TRANSPOSE_B: a
right operand given as [N, K], packed by the vectorized `goi` packer, with no copy before it.
ExecuTorch's runtime hands a node's flags to `xnn_define_batch_matrix_multiply` unchanged
(XNNCompiler.cpp), but its serializer always writes 0 (op_bmm.py).

`transposed_operands()` serializes, while ExecuTorch lowers:
  before  t = static_transpose(k, perm=[0, 2, 1]); y = batch_matrix_multiply(q, t, flags=0)
  after   y = batch_matrix_multiply(q, k, flags=XNN_FLAG_TRANSPOSE_B)
for a permute_copy swapping the last two axes of a rank-3 tensor whose every reader is a bmm's
right operand; any other permute or bmm is written as ExecuTorch writes it. The math is the
same (tests/test_et_bmm_operands.py runs both forms and reads the flags back from the .pte).
The XNNPACK decoder also stores V by column (target.py), so p @ V reads [hd, L] the same way.
Decode with and without each: bench/results/decode_optimum.json, notes.attention_ab.
"""

from __future__ import annotations

import contextlib

XNN_FLAG_TRANSPOSE_B = 0x00000001  # xnnpack.h: XNN_FLAG_TRANSPOSE_WEIGHTS


def _op(node) -> str:
    return getattr(node.target, "__name__", "") if node.op == "call_function" else ""


def _is_bmm(node) -> bool:
    return _op(node) == "aten.bmm.default"


def folded(node) -> bool:
    """A permute_copy swapping the last two axes of a rank-3 tensor, read only as the right
    operand of bmms in this graph (so no reader needs the transposed copy itself)."""
    if _op(node) != "aten.permute_copy.default" or node.meta["val"].dim() != 3:
        return False
    if [d % 3 for d in node.args[1]] != [0, 2, 1] or not node.users:
        return False
    return all(_is_bmm(u) and u.args[1] is node and u.args[0] is not node for u in node.users)


@contextlib.contextmanager
def transposed_operands():
    """While ExecuTorch lowers to XNNPACK: folded transposes are not serialized, and the bmms
    reading them read the untransposed tensor with XNN_FLAG_TRANSPOSE_B."""
    from executorch.backends.xnnpack.operators.node_visitor import _node_visitor_dict
    from executorch.backends.xnnpack.serialization.xnnpack_graph_schema import XNNBatchMatrixMultiply, XNode
    from executorch.backends.xnnpack.operators.quant_params import QuantParams
    from executorch.backends.xnnpack.utils.utils import get_input_node

    bmm, permute = _node_visitor_dict["aten.bmm.default"], _node_visitor_dict["aten.permute_copy.default"]
    orig_bmm, orig_permute = bmm.define_node, permute.define_node

    def define_permute(self, node, xnn_graph, vals_to_ids, debug_handle):
        if not folded(node):
            orig_permute(self, node, xnn_graph, vals_to_ids, debug_handle)

    def define_bmm(self, node, xnn_graph, vals_to_ids, debug_handle):
        right = get_input_node(node, 1)
        if not folded(right):
            return orig_bmm(self, node, xnn_graph, vals_to_ids, debug_handle)
        left, stored = get_input_node(node, 0), right.args[0]
        self.define_tensor(node, xnn_graph, vals_to_ids, quant_params=QuantParams.from_outputs(node))
        for inp in (left, stored):
            self.define_tensor(inp, xnn_graph, vals_to_ids,
                               quant_params=QuantParams.from_inputs(inp, self._exported_program))
        xnn_graph.xnodes.append(XNode(xnode_union=XNNBatchMatrixMultiply(
            input1_id=vals_to_ids[left], input2_id=vals_to_ids[stored], output_id=vals_to_ids[node],
            flags=XNN_FLAG_TRANSPOSE_B), debug_handle=debug_handle))

    bmm.define_node, permute.define_node = define_bmm, define_permute
    try:
        yield
    finally:
        bmm.define_node, permute.define_node = orig_bmm, orig_permute
