"""The same model gives the same Core ML package bytes whatever ran before in the process:
coremltools names unnamed ops from a process-wide counter that reading a program back (slmc's
readback and check interpreter) advances (a full-suite run once saw coreml_update_state_6
against _2 in two otherwise equal packages)."""

import hashlib

import pytest

from slmc import api
from slmc.targets.coreml import target as coreml_target  # the converter calls its fresh_op_names

pytest.importorskip("coremltools")


def _compile(src, out):
    api.compile(api.CompileOptions(str(src), "coreml", "all", str(out), recipe="int8-coreml", max_seq_len=32))
    return hashlib.sha256((out / "model.mlpackage/Data/com.apple.CoreML/model.mlmodel").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def clean(tiny_llama_dir, tmp_path_factory):
    """The package's digest from a conversion whose symbol count starts well past a power of ten
    and gains no digit on the way: the program both tests compare with (one compile for both)."""
    from coremltools.converters.mil.mil import program

    program.k_num_internal_syms = max(program.k_num_internal_syms + 10_000, 10**7 + 5)
    return _compile(tiny_llama_dir, tmp_path_factory.mktemp("clean") / "out")


def test_op_names_do_not_depend_on_earlier_program_loads(clean, tiny_llama_dir, tmp_path, monkeypatch):
    from coremltools.converters.mil.mil import Builder

    Builder.name_count["coreml_update_state"] += 7  # what loading a stateful program back leaves
    assert _compile(tiny_llama_dir, tmp_path / "after-loads") == clean
    monkeypatch.setattr(coreml_target, "fresh_op_names", lambda: None)  # control: without the reset
    Builder.name_count["coreml_update_state"] += 7
    assert _compile(tiny_llama_dir, tmp_path / "control") != clean


def test_symbol_choice_does_not_depend_on_how_many_symbols_came_before(clean, tiny_llama_dir, tmp_path, monkeypatch):
    """coremltools names symbolic dims "is<N>" from a count it never resets (a conversion makes
    several hundred); when the converter's choice among equal symbols went by name, a conversion
    whose count gained a digit midway (is99 -> is100, which sorts first) gave another program
    than one whose count did not. By creation order, they are the same."""
    from coremltools.converters.mil.mil import program

    def compile_from(count, name):
        assert count > program.k_num_internal_syms + 10_000  # names already made cannot be made again
        program.k_num_internal_syms = count
        return _compile(tiny_llama_dir, tmp_path / name)

    # `clean` started well past a power of ten; this one starts just before one
    assert compile_from(10**8 - 10, "new-digit") == clean
    # control: the choice by name alone gives another program when the count gains a digit
    # midway (were the patch without effect, this would be the program above)
    monkeypatch.setattr(coreml_target, "_creation_order", str)
    assert compile_from(10**10 - 10, "by-name-new-digit") != clean
