"""Save/load the IR as `ir.json` (structure) + `weights.safetensors` (tensors).

Round-trip exact: dtypes, quantized codes/scales/zeros and sharing all survive: one
tensor referenced from several places, and one IR node (e.g. an MLP used by two blocks,
`arch.share_layers`), which is written once and then as {"$ref": its first path}. Loading
is lazy.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import SlmcError
from .importers.safetensors_source import SafetensorsSource
from .ir import IR_CLASSES, QuantWeight, Weight

FORMAT = "slmc-ir/1"


def _encode(obj, path: str, tensors: dict, keys: dict):
    if isinstance(obj, Weight):
        if id(obj) not in keys:
            keys[id(obj)] = path
            tensors[path] = obj.data
        return {"$weight": keys[id(obj)]}
    if isinstance(obj, QuantWeight):
        if id(obj) not in keys:
            keys[id(obj)] = path
            tensors[path + ".codes"] = obj.codes
            tensors[path + ".scales"] = obj.scales
            if obj.zeros is not None:
                tensors[path + ".zeros"] = obj.zeros
        k = keys[id(obj)]
        return {"$quant": {"key": k, "zeros": obj.zeros is not None, "group_size": obj.group_size,
                           "bits": obj.bits, "symmetric": obj.symmetric, "algorithm": obj.algorithm,
                           "act_bits": obj.act_bits}}
    if dataclasses.is_dataclass(obj):
        if id(obj) in keys:  # a node reached twice: keep it one object after loading
            return {"$ref": keys[id(obj)]}
        keys[id(obj)] = path
        d = {"$type": type(obj).__name__}
        for f in dataclasses.fields(obj):
            d[f.name] = _encode(getattr(obj, f.name), f"{path}.{f.name}" if path else f.name, tensors, keys)
        return d
    if isinstance(obj, list):
        return [_encode(x, f"{path}.{i}", tensors, keys) for i, x in enumerate(obj)]
    if isinstance(obj, dict):
        return {k: _encode(v, f"{path}.{k}", tensors, keys) for k, v in obj.items()}
    return obj


def save_ir(model, folder: Path) -> Path:
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    doc = {"format": FORMAT, "model": _encode(model, "", tensors, {})}
    seen_ptrs: set[int] = set()
    out = {}
    for k, t in tensors.items():  # safetensors refuses tensors that share storage
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen_ptrs and t.numel():
            t = t.clone()
        seen_ptrs.add(ptr)
        out[k] = t
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_file(out, str(tmp / "weights.safetensors"))
        (tmp / "ir.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _node(root, path: str):
    """The JSON node at an encoder path ("blocks.0.ffn"; dataclass fields and list indices)."""
    for seg in filter(None, path.split(".")):
        root = root[int(seg)] if isinstance(root, list) else root[seg]
    return root


def _decode(obj, src: SafetensorsSource, memo: dict, path: str = "", root=None):
    def sub(v, key):
        return _decode(v, src, memo, f"{path}.{key}" if path else str(key), root)

    if isinstance(obj, dict):
        if "$ref" in obj:  # decode the first occurrence now if sorted keys put it later
            k = obj["$ref"]
            if ("$obj", k) not in memo:
                _decode(_node(root, k), src, memo, k, root)
            return memo[("$obj", k)]
        if "$weight" in obj:
            k = obj["$weight"]
            if k not in memo:
                memo[k] = src.weight(k)
            return memo[k]
        if "$quant" in obj:
            q = obj["$quant"]
            k = q["key"]
            if k not in memo:
                memo[k] = QuantWeight(
                    codes=src.weight(k + ".codes").data, scales=src.weight(k + ".scales").data,
                    zeros=src.weight(k + ".zeros").data if q["zeros"] else None,
                    group_size=q["group_size"], bits=q["bits"], symmetric=q["symmetric"],
                    algorithm=q["algorithm"], act_bits=q.get("act_bits", 0))
            return memo[k]
        if "$type" in obj:
            if ("$obj", path) not in memo:
                cls = IR_CLASSES[obj["$type"]]
                memo[("$obj", path)] = cls(**{k: sub(v, k) for k, v in obj.items() if k != "$type"})
            return memo[("$obj", path)]
        return {k: sub(v, k) for k, v in obj.items()}
    if isinstance(obj, list):
        return [sub(x, i) for i, x in enumerate(obj)]
    return obj


def is_ir_folder(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "ir.json").is_file()


def load_ir(folder: Path):
    folder = Path(folder)
    try:
        doc = json.loads((folder / "ir.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SlmcError(f"cannot read IR ({e})", str(folder / "ir.json")) from None
    if doc.get("format") != FORMAT:
        raise SlmcError(f"IR format {doc.get('format')!r}, expected {FORMAT!r}", str(folder / "ir.json"))
    src = SafetensorsSource([folder / "weights.safetensors"])
    try:
        return _decode(doc["model"], src, {}, "", doc["model"])
    except (KeyError, TypeError, IndexError, ValueError) as e:
        raise SlmcError(f"malformed IR ({e})", str(folder / "ir.json")) from None
