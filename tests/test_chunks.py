"""The fused losses' chunk layouts (`tad_jax.chunks`) against a hand-built numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tad_jax import chunks

CASES = [  # (rows, T, chunk_size)
    (4, 6, 12),   # whole rows, 2 per chunk
    (5, 6, 12),   # whole rows, the last chunk half padding
    (3, 10, 4),   # rows span chunks: 1 position of each row per chunk
    (2, 7, 6),    # rows span chunks: 3 positions, the last chunk padded in time
    (1, 9, 4),    # one row: always by time
    (3, 5, 1),    # chunk_size below the rows: one position per chunk
]


def _reference_chunks(rows, t, lay):
    """Token ids (r·100 + position) of each chunk, -1 for padding: [n, m], by hand."""
    out = []
    for i in range(lay.n):
        if lay.by_rows:  # chunk i holds rows i, n + i, 2n + i, ... (strided)
            ids = [[r * 100 + p if r < rows else -1 for p in range(t)]
                   for r in range(i, lay.a * lay.n, lay.n)]
        else:  # chunk i holds positions i·c .. i·c + c − 1 of every row
            ids = [[r * 100 + p if p < t else -1 for p in range(i * lay.c, (i + 1) * lay.c)]
                   for r in range(rows)]
        out.append(np.asarray(ids).reshape(-1))
    return np.stack(out)


@pytest.mark.parametrize("rows,t,chunk_size", CASES)
def test_layout_cuts_every_token_once(rows, t, chunk_size):
    lay = chunks.layout(rows, t, chunk_size)
    assert lay.a * lay.c <= max(chunk_size, lay.a), lay  # about chunk_size tokens per step
    if lay.by_rows:
        assert lay.c == t and lay.a * lay.n >= rows > lay.a * (lay.n - 1)
    else:
        assert lay.a == rows and lay.c * lay.n >= t > lay.c * (lay.n - 1)
    ids_rt = jnp.asarray(np.arange(rows)[:, None] * 100 + np.arange(t))
    # Padding is zero-filled: shift the ids by one so it reads -1 after the shift back.
    got = np.asarray(chunks.to_chunks(lay, ids_rt + 1)) - 1
    np.testing.assert_array_equal(got, _reference_chunks(rows, t, lay))
    # Round trips, with a trailing feature axis.
    x_rtd = jnp.asarray(np.random.default_rng(0).normal(size=(rows, t, 3)), jnp.float32)
    np.testing.assert_array_equal(chunks.from_chunks(lay, chunks.to_chunks(lay, x_rtd)), x_rtd)
    np.testing.assert_array_equal(chunks.unblock(lay, chunks.blocks(lay, x_rtd)), x_rtd)
    # The hidden states, read in place chunk by chunk, line up with the per-token inputs.
    blocks = chunks.blocks(lay, x_rtd)
    for i in range(lay.n):
        np.testing.assert_array_equal(chunks.take(blocks, i), chunks.to_chunks(lay, x_rtd)[i])


def test_whole_rows_per_chunk_are_a_multiple_of_the_devices():
    """With R >= devices a batch may be sharded over its rows: each chunk takes a multiple of the
    device count of them, else positions of every row."""
    devices = jax.device_count()
    lay = chunks.layout(4 * devices, 8, 8 * (devices + 1))
    assert lay.by_rows and lay.a % devices == 0
    lay = chunks.layout(2 * devices, 8, 8 * devices - 1) if devices > 1 else None
    if lay is not None:  # fewer whole rows than devices fit: positions of every row instead
        assert not lay.by_rows and lay.a == 2 * devices
