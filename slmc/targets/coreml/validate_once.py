"""coremltools' pass pipelines, with the program validated once per pipeline, not per pass.

PassPipelineManager.apply_pipeline validates the whole program before its passes and again after
each one (about 80 passes a pipeline, three pipelines a function): on the tiny Llama's two-function
Core ML compile that was 236 walks over every op and 17 of 79 profiled seconds. Validation only
reads the program (it raises on an inconsistent one and changes nothing), so one walk at the end
of each pipeline accepts and rejects the same programs' final states and gives the same package
bytes; what is lost is only which pass broke a program, which coremltools' own DEBUG mode (or
running without this context) still tells. The scope check that coremltools asks for after dead
code elimination is made at the end when any pass asked for it.
"""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def validated_once():
    """Within: every coremltools pass pipeline validates its program once, when it is done."""
    from coremltools.converters.mil.mil.passes.pass_pipeline import PassPipelineManager
    from coremltools.converters.mil.mil.program import Program

    original = PassPipelineManager.__dict__["apply_pipeline"]

    def apply_pipeline(prog, pass_pipeline):
        asked = []  # check_essential_scope of each validation the pipeline asked for
        prog.validate = lambda check_essential_scope=False: asked.append(check_essential_scope)
        try:
            original.__func__(prog, pass_pipeline)
        finally:
            del prog.validate  # the instance attribute: Program.validate again
        Program.validate(prog, check_essential_scope=any(asked))

    PassPipelineManager.apply_pipeline = staticmethod(apply_pipeline)
    try:
        yield
    finally:
        PassPipelineManager.apply_pipeline = original
