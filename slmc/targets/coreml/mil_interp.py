"""A small numpy interpreter for the MIL ops slmc's Core ML target emits.

coremltools cannot run models on Linux, so the saved `.mlpackage` is checked here: its
ML Program is read back from the package's protobuf (coremltools' milproto loader) and
executed op by op. Every op's result is rounded to the dtype the program declares for it,
so an fp16 program really computes in fp16 (one rounding per op, accumulation in fp32, as
Core ML's GPU and Neural Engine do). An op not in `OPS` is an error before anything runs:
nothing is ever skipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import SlmcError
from ..coreml_import import coremltools

NP = {"fp16": np.float16, "fp32": np.float32, "fp64": np.float64, "int8": np.int8, "uint8": np.uint8,
      "int16": np.int16, "uint16": np.uint16, "int32": np.int32, "int64": np.int64, "bool": np.bool_}


class UnknownOpError(SlmcError):
    """The program holds an op this interpreter does not implement."""


def _f(x):
    """Compute floats in fp32 (results are rounded to the declared dtype afterwards)."""
    x = np.asarray(x)
    return x.astype(np.float32) if x.dtype == np.float16 else x


def _slices(shape, begin, end, stride, begin_mask, end_mask, squeeze_mask):
    rank = len(shape)
    stride = [1] * rank if stride is None else list(stride)
    out = []
    for i in range(rank):
        if squeeze_mask is not None and squeeze_mask[i]:
            out.append(int(begin[i]))
            continue
        b = None if begin_mask is not None and begin_mask[i] else int(begin[i])
        e = None if end_mask is not None and end_mask[i] else int(end[i])
        out.append(slice(b, e, int(stride[i])))
    return tuple(out)


def _reshape(x, shape):
    shape = [int(s) for s in shape]
    if len(shape) == x.ndim:  # 0 inherits the input's dimension
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _matmul(x, y, transpose_x=False, transpose_y=False):
    x, y = _f(x), _f(y)
    if transpose_x and x.ndim > 1:
        x = np.swapaxes(x, -1, -2)
    if transpose_y and y.ndim > 1:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def _softmax(x, axis=-1):
    x = _f(x)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _gelu(x, mode="EXACT"):
    x = _f(x)
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1 + np.exp(-1.702 * x))
    from math import erf

    return 0.5 * x * (1 + np.vectorize(erf, otypes=[np.float32])(x / np.sqrt(2)))


def _topk(x, k=1, axis=-1, ascending=False, sort=True, return_indices=True, output_indices_dtype="int32"):
    x = _f(x)
    order = np.argsort(x if ascending else -x, axis=axis, kind="stable")
    idx = np.take(order, np.arange(int(k)), axis=axis)
    return np.take_along_axis(x, idx, axis=axis), idx


def _one_hot(indices, one_hot_vector_size, axis=-1, on_value=1, off_value=0):
    n = int(one_hot_vector_size)
    hot = np.asarray(indices)[..., None] == np.arange(n)
    out = np.where(hot, on_value, off_value)
    return np.moveaxis(out, -1, axis) if axis != -1 else out


def _split(x, num_splits=None, split_sizes=None, axis=0):
    if split_sizes is not None:
        cuts = np.cumsum(split_sizes)[:-1]
    else:
        cuts = int(num_splits)
    return tuple(np.split(x, cuts, axis=int(axis)))


def _slice_update(x, update, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    out = np.array(x, copy=True)
    out[_slices(x.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)] = update
    return out


def _scatter(data, indices, updates, axis=0, mode="update", validate_indices=False):
    """data[..., indices[i], ...] = updates[..., i, ...] along `axis` (slice_scatter before iOS 18)."""
    out = np.array(data, copy=True)
    view, upd = np.moveaxis(out, int(axis), 0), np.moveaxis(np.asarray(updates), int(axis), 0)
    idx = np.asarray(indices).astype(np.int64)
    if mode == "update":
        view[idx] = upd
    elif mode == "add":
        np.add.at(view, idx, upd)
    else:
        _unsupported(f"scatter mode {mode!r}")
    return out


def _concat(values, axis, interleave=False):
    if interleave:
        raise UnknownOpError("concat with interleave=True is not implemented", "mil_interp")
    values = [np.asarray(v) for v in values]
    if any(v.ndim == 0 for v in values):  # MIL concatenates scalars as 1-element vectors (shapes)
        values = [np.atleast_1d(v) for v in values]
    return np.concatenate(values, axis=int(axis))


def _conv(x, weight, bias=None, strides=None, pad_type="valid", pad=None, dilations=None, groups=1):
    """1x1 convolution (the Neural Engine layout's linear), stride 1, one group."""
    if weight.ndim != 4 or weight.shape[2:] != (1, 1) or int(groups) != 1 or \
            (strides is not None and any(int(s) != 1 for s in strides)):
        _unsupported(f"conv with kernel {weight.shape[2:]}, strides {strides}, groups {groups}")
    out = np.einsum("oi,bihw->bohw", _f(weight)[:, :, 0, 0], _f(x))
    return out if bias is None else out + _f(bias)[None, :, None, None]


def _reduce(fn):
    def run(x, axes=None, keep_dims=False):
        ax = None if axes is None else tuple(int(a) for a in np.atleast_1d(axes))
        return fn(_f(x), axis=ax, keepdims=bool(keep_dims))

    return run


# op name -> fn(**inputs) -> array or tuple of arrays (one per output)
def _blockwise_shift_scale(data, scale, offset=None):
    """iOS 18 constexpr_blockwise_shift_scale: (data - offset) * scale, with scale/offset
    holding one value per block (block size along each axis = data dim / scale dim)."""
    d = np.asarray(data).astype(np.float32)
    sc, off = np.asarray(scale, dtype=np.float32), None if offset is None else np.asarray(offset, np.float32)
    for ax in range(d.ndim):
        rep = d.shape[ax] // sc.shape[ax]
        sc = np.repeat(sc, rep, axis=ax)
        off = None if off is None else np.repeat(off, rep, axis=ax)
    return (d - (0.0 if off is None else off)) * sc


OPS = {
    "add": lambda x, y: _f(x) + _f(y),
    "sub": lambda x, y: _f(x) - _f(y),
    "mul": lambda x, y: _f(x) * _f(y),
    "real_div": lambda x, y: _f(x) / _f(y),
    "floor_div": lambda x, y: np.floor_divide(_f(x), _f(y)),
    "pow": lambda x, y: np.power(_f(x), _f(y)),
    "maximum": lambda x, y: np.maximum(x, y),
    "minimum": lambda x, y: np.minimum(x, y),
    "equal": lambda x, y: np.equal(x, y),
    "not_equal": lambda x, y: np.not_equal(x, y),
    "less": lambda x, y: np.less(x, y),
    "less_equal": lambda x, y: np.less_equal(x, y),
    "greater": lambda x, y: np.greater(x, y),
    "greater_equal": lambda x, y: np.greater_equal(x, y),
    "logical_and": lambda x, y: np.logical_and(x, y),
    "logical_or": lambda x, y: np.logical_or(x, y),
    "logical_not": lambda x: np.logical_not(x),
    "select": lambda cond, a, b: np.where(cond, a, b),
    "exp": lambda x: np.exp(_f(x)),
    "abs": lambda x: np.abs(x),
    "clip": lambda x, alpha, beta: np.clip(_f(x), alpha, beta),
    "sqrt": lambda x: np.sqrt(_f(x)),
    "rsqrt": lambda x, epsilon=1e-12: 1.0 / np.sqrt(_f(x) + epsilon),
    "inverse": lambda x, epsilon=1e-4: 1.0 / (_f(x) + epsilon),
    "tanh": lambda x: np.tanh(_f(x)),
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-_f(x))),
    "silu": lambda x: _f(x) / (1.0 + np.exp(-_f(x))),
    "relu": lambda x: np.maximum(_f(x), 0),
    "gelu": _gelu,
    "softmax": _softmax,
    "conv": _conv,
    "linear": lambda x, weight, bias=None: _f(x) @ _f(weight).T + (0 if bias is None else _f(bias)),
    "matmul": _matmul,
    "reduce_sum": _reduce(np.sum),
    "reduce_mean": _reduce(np.mean),
    "reduce_max": _reduce(np.max),
    "topk": _topk,
    "one_hot": _one_hot,
    "cast": lambda x, dtype: np.asarray(x).astype(NP[dtype]),
    "shape": lambda x: np.array(np.shape(x), dtype=np.int32),
    "gather": lambda x, indices, axis=0, batch_dims=0, validate_indices=False: (
        np.take(x, np.asarray(indices).astype(np.int64), axis=int(axis)) if int(batch_dims) == 0 else
        _unsupported("gather with batch_dims != 0")),
    "range_1d": lambda start, end, step: np.arange(start, end, step),
    "reshape": _reshape,
    "transpose": lambda x, perm: np.transpose(x, [int(p) for p in perm]),
    "expand_dims": lambda x, axes: np.expand_dims(x, tuple(int(a) for a in axes)),
    "squeeze": lambda x, axes=None: np.squeeze(x, None if axes is None else tuple(int(a) for a in axes)),
    "tile": lambda x, reps: np.tile(x, [int(r) for r in reps]),
    "concat": _concat,
    "stack": lambda values, axis: np.stack([np.asarray(v) for v in values], axis=int(axis)),
    "split": _split,
    "slice_by_index": lambda x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None: (
        x[_slices(x.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)]),
    "slice_update": _slice_update,
    "scatter": _scatter,
    "identity": lambda x: x,
    "constexpr_blockwise_shift_scale": _blockwise_shift_scale,
}
STATE_OPS = ("const", "read_state", "coreml_update_state")  # handled by the interpreter itself


def _const(val):
    return val if isinstance(val, str) else np.asarray(val)  # strings are attributes (dtype, mode)


def _root(a):
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _shared(val, seen: dict):
    """fp16 constants as exact fp32 (every op computes in fp32 and rounds its result to the
    declared dtype, so nothing changes), and one copy of a weight both functions hold."""
    if not isinstance(val, np.ndarray) or val.nbytes < 1 << 16:
        return val.astype(np.float32) if isinstance(val, np.ndarray) and val.dtype == np.float16 else val
    import hashlib

    key = (val.shape, val.dtype.str, hashlib.sha1(np.ascontiguousarray(val).data).digest())
    if key not in seen:
        seen[key] = val.astype(np.float32) if val.dtype == np.float16 else val
    return seen[key]


def _unsupported(what: str):
    raise UnknownOpError(f"{what} is not implemented", "mil_interp")


class MILProgram:
    """An ML Program read back from a saved `.mlpackage`, runnable function by function."""

    def __init__(self, package: Path):
        ct = coremltools()
        from coremltools.converters.mil.frontend.milproto.load import load
        from coremltools.converters.mil.mil import types

        self.package = Path(package)
        ml = ct.models.MLModel(str(self.package), skip_model_load=True)
        self.spec = ml.get_spec()
        prog = load(model_spec=self.spec, specification_version=self.spec.specificationVersion,
                    file_weights_dir=ml.weights_dir)
        self.functions = dict(prog.functions)
        unknown = sorted({op.op_type for f in self.functions.values() for op in f.operations
                          if op.op_type not in OPS and op.op_type not in STATE_OPS})
        if unknown:
            raise UnknownOpError(f"the MIL program uses op(s) the interpreter does not know: {', '.join(unknown)}",
                                 str(self.package))
        dtype = lambda var: NP[types.builtin_to_string(var.dtype)]  # noqa: E731
        self._states = {fn: {n for n, v in f.inputs.items() if types.is_state(v.sym_type)}
                        for fn, f in self.functions.items()}
        self._inputs = {fn: {n: dtype(v) for n, v in f.inputs.items() if n not in self._states[fn]}
                        for fn, f in self.functions.items()}
        self._consts, self._plans, self._const_ids, shared = {}, {}, {}, {}
        for fn, f in self.functions.items():  # names are per function
            consts, plan = {}, []
            for op in f.operations:
                if op.op_type == "const":
                    consts[op.outputs[0].name] = _shared(_const(op.outputs[0].val), shared)
                    continue
                ins = {k: [x.name for x in v] if isinstance(v, (list, tuple)) else v.name
                       for k, v in op.inputs.items()}
                consts.update({x.name: _const(x.val) for v in op.inputs.values()
                               for x in (v if isinstance(v, (list, tuple)) else [v])
                               if x.val is not None and x.op is None})
                plan.append((op.name, op.op_type, ins, [(v.name, dtype(v)) for v in op.outputs]))
            last = {}  # var -> index of the op that reads it last, so values are freed after it
            for i, (_, _, ins, _) in enumerate(plan):
                for v in ins.values():
                    for name in v if isinstance(v, list) else [v]:
                        last[name] = i
            for v in f.outputs:
                last[v.name] = len(plan)
            self._consts[fn], self._plans[fn] = consts, (plan, last, [v.name for v in f.outputs])
            self._const_ids[fn] = {id(_root(c)) for c in consts.values() if isinstance(c, np.ndarray)}

    @staticmethod
    def _owned(name, i, last, env, consts) -> bool:
        """Whether op i may overwrite value `name`: its last reader, and no other live value or
        constant shares its memory (slices and reshapes are numpy views)."""
        x = env.get(name)
        if last.get(name) != i or not isinstance(x, np.ndarray):
            return False
        root = _root(x)
        if id(root) in consts:  # the ids of the constants' buffers
            return False
        return not any(isinstance(v, np.ndarray) and _root(v) is root for k, v in env.items() if k != name)

    def input_names(self, function: str) -> list[str]:
        return list(self._inputs[function])

    def state_names(self, function: str) -> list[str]:
        return sorted(self._states[function])

    def run(self, function: str, inputs: dict, states: dict, trace: dict | None = None) -> dict:
        """Run one function; `states` (name -> array) is read and updated in place.
        `trace`, if given, receives every intermediate value by name (for debugging)."""
        if function not in self.functions:
            raise SlmcError(f"no function {function!r} (has {', '.join(self.functions)})", str(self.package))
        consts, (plan, last, outputs) = self._consts[function], self._plans[function]
        const_ids = self._const_ids[function]
        env = {n: n for n in self._states[function]}  # a state is referenced by name
        for name, dt in self._inputs[function].items():
            if name not in inputs:
                raise SlmcError(f"missing input {name!r} for function {function}", str(self.package))
            env[name] = np.asarray(inputs[name]).astype(dt)

        def value(name):
            if isinstance(name, list):
                return [value(x) for x in name]
            if name in env:
                return env[name]
            if name in consts:
                return consts[name]
            raise SlmcError(f"value {name!r} is used before it is computed", str(self.package))

        for i, (op_name, kind, ins, outs) in enumerate(plan):
            args = {k: value(v) for k, v in ins.items()}
            if kind == "read_state":
                res = (np.array(states[args["input"]], copy=True),)
            elif kind == "coreml_update_state":
                name = args["state"]
                states[name] = np.asarray(args["value"]).astype(states[name].dtype)
                res = (states[name],)
            elif kind == "slice_update" and trace is None and self._owned(ins["x"], i, last, env, const_ids):
                out = args["x"]  # x dies here and nothing else sees its memory: update it in place
                out[_slices(out.shape, args["begin"], args["end"], args.get("stride"), args.get("begin_mask"),
                            args.get("end_mask"), args.get("squeeze_mask"))] = args["update"]
                res = (out,)
            else:
                try:
                    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                        res = OPS[kind](**args)
                except (ValueError, IndexError, TypeError) as e:  # a bug here or a malformed program
                    shapes = {k: np.shape(a) for k, a in args.items() if not isinstance(a, (str, list))}
                    raise SlmcError(f"{function}: op {op_name} ({kind}) failed on {shapes}: {e}",
                                    str(self.package)) from e
                res = res if isinstance(res, tuple) else (res,)
            for (name, dt), r in zip(outs, res):
                with np.errstate(over="ignore"):  # fp16 overflow is inf, as on the device
                    env[name] = np.asarray(r).astype(dt, copy=False)
            if trace is None:
                for v in ins.values():
                    for name in v if isinstance(v, list) else [v]:
                        if last.get(name) == i and name in env and name not in self._states[function]:
                            del env[name]
        if trace is not None:
            trace.update(env)
        return {name: value(name) for name in outputs}
