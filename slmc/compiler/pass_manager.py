"""Passes and the pass manager.

A pass is one class in one file under slmc/passes/: a registered `name`, options as
a frozen dataclass (`Options`), `requires` and `ensures` (IR properties, see
compiler/properties.py), and `run(ir) -> PassResult(ir, modified)`. The manager
resolves names, checks `requires` on the IR before each pass and `ensures` after it,
verifies the IR after every pass, times each one, and can dump the IR after each pass
(`--dump-ir DIR`).

The registry is filled from the top: importing `slmc.passes` registers every pass;
the compiler never imports the passes itself.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..errors import SlmcError
from .ir import Model, dequant_cache
from .properties import first_violation, unknown
from .verify import verify
from .spill import Spill, spill_codes, trim_heap, trimming


@dataclass(frozen=True)
class NoOptions:
    pass


@dataclass
class PassResult:
    ir: Model
    modified: bool
    info: dict = field(default_factory=dict)  # what the pass measured (bytes saved, error ...)


class Pass:
    """`requires` / `ensures`: IR property names (a pass whose promises depend on its
    options overrides them with a read-only property)."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    requires: tuple[str, ...] = ()  # must hold on the IR before run (else the user's order is wrong)
    ensures: tuple[str, ...] = ()  # hold on the IR after run (else the pass is broken)

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    def run(self, ir: Model) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError


PASSES: dict[str, type[Pass]] = {}


def _check_names(p, where: str) -> None:
    """Property names must exist (a typo would otherwise never be checked)."""
    declared = [getattr(p, attr) for attr in ("requires", "ensures")]
    # on a class, an option-dependent declaration is still a property object: checked per instance
    bad = [n for names in declared if isinstance(names, tuple) for n in unknown(names)]
    if bad:
        raise ValueError(f"{where}: unknown IR properties {', '.join(bad)} (see compiler/properties.py)")


def register(cls: type[Pass]) -> type[Pass]:
    _check_names(cls, f"pass {cls.name}")
    PASSES[cls.name] = cls
    return cls


def _coerce(value: str, typ, where: str):
    typ = typ if isinstance(typ, type) else {"int": int, "float": float, "bool": bool, "str": str}.get(
        str(typ).split("|")[0].strip(), str)
    try:
        if typ is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return typ(value)
    except ValueError:
        raise SlmcError(f"cannot read {value!r} as {typ.__name__}", where) from None


def parse_pass(spec: str) -> Pass:
    """'name' or 'name:key=value,key=value' -> a configured pass (import slmc.passes first)."""
    if not PASSES:  # a programming error, not the user's: nobody imported slmc.passes
        raise RuntimeError("no passes are registered; import slmc.passes before parsing pass specs")
    name, _, rest = spec.partition(":")
    if name not in PASSES:
        raise SlmcError(f"unknown pass {name!r}; available: {', '.join(sorted(PASSES))}", "--pass")
    cls = PASSES[name]
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if key in fields and not eq:
            raise SlmcError(f"option {key!r} of pass {name} needs a value ({key}=...)", "--pass")
        if key not in fields:
            raise SlmcError(f"pass {name} has no option {key!r}; options: {', '.join(fields) or 'none'}",
                            "--pass")
        kwargs[key] = _coerce(value, fields[key].type, f"--pass {name}:{key}")
    try:
        return cls(cls.Options(**kwargs))
    except (TypeError, ValueError) as e:
        raise SlmcError(str(e), f"--pass {name}") from None


def describe(p: Pass) -> dict:
    return {"name": p.name, "options": dataclasses.asdict(p.options)}


@dataclass
class PassLog:
    name: str
    options: dict
    modified: bool
    seconds: float
    info: dict


class PassManager:
    def __init__(self, passes: list[Pass], dump_dir: Path | None = None, progress=None):
        self.passes, self.dump_dir, self.progress = passes, dump_dir, progress
        for p in passes:
            _check_names(p, f"pass {p.name}")

    def run(self, ir: Model) -> tuple[Model, list[PassLog]]:
        from .printer import print_model

        verify(ir, "imported IR")
        logs, codes_file = [], Spill("quantized weights")
        if self.dump_dir:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            (self.dump_dir / "00-input.txt").write_text(print_model(ir))
        for i, p in enumerate(self.passes, 1):
            if self.progress:
                self.progress(f"pass {p.name}")
            unmet = first_violation(ir, p.requires)
            if unmet:
                prop, why = unmet
                fix = "; " + prop.fix.replace("{pass}", p.name) if prop.fix else ""
                raise SlmcError(f"requires {prop.about} ({prop.name}), but {why}{fix}", f"--pass {p.name}")
            t0 = time.perf_counter()
            # dequant_cache: a pass reads each quantized weight a few times at most. trimming: the
            # floats a pass loads and drops (quant.rtn: every weight) stay in glibc's heap
            # otherwise, beside the codes it keeps (430 MiB after quant.rtn on SmolLM2-135M)
            with dequant_cache(False), trimming(0.25):
                res = p.run(ir)
            # quantized tables a pass left on the heap go to scratch space (spill.Spill.quant):
            # kept resident, a 1B model's int4 codes are 1.2 GB through every later step
            spill_codes(res.ir, codes_file)
            trim_heap()
            dt = time.perf_counter() - t0
            verify(res.ir, f"IR after pass {p.name}")
            broken = first_violation(res.ir, p.ensures)
            if broken:  # a bug in the pass, not the user's doing: keep the traceback
                raise RuntimeError(f"pass {p.name} broke its promise {broken[0].name} ({broken[0].about}): "
                                   f"{broken[1]}")
            ir = res.ir
            logs.append(PassLog(p.name, dataclasses.asdict(p.options), res.modified, round(dt, 4), res.info))
            if self.dump_dir:
                (self.dump_dir / f"{i:02d}-{p.name}.txt").write_text(print_model(ir))
        return ir, logs
