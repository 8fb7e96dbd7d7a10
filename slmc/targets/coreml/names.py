"""Stable op names in the Core ML programs slmc converts."""

from __future__ import annotations


def fresh_op_names() -> None:
    """Unnamed MIL ops are named from a process-wide counter (Builder.name_count) that
    coremltools clears after each conversion but that reading a program back (milproto's load:
    slmc's readback and check interpreter) advances; cleared before converting, so the same
    model gives the same package bytes whatever ran before in the process."""
    from coremltools.converters.mil.mil import Builder

    Builder.name_count.clear()
