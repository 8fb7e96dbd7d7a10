"""Scratch storage for float weights a pass rewrote (issue 17: compile at phone-model scale).

A checkpoint's weights are read lazily and released after use (`Weight.release`), so a pass
that walks the model block by block holds one block's floats at a time. A pass that rewrites
floats (quant.awq:quantize=false folding its scales, quant.rotate) makes new tensors with
no file behind them, and by the last block the whole rewritten model is resident: at 1B
parameters that was 4.7 GB held through the next pass. `Spill` writes such tensors to an
unlinked temporary file (gone when the process ends, even if killed) and hands back Weights
that read them again on first use, so they are released like the checkpoint's own.

The file is under TMPDIR (tempfile's choice); a full disk is reported as such.
`page_out_weights` lets go of the checkpoint's mapped pages once what was read from them is
copied (a pass's block, the sampling module, a lowering step).
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import os
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch

from ..errors import SlmcError
from .ir import DEQUANT_CHUNK, DTYPE_NAMES, DTYPES, QuantWeight, Weight, named_weights

# smaller tensors (norm weights, biases) stay in memory. Not 1 MiB: SmolLM2-135M's K and V
# projections (192 x 576 fp32, 432 KiB, 60 of them) then stayed on the heap through every
# lowering: 25 MiB held through LiteRT's conversion (bench/results/memory.md's notes)
MIN_BYTES = 64 << 10
# tensors Spill.quant made (id -> weak reference): a code table already in a file is not
# written again (ids are reused once a tensor dies, so the reference must still be it)
_MAPPED: dict[int, weakref.ref] = {}


WEIGHT_FILES = (".safetensors", ".gguf")
MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now; clean file pages are re-read on their next use
# the spill files' "dev inode" as /proc/self/maps prints them: their mappings are let go like
# the checkpoint's (an unlinked file's mapped name is not its own, so names can't tell)
_SPILL_FILES: set[tuple[str, str]] = set()


def _mappings() -> list[list[str]]:
    """/proc/self/maps, each line split (address range, perms, offset, dev, inode, path...);
    empty where there is none (not Linux)."""
    try:
        return [ln.split() for ln in Path("/proc/self/maps").read_text().splitlines()]
    except OSError:
        return []


def register_spill_file(fd: int) -> None:
    """page_out_weights lets go of this open file's mappings too."""
    st = os.fstat(fd)
    _SPILL_FILES.add((f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}", str(st.st_ino)))


@functools.lru_cache(maxsize=None)
def _libc():
    """This process's C library, loaded once (each ctypes.CDLL is a reference cycle: thousands
    of them were garbage by the end of a 1B calibration), or None where there is none."""
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


@functools.lru_cache(maxsize=None)
def _madvise():
    """libc's madvise(addr, length, advice), or None where there is no libc to load."""
    import ctypes

    libc = _libc()
    if libc is None:
        return None
    f = libc.madvise
    f.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return f


def _file_spans() -> list[tuple[int, int]]:
    """(start, end) of every mapping of a file (inode not 0) in this process."""
    return [tuple(int(x, 16) for x in m[0].split("-")) for m in _mappings() if len(m) >= 6 and m[4] != "0"]


def page_out_weights() -> None:
    """Let go of the resident pages of the checkpoint's memory-mapped weight files and of the
    spill files (the lowering's Parameters are mapped from one). Reading a mapped file (the
    import's NaN check, a pass, a lowering step) leaves every page it touched counted in the
    process's RSS for as long as the file stays mapped, beside the copies made from them. MADV_PAGEOUT drops clean pages (re-read from the file if used again) and
    never loses a page written in place (it is swapped or kept); where the call is missing
    (not Linux, older kernels) nothing happens."""
    import sys

    if not sys.platform.startswith("linux"):
        return
    maps = _mappings()
    madvise = _madvise()
    if madvise is None:
        return
    for m in maps:
        if len(m) >= 6 and m[-1].endswith(WEIGHT_FILES) or len(m) >= 5 and (m[3], m[4]) in _SPILL_FILES:
            lo, hi = (int(x, 16) for x in m[0].split("-"))
            madvise(lo, hi - lo, MADV_PAGEOUT)
    # glibc keeps freed heap memory (the transient copies of weights a lowering makes) for
    # reuse instead of returning it to the system
    trim_heap()


MADV_DONTNEED = 4  # drop these pages from this process; a file page stays in the page cache


def file_ranges(tensors) -> list[tuple[int, int]]:
    """The whole pages inside each tensor of `tensors` that is a mapped file (a checkpoint, a
    spill); heap tensors are left out, so `let_go` can never drop data that lives nowhere else."""
    return _file_pages([(t.data_ptr(), t.nbytes) for t in tensors])


def array_ranges(arrays) -> list[tuple[int, int]]:
    """file_ranges for numpy arrays (a converter's constants that view a mapped tensor)."""
    return _file_pages([(a.__array_interface__["data"][0], a.nbytes) for a in arrays])


def _file_pages(extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(start, length) of the whole pages inside each (address, bytes) extent that lies in a
    mapped file."""
    extents = [(lo, n) for lo, n in extents if n >= MIN_BYTES]
    spans = _file_spans() if extents else []  # /proc/self/maps only when an extent is big enough
    return [r for lo, n in extents if any(a <= lo and lo + n <= b for a, b in spans)
            for r in _whole_pages(lo, n)]


def _whole_pages(lo: int, n: int) -> list[tuple[int, int]]:
    page = mmap.PAGESIZE
    a, b = -(-lo // page) * page, (lo + n) // page * page
    return [(a, b - a)] if b > a else []


def releaser(a: np.ndarray):
    """A function that lets go of the pages of a part of `a` (a view into it) once read, when `a`
    lies in a mapped file, and does nothing when it is heap: decided once for a loop over its
    parts, not by reading /proc/self/maps for each part."""
    if not array_ranges([a]):
        return lambda part: None
    return lambda part: let_go(_whole_pages(part.__array_interface__["data"][0], part.nbytes))


def let_go(ranges: list[tuple[int, int]]) -> None:
    """Unmap the pages of `ranges` (file_ranges) from this process's RSS. Unlike
    page_out_weights' MADV_PAGEOUT, the page cache keeps them, so reading them again is a
    minor fault, not a disk read: for a loop that reads every weight on every step."""
    madvise = _madvise() if ranges else None
    for lo, n in ranges if madvise is not None else ():
        madvise(lo, n, MADV_DONTNEED)


@contextlib.contextmanager
def streaming_pages(modules):
    """Within: each module of `modules` lets its file-mapped parameters' pages go once its
    forward returns, so a whole-model loop (data-free sampling, calib.py) holds about one
    module's weights instead of all of them (Llama-3.2-1B: 4.7 GB of fp32 per decode step).
    Values are unchanged: the pages are read back from the file on the next step."""
    import sys

    if not sys.platform.startswith("linux"):
        yield
        return
    hooks = []
    for m in modules:
        ranges = file_ranges(list(m.parameters()))
        hooks.append(m.register_forward_hook(lambda *_, r=ranges: let_go(r)))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def trim_heap() -> None:
    """Return the heap memory glibc keeps after frees to the system (malloc_trim); a no-op
    where there is no glibc."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@contextlib.contextmanager
def trimming(every_s: float = 1.0, weights: bool = False):
    """Within: trim_heap() every `every_s` seconds from a helper thread. A lowering that
    allocates and frees graph copies for minutes (ExecuTorch's to_edge) otherwise holds its
    garbage until its end, and that garbage sets the compile's peak RSS (bench/memory.py).
    weights: page_out_weights() instead, for a converter that reads every weight once to
    make its own copy (coremltools' fp16 casts) and so leaves them all resident."""
    import threading

    stop = threading.Event()

    def loop():
        while not stop.wait(every_s):
            page_out_weights() if weights else trim_heap()

    t = threading.Thread(target=loop, name="slmc-trim", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def file_backed(t: torch.Tensor) -> bool:
    """Whether `t`'s memory is a mapped file (a checkpoint, a spill) rather than heap; False
    where /proc/self/maps is missing."""
    lo, hi = t.data_ptr(), t.data_ptr() + t.nbytes
    return any(a <= lo and hi <= b for a, b in _file_spans())


class Spill:
    """An append-only scratch file of tensors; each `put` returns a Weight reading it back."""

    def __init__(self, where: str):
        self.where = where  # the pass, for error messages
        self._file = None
        self._end = 0

    def put(self, t: torch.Tensor) -> Weight:
        t = t.detach().contiguous()
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"cannot spill dtype {t.dtype}")
        off = self._end
        self._append(t)
        n, shape, dtype = self._end - off, tuple(t.shape), DTYPE_NAMES[t.dtype]
        # a plain closure (not a bound method), so copy.deepcopy of a model shares it
        return Weight(shape=shape, dtype=dtype, loader=lambda: self._read(off, n, shape, dtype))

    def _append(self, t: torch.Tensor) -> None:
        """Write contiguous `t`'s bytes at the end of the file."""
        raw = t.view(torch.uint8) if t.dtype == torch.bfloat16 else t  # numpy has no bfloat16
        buf = memoryview(raw.numpy()).cast("B")
        off, n = self._end, len(buf)
        try:
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="slmc-spill-")
                register_spill_file(self._file.fileno())
            done = 0
            while done < n:  # pwrite may write less than asked
                done += os.pwrite(self._file.fileno(), buf[done:], off + done)
        except OSError as e:
            raise SlmcError(f"cannot write to scratch space in {tempfile.gettempdir()} "
                            f"({e.strerror}); free space there or set TMPDIR to a larger disk", self.where) from None
        self._end += n

    def converted(self, t: torch.Tensor, dtype: torch.dtype, chunk: int = 1 << 22) -> torch.Tensor:
        """`t.float().to(dtype)` as a tensor mapped from this file, converted and written
        `chunk` elements at a time: the whole converted copy is never on the heap (a bf16
        128k-row table's fp32 copy is 1 GB beside its 0.5 GB source, Llama-3.2-1B)."""
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"cannot spill dtype {dtype}")
        flat, off = t.detach().reshape(-1), self._end
        for i in range(0, flat.numel(), chunk):
            self._append(flat[i:i + chunk].float().to(dtype).contiguous())
        return self._read(off, self._end - off, tuple(t.shape), DTYPE_NAMES[dtype])

    def dequantized(self, q: QuantWeight, dtype: torch.dtype) -> torch.Tensor:
        """`q.float().to(dtype)` as a tensor mapped from this file, dequantized a block of rows at a
        time (QuantWeight.rows, the same values as float()): the whole float image is never on the
        heap (SmolLM2-135M's ONNX int4 lowering held 200-600 MiB of freed images and temporaries as
        glibc's garbage, varying from run to run, until trimmed)."""
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"cannot spill dtype {dtype}")
        rows, cols = q.shape
        step, off = max(1, DEQUANT_CHUNK // max(1, cols)), self._end
        for r in range(0, rows, step):
            self._append(q.rows(slice(r, r + step)).to(dtype).contiguous())
        trim_heap()  # the blocks' temporaries: freed, but kept by glibc (440 MiB of them by the end)
        return self._read(off, self._end - off, (rows, cols), DTYPE_NAMES[dtype])

    def converted_array(self, a: np.ndarray, dtype, chunk: int = 1 << 22) -> np.ndarray:
        """`a.astype(dtype)` (numpy's own rounding, what a converter computes) as an array mapped
        from this file, converted `chunk` values at a time: never a whole copy on the heap. The
        pages of `a` each chunk read are let go when `a` is a mapped file (let_go)."""
        flat, off = np.ascontiguousarray(a).reshape(-1), self._end
        read = releaser(flat)
        for i in range(0, flat.size, chunk):
            self._append(torch.from_numpy(flat[i:i + chunk].astype(dtype)))
            read(flat[i:i + chunk])
        name = DTYPE_NAMES[torch.from_numpy(np.empty(0, dtype)).dtype]
        return self._read(off, self._end - off, tuple(a.shape), name).numpy()

    def _read(self, off: int, n: int, shape: tuple, dtype: str) -> torch.Tensor:
        """The tensor as a private (copy-on-write) mapping of the file: its pages are file
        pages, which page_out_weights lets go of and the kernel may reclaim, not heap; a write
        to the tensor stays in this process."""
        if n == 0:
            return torch.empty(shape, dtype=DTYPES[dtype])
        if self._end < off + n:
            raise SlmcError("scratch weight file is truncated", self.where)
        start = off - off % mmap.ALLOCATIONGRANULARITY
        m = mmap.mmap(self._file.fileno(), off + n - start, offset=start, access=mmap.ACCESS_COPY)
        t = torch.from_numpy(np.frombuffer(m, dtype=np.uint8, count=n, offset=off - start))
        return t.view(DTYPES[dtype]).view(shape)

    def mapped(self, t: torch.Tensor) -> torch.Tensor:
        """`t`'s values as a tensor mapped from this file (see _read); `t` can then be freed."""
        return self.put(t).data

    def mapped_weight(self, w: Weight) -> torch.Tensor:
        """`w`'s values as a tensor mapped from this file, written a chunk of rows at a time
        (Weight.rows): a checkpoint's table is never in memory whole (0.5 GB of bf16 at 1B)."""
        if w.dtype not in DTYPES:
            raise ValueError(f"cannot spill dtype {w.dtype}")
        off = self._end
        for t in w.row_chunks():
            self._append(t.detach().contiguous())
        return self._read(off, self._end - off, tuple(w.shape), w.dtype)

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of `t` of its own: mapped from this file when it is as big as `quant` would
        move (a second table of a 128k vocabulary's codes is 262 MiB), else a heap clone."""
        return self.mapped(t) if t.nbytes >= MIN_BYTES else t.clone()

    def weight(self, w: Weight) -> Weight:
        """A spilled copy of a rewritten float; else `w` itself, its data dropped if it can be
        re-read (the checkpoint's weights a pass only read) and kept if small."""
        if w._loader is not None:
            w.release()
        elif w.loaded and w.nbytes() >= MIN_BYTES:
            return self.put(w.data)
        return w

    def quant(self, q: QuantWeight) -> int:
        """Move `q`'s codes (and its scales and zeros, when big) into this file, in place: each
        becomes a mapped tensor of the same values (see _read), whose pages page_out_weights
        lets go, so a model's codes are not all resident at once (Llama-3.2-1B int4: 1.2 GB of
        one-code-per-byte tables held from quant.rtn to the artifact's writing). Sharing is
        kept: every node holding `q` sees the move. Returns the bytes written."""
        n = 0
        for f in ("codes", "scales", "zeros"):
            t = getattr(q, f)
            if t is None or t.nbytes < MIN_BYTES or _is_mapped(t):
                continue
            m = self.mapped(t)
            _MAPPED[id(m)] = weakref.ref(m, lambda _, k=id(m): _MAPPED.pop(k, None))
            setattr(q, f, m)
            n += t.nbytes
        return n

    @property
    def nbytes(self) -> int:
        return self._end


def _is_mapped(t: torch.Tensor) -> bool:
    r = _MAPPED.get(id(t))
    return r is not None and r() is t


def spill_codes(model, spill: Spill) -> int:
    """Spill.quant for every quantized weight of `model` whose tables are still on the heap (a
    pass that made codes without spilling them, an imported GPTQ/GGUF checkpoint; `model` may
    be one block); then every weight file's pages are let go. Returns the bytes written."""
    n = sum(spill.quant(w) for _, w in named_weights(model) if isinstance(w, QuantWeight))
    page_out_weights()
    return n


def spill_tree(obj, spill: Spill) -> int:
    """Leave nothing of `obj` (a block a pass is done with) resident that can live on disk: every
    rewritten float Weight is replaced by its spilled copy (a Weight met twice, shared, is
    spilled once) and checkpoint weights the pass read are released. Returns the bytes written."""
    import dataclasses

    memo: dict[int, tuple[Weight, Weight]] = {}  # keeps the old Weight alive: ids stay unique
    before = spill.nbytes

    def new(x: Weight) -> Weight:
        if id(x) not in memo:
            memo[id(x)] = (x, spill.weight(x))
        return memo[id(x)][1]

    def walk(o):
        if isinstance(o, list):
            for i, x in enumerate(o):
                if isinstance(x, Weight):
                    o[i] = new(x)
                else:
                    walk(x)
        elif dataclasses.is_dataclass(o) and not isinstance(o, type):
            for f in dataclasses.fields(o):
                x = getattr(o, f.name)
                if isinstance(x, Weight):
                    setattr(o, f.name, new(x))
                else:
                    walk(x)

    walk(obj)
    # walk's closure is a cycle (it calls itself) holding memo, and memo the old floats: cleared
    # here, they go now, not at the next garbage collection (0.4 GB per 1B block in quant.awq)
    memo.clear()
    return spill.nbytes - before
