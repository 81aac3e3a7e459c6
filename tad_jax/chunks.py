"""How the fused losses cut [R, T] tokens (R rows of T positions) into chunks of about
`chunk_size` tokens, one `lax.scan` step each.

Shape suffixes: r = rows, t = positions of a row, n = chunks, a = rows per chunk, c = positions
of a row per chunk, m = a·c tokens of one chunk, d = hidden size.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Layout(NamedTuple):
    """How the [R, T] tokens are cut into n steps of a·c tokens (a rows × c positions).

    by_rows=False: every step takes c positions of every row (a = R); rows span the chunks.
    by_rows=True (T <= chunk_size): every step takes whole rows (c = T), a of them, strided
    (step i holds rows i, n + i, 2n + i, ...) so that a batch sharded over its rows in contiguous
    blocks keeps each step spread over all shards. No row spans two chunks: β(X) needs no pre-pass.
    """

    rows: int
    t: int
    a: int
    n: int
    c: int
    by_rows: bool


def layout(rows: int, t: int, chunk_size: int) -> Layout:
    """Whole rows per step when T <= chunk_size, unless that would leave a batch sharded over
    its rows unevenly spread (fewer rows per step than devices, or not a multiple of them)."""
    devices = jax.device_count()
    a = min(rows, chunk_size // t)
    if rows >= devices:  # the rows may be sharded: a multiple of the device count per step
        a -= a % devices
    if a >= 1 and rows > 1:
        return Layout(rows, t, a, -(-rows // a), t, True)
    c = min(t, max(1, chunk_size // rows))
    return Layout(rows, t, rows, -(-t // c), c, False)


def blocks(lay: Layout, x_rt):
    """[R, T, ...] -> [a, n, c, ...]: a reshape, plus a zero-padded copy when n·c or a·n is
    larger than T or R (the padding is masked)."""
    axis, size = (0, lay.rows) if lay.by_rows else (1, lay.t)
    extra = lay.a * lay.n - size if lay.by_rows else lay.n * lay.c - size
    if extra:
        x_rt = jnp.pad(x_rt, [(0, extra if i == axis else 0) for i in range(x_rt.ndim)])
    # by rows: row s·n + i -> [s, i]; by time: position j·c + k of row r -> [r, j, k].
    return x_rt.reshape((lay.a, lay.n, lay.c) + x_rt.shape[2:])


def unblock(lay: Layout, x_anc):
    """[a, n, c, ...] -> [R, T, ...] (drops the padding)."""
    if lay.by_rows:
        return x_anc.reshape((lay.a * lay.n, lay.t) + x_anc.shape[3:])[: lay.rows]
    return x_anc.reshape((lay.rows, lay.n * lay.c) + x_anc.shape[3:])[:, : lay.t]


def to_chunks(lay: Layout, x_rt):
    """[R, T, ...] -> [n, m = a·c, ...] for the per-token inputs (mask, targets, weights, teacher
    statistics): small, so a transposed copy is cheap; the hidden states are read in place."""
    x = jnp.moveaxis(blocks(lay, x_rt), 1, 0)
    return x.reshape((lay.n, lay.a * lay.c) + x.shape[3:])


def from_chunks(lay: Layout, x_nm):
    """[n, m = a·c, ...] -> [R, T, ...]."""
    x = x_nm.reshape((lay.n, lay.a, lay.c) + x_nm.shape[2:])
    return unblock(lay, jnp.moveaxis(x, 0, 1))


def take(x_ancd, i):
    """Chunk i [m = a·c, d] of blocks [a, n, c, d], read in place (no transposed copy)."""
    x = jax.lax.dynamic_index_in_dim(x_ancd, i, axis=1, keepdims=False)
    return x.reshape(-1, x.shape[-1])
