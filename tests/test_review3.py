"""Review of the pre-pass head reuse and `tad_core.log_share` (main cef724e..b667de6).

metrics dropped its nan_to_num on the teacher tail mass, relying on `teacher_log_alpha` giving
-inf (α_T = 0) for a row with no teacher entry; no metrics test held a valid all -inf teacher
row, so putting the NaN back went unnoticed. Reference: float64 numpy sorted tail masses.
"""

import jax
import numpy as np

from tad_jax import metrics


def _np_tail_mass(t, k):
    """α_T(K) of one row in float64: the mass outside the K largest probabilities; 0 if empty."""
    if np.all(np.isneginf(t)):
        return 0.0
    p = np.exp(t - t.max())
    p = p / p.sum()
    return np.sort(p)[::-1][k:].sum()


def test_tail_mass_of_an_all_minus_inf_teacher_row_is_zero():
    rng = np.random.default_rng(0)
    s = rng.standard_normal((2, 3, 60)).astype(np.float32)
    t = rng.standard_normal((2, 3, 60)).astype(np.float32)
    t[0, 1] = -np.inf  # a valid position where the teacher has no entry
    t[1, 2, 3:] = -np.inf  # a tail that is all -inf for K >= 3
    y = rng.integers(0, 60, (2, 3))
    out = jax.jit(metrics.eval_sums)(s, t, y, np.ones((2, 3)))
    for k in metrics.DEFAULT_TAIL_KS:
        want = sum(_np_tail_mass(row.astype(np.float64), k) for row in t.reshape(-1, 60))
        np.testing.assert_allclose(out[f"tail_mass_k{k}"], want, rtol=1e-5, err_msg=str(k))
