"""The ExecuTorch artifact's on-device check: a BundledProgram (`check/model.bpte`, ExecuTorch's
own format: the program with one MethodTestSuite of the bundle's steps, built with
executorch.devtools.bundled_program) and a checker (`check/check.py`) that needs only
ExecuTorch's runtime pybindings and numpy: it loads the artifact's `.pte`, feeds each test
case's bundled inputs in order (the KV cache carries over, as in an app), lets ExecuTorch
verify each output against the bundled expected output (`verify_result_with_bundled_expected_output`,
atol = the flow's max |Δ| bound) and judges top-1 and free-running greedy tokens as well.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

_HERE = Path(__file__).parent


def bundled_program(pte: bytes | Path, prompt: list[int], tokens: list[int], expected) -> bytes:
    """The .bpte: the .pte's bytes (unchanged, embedded) and one test case per step."""
    from executorch.devtools import BundledProgram
    from executorch.devtools.bundled_program.config import MethodTestCase, MethodTestSuite
    from executorch.devtools.bundled_program.serialize import serialize_from_bundled_program_to_flatbuffer

    cases = []
    for i in range(len(tokens)):
        ids, pos = (prompt, 0) if i == 0 else ([tokens[i - 1]], len(prompt) + i - 1)
        cases.append(MethodTestCase(
            inputs=[torch.tensor([ids], dtype=torch.int64), torch.tensor([pos], dtype=torch.int64)],
            expected_outputs=[torch.from_numpy(expected[i].copy()).reshape(1, -1)]))
    with tempfile.TemporaryDirectory() as tmp:
        path = pte if isinstance(pte, Path) else Path(tmp) / "model.pte"
        if not isinstance(pte, Path):
            path.write_bytes(pte)
        bp = BundledProgram(None, [MethodTestSuite(method_name="forward", test_cases=cases)],
                            pte_file_path=str(path))
        return serialize_from_bundled_program_to_flatbuffer(bp)


def check_bundle(art, manifest: dict, data) -> dict[str, bytes]:
    if manifest.get("format") != "pte":  # expert-offload segments run through slmc's own runner
        return {}
    files = {"check.py": (_HERE / "device_check.py").read_bytes()}
    ring = manifest.get("kv_cache", {}).get("ring")
    full = (manifest.get("spec") or {}).get("full_logits")
    # ExecuTorch 1.5.1's BundledModule loads the bundled program without external data, so a
    # .pte whose tied table lives in model.ptd (manifest "data_file") cannot be verified that way:
    # its check.py runs the steps itself (with the .ptd) and judges them against expected.npz
    external = manifest.get("data_file")
    if manifest.get("host_runnable", True) and not ring and not full and not external and data.tokens:
        # a test case is one forward call with last-position logits (a ring cache splits a
        # prompt over calls; full logits return every position): else the checker's own loop
        files["model.bpte"] = bundled_program(art.files[manifest["artifact"]], data.prompt, data.tokens,
                                              data.expected)
    return files
