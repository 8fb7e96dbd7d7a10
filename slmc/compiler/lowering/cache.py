"""KV cache writers: where a chunk's new K/V rows go, in the forms the targets keep caches.

Rows: one cache per depth, [1, kvh, L, hd] (BHSD, rows on axis 2) or [1, L, kvh, hd] (BSHD,
axis 1); float, or int8 as (codes, per-token scales). Rows land at their positions by
index_copy (in place for buffers, out of place for caches as I/O), by a target's own
`write_rows` op, or at a ring buffer's slots (ring.py).
Span: Core ML's stacked keyCache/valueCache, one layer's view [kvh, L, hd] or [L, kvh, hd],
rows [start, end) written in place (a state) or by slice_scatter (I/O).
"""

from __future__ import annotations

import torch

from .math import int8_kv_codes, int8_kv_scale


def write_rows(cache, axis: int, slots, new, inplace: bool, pad=None, writer=None):
    """Store the new rows at `slots`: int8 as codes + per-token scales, float caches rounded to
    their dtype. Rows where `pad` is true write back what was there.
    writer: a target's op writer(cache, axis, slots, rows) -> cache, out of place (linear caches)."""
    if isinstance(cache, tuple):
        return _write_int8(cache, axis, slots, new, inplace, pad, writer)
    new = _keep(cache, axis, slots, new.to(cache.dtype), pad)  # fp16 caches round here
    return _store(cache, axis, slots, new, inplace, writer)


def _store(buf, axis: int, slots, rows, inplace: bool, writer=None):
    if inplace:
        buf.index_copy_(axis, slots, rows)
        return buf
    if writer is not None:
        return writer(buf, axis, slots, rows)
    return buf.index_copy(axis, slots, rows)


def as_stored(new, cache):
    """The new rows as the cache will hand them back once written."""
    if isinstance(cache, tuple):
        s = int8_kv_scale(new)
        return int8_kv_codes(new, s) * s
    return new.to(cache.dtype)


def scale_shape(cache_shape: tuple) -> tuple:
    """An int8 cache's scales: one per token and KV head."""
    return (*cache_shape[:-1], 1)


def _keep(cache, axis: int, slots, rows, pad):
    if pad is None:
        return rows
    shape = [1, 1, 1, 1]
    shape[axis] = -1
    # LiteRT has no fp16 gather: gather in fp32 (exact both ways)
    src = cache.float() if cache.dtype == torch.float16 else cache
    return torch.where(pad.view(shape), src.index_select(axis, slots).to(rows.dtype), rows)


def _write_int8(cache: tuple, axis: int, positions, new, inplace: bool, pad=None, writer=None) -> tuple:
    """Quantize the new rows per token and head, then store codes and scales at `positions`."""
    codes, scales = cache
    s = int8_kv_scale(new)
    q = int8_kv_codes(new, s).to(torch.int8)
    q, s = _keep(codes, axis, positions, q, pad), _keep(scales, axis, positions, s, pad)
    out = (_store(codes, axis, positions, q, inplace, writer), _store(scales, axis, positions, s, inplace, writer))
    return cache if inplace else out


def read_rows(cache):
    """The cache as float rows: int8 codes times their scales, or the float cache itself."""
    if isinstance(cache, tuple):
        return cache[0].to(cache[1].dtype) * cache[1]
    return cache


def write_span(kc, vc, k_new, v_new, span, inplace: bool, bshd: bool):
    """Rows [start, end) of one layer of a stacked cache ([L, kvh, hd] when bshd, else
    [kvh, L, hd]); returns the caches and the keys/values [kvh, end, hd] to attend to."""
    start, end = span
    if inplace:  # a state: Core ML turns this into slice_update + a state write
        (kc[start:end] if bshd else kc[:, start:end]).copy_(k_new)
        (vc[start:end] if bshd else vc[:, start:end]).copy_(v_new)
    else:
        axis = 0 if bshd else 1
        kc = torch.slice_scatter(kc, k_new, axis, start, end)
        vc = torch.slice_scatter(vc, v_new, axis, start, end)
    keys = kc[:end].transpose(0, 1) if bshd else kc[:, :end]
    values = vc[:end].transpose(0, 1) if bshd else vc[:, :end]
    return kc, vc, keys, values

