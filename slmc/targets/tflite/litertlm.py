"""The `.litertlm` bundle beside the `.tflite`: LiteRT-LM's file (the model, the HF tokenizer,
LLM metadata: start/stop tokens, chat template), built reproducibly (uuid from the content,
timestamp from SOURCE_DATE_EPOCH)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ...compiler.ir import Model
from ...compiler.spill import trim_heap
from ...compiler.textdata import find_tokenizer_dir
from ..base import scratch_file


def _tokenizer_dir(model: Model) -> Path | None:
    return find_tokenizer_dir(model.source.get("path"))


def _chat_template(tok_dir: Path) -> str | None:
    if (tok_dir / "chat_template.jinja").is_file():
        return (tok_dir / "chat_template.jinja").read_text()
    try:
        t = json.loads((tok_dir / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, json.JSONDecodeError):
        return None
    return t if isinstance(t, str) else None


def _tokenizer_adds(tok_dir: Path, bos_id: int) -> bool:
    from tokenizers import Tokenizer

    try:
        ids = Tokenizer.from_file(str(tok_dir / "tokenizer.json")).encode("a").ids
    except Exception:  # an unreadable tokenizer: leave the start token out
        return False
    return bool(ids) and ids[0] == bos_id


@contextlib.contextmanager
def _reproducible_metadata(lb, content_sha256: str):
    """The builder stamps a random uuid4 and the current time into every bundle, so identical
    inputs gave different bytes. Same inputs, same bytes: the uuid is derived from the content
    (uuid5 of its sha256) and the time is $SOURCE_DATE_EPOCH (reproducible-builds.org), else 0."""
    import datetime
    import uuid

    def populate(system_metadata):
        kept = [m for m in system_metadata if m.key not in ("uuid", "creation_timestamp")]
        when = datetime.datetime.fromtimestamp(int(os.environ.get("SOURCE_DATE_EPOCH", "0")), datetime.timezone.utc)
        return kept + [lb.Metadata(key="uuid", value=str(uuid.uuid5(uuid.NAMESPACE_URL, f"slmc:{content_sha256}")),
                                   dtype=lb.DType.STRING),
                       lb.Metadata(key="creation_timestamp", value=when.isoformat(), dtype=lb.DType.STRING)]

    saved = lb.populate_system_metadata
    lb.populate_system_metadata = populate
    try:
        yield
    finally:
        lb.populate_system_metadata = saved


@dataclass(frozen=True)
class BundlePlan:
    """What the bundle holds besides the flatbuffer."""
    tok_dir: Path
    meta: object  # LlmMetadata
    template: str | None


def litertlm_plan(model: Model) -> BundlePlan | str:
    """The bundle's metadata, or why there is no bundle. Made before the conversion: the start
    token check loads the whole HF tokenizer (about 30 MiB for SmolLM2's), heap that glibc keeps
    after it is freed. Made first and the heap trimmed, it is gone before the conversion's
    high point instead of added on top of what the conversion leaves (bench/results/memory.md)."""
    tok_dir = _tokenizer_dir(model)
    if tok_dir is None:
        return "the source model has no tokenizer.json to pack"
    from litert_lm_builder.runtime.proto import llm_metadata_pb2, llm_model_type_pb2

    meta = llm_metadata_pb2.LlmMetadata(max_num_tokens=model.kv.max_len)
    meta.llm_model_type.CopyFrom(llm_model_type_pb2.LlmModelType(generic_model=llm_model_type_pb2.GenericModel()))
    if model.bos_id is not None and _tokenizer_adds(tok_dir, model.bos_id):
        # the runtime prepends start_token to every prompt: only where HF tokenization does too
        meta.start_token.token_ids.ids.append(model.bos_id)
    trim_heap()
    for e in model.eos_ids:
        meta.stop_tokens.add().token_ids.ids.append(e)
    template = _chat_template(tok_dir)
    if template:
        meta.jinja_prompt_template = template
    return BundlePlan(tok_dir, meta, template)


def litertlm_bundle(model: Model, tflite: bytes | Path, plan: BundlePlan | str
                    ) -> tuple[bytes | Path | None, dict]:
    """Pack model + HF tokenizer + LLM metadata the way litert-torch's exporter does. A
    flatbuffer given as a file is streamed (base.file_sha256, the builder copies it in
    blocks) and the bundle returned as a file (base.scratch_file). plan: litertlm_plan(model)."""
    if isinstance(plan, str):
        return None, {"file": None, "reason": plan}
    from litert_lm_builder import litertlm_builder as lb

    tok_dir, meta, template = plan.tok_dir, plan.meta, plan.template
    out = scratch_file("model.litertlm")
    with tempfile.TemporaryDirectory() as tmp:
        src = tflite if isinstance(tflite, Path) else Path(tmp) / "model.tflite"
        if not isinstance(tflite, Path):
            src.write_bytes(tflite)
        (Path(tmp) / "llm_metadata.pb").write_bytes(meta.SerializeToString())
        b = lb.LitertLmFileBuilder()
        b.add_system_metadata(lb.Metadata(key="Authors", value="slmc", dtype=lb.DType.STRING))
        b.add_llm_metadata(str(Path(tmp) / "llm_metadata.pb"))
        b.add_hf_tokenizer(str(tok_dir / "tokenizer.json"))
        b.add_tflite_model(str(src), lb.TfLiteModelType.PREFILL_DECODE)
        # the content's identity: sha256 of flatbuffer + metadata + tokenizer.json, streamed
        ident = hashlib.sha256()
        with open(src, "rb") as f:
            while chunk := f.read(1 << 20):
                ident.update(chunk)
        ident.update(meta.SerializeToString() + (tok_dir / "tokenizer.json").read_bytes())
        with open(out, "wb") as f, _reproducible_metadata(lb, ident.hexdigest()):
            b.build(f)
    if isinstance(tflite, Path):
        data = out
    else:
        data = out.read_bytes()
        out.unlink()
    return data, {"file": "model.litertlm", "builder": "litert_lm_builder.LitertLmFileBuilder",
                  "sections": ["system metadata", "LlmMetadata", "HF tokenizer.json (zlib)",
                               "TFLite PREFILL_DECODE model (= model.tflite)"],
                  "llm_metadata": {"start_token": list(meta.start_token.token_ids.ids) or None,
                                   "stop_tokens": list(model.eos_ids), "max_num_tokens": model.kv.max_len,
                                   "model_type": "generic", "jinja_chat_template": bool(template)}}


# --- the target ------------------------------------------------------------------------------------
