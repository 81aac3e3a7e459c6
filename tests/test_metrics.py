"""Tests for tad_jax.metrics against hand-worked examples and a plain-numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tad_jax import metrics


def _np_log_softmax(x):
    mx = x.max(-1, keepdims=True)
    return x - mx - np.log(np.exp(x - mx).sum(-1, keepdims=True))


def reference_metrics(s_ntv, t_ntv, y_nt, m_nt, ks, bins):
    """Plain numpy (float64), the whole [N, V] histogram at once: the definition, not the stream."""
    s = s_ntv.reshape(-1, s_ntv.shape[-1]).astype(np.float64)
    t = t_ntv.reshape(-1, t_ntv.shape[-1]).astype(np.float64)
    y, m = y_nt.reshape(-1), m_nt.reshape(-1) != 0
    s, t, y = s[m], t[m], y[m]
    lps, lpt = _np_log_softmax(s), _np_log_softmax(t)
    ps, pt = np.exp(lps), np.exp(lpt)
    n, rows = len(y), np.arange(len(y))
    sorted_pt = -np.sort(-pt, axis=-1)
    bin_idx = np.minimum((ps * bins).astype(int), bins - 1)
    hits = np.zeros(bins)
    conf = np.zeros(bins)
    for b in range(bins):
        conf[b] = ps[bin_idx == b].sum()
        hits[b] = np.sum(bin_idx[rows, y] == b)
    return {
        "tokens": n,
        "kl": np.sum(pt * (lpt - lps)) / n,
        "student_ce": -lps[rows, y].mean(),
        "teacher_ce": -lpt[rows, y].mean(),
        "mismatch_rate": np.mean(pt.argmax(-1) != y),
        "top1_agreement": np.mean(ps.argmax(-1) == pt.argmax(-1)),
        "full_ece": np.abs(hits - conf).sum() / n,
        "tail_mass": {k: sorted_pt[:, k:].sum() / n for k in ks},
    }


def _assert_close(got, want, tol=1e-5):
    for key, value in want.items():
        if key == "tail_mass":
            assert sorted(got[key]) == sorted(value)
            for k in value:
                np.testing.assert_allclose(got[key][k], value[k], rtol=tol, atol=tol, err_msg=k)
        else:
            np.testing.assert_allclose(got[key], value, rtol=tol, atol=tol, err_msg=key)


def test_full_ece_three_token_vocabulary_by_hand():
    # Student probabilities chosen away from the bin edges (M = 10 bins of width 0.1).
    p = np.array([[0.65, 0.23, 0.12], [0.45, 0.34, 0.21], [0.95, 0.03, 0.02]])
    y = np.array([0, 1, 2])
    mask = np.array([1, 1, 0])  # the third position is padding: it must not count
    logits = jnp.log(jnp.asarray(p, jnp.float32))
    out = metrics.finalize(metrics.eval_sums(logits, logits, y, mask, tail_ks=(1,)))
    # Bins: 0.65→6, 0.23→2, 0.12→1 | 0.45→4, 0.34→3, 0.21→2. Hits: y=0 at 0.65 (bin 6), y=1 at
    # 0.34 (bin 3). conf: b1 .12, b2 .44, b3 .34, b4 .45, b6 .65. |hits − conf|: .12 + .44 + .66 +
    # .45 + .35 = 2.02, over N = 2 positions.
    np.testing.assert_allclose(out["full_ece"], 1.01, rtol=1e-6)
    assert out["tokens"] == 2


def test_three_token_vocabulary_other_metrics_by_hand():
    p_t = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    p_s = np.array([[0.2, 0.5, 0.3], [0.2, 0.5, 0.3]])
    y = np.array([1, 1])
    s, t = jnp.log(jnp.asarray(p_s, jnp.float32)), jnp.log(jnp.asarray(p_t, jnp.float32))
    out = metrics.finalize(metrics.eval_sums(s, t, y, np.ones(2), tail_ks=(1, 2, 5)))
    kl = (0.5 * np.log(0.5 / 0.2) + 0.3 * np.log(0.3 / 0.5) + 0.2 * np.log(0.2 / 0.3)
          + 0.1 * np.log(0.1 / 0.2) + 0.6 * np.log(0.6 / 0.5) + 0.3 * np.log(0.3 / 0.3)) / 2
    np.testing.assert_allclose(out["kl"], kl, rtol=1e-5)
    np.testing.assert_allclose(out["student_ce"], -np.log(0.5), rtol=1e-6)
    np.testing.assert_allclose(out["student_ppl"], 2.0, rtol=1e-6)
    np.testing.assert_allclose(out["teacher_ce"], -(np.log(0.3) + np.log(0.6)) / 2, rtol=1e-6)
    assert out["mismatch_rate"] == 0.5  # teacher argmax 0 ≠ y = 1, then 1 = y
    assert out["top1_agreement"] == 0.5  # student argmax 1 both times; teacher 0 then 1
    # α_T(1) = mean(0.5, 0.4); α_T(2) = mean(0.2, 0.1); K = 5 ≥ V: no tail.
    np.testing.assert_allclose(out["tail_mass"][1], 0.45, rtol=1e-6)
    np.testing.assert_allclose(out["tail_mass"][2], 0.15, rtol=1e-6)
    assert out["tail_mass"][5] == 0.0


def _random_batch(seed, shape=(2, 5, 64)):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=shape).astype(np.float32) * 2
    t = rng.normal(size=shape).astype(np.float32) * 3
    y = rng.integers(0, shape[-1], size=shape[:-1])
    m = (rng.random(shape[:-1]) > 0.3).astype(np.float32)
    return s, t, y, m


def test_matches_numpy_reference_and_jits():
    s, t, y, m = _random_batch(0)
    ks = (1, 2, 5, 10, 20, 50)
    fn = jax.jit(lambda *a: metrics.eval_sums(*a, tail_ks=ks, ece_bins=7))
    got = metrics.finalize(fn(s, t, y, m))
    _assert_close(got, reference_metrics(s, t, y, m, ks, 7))
    np.testing.assert_allclose(got["student_ppl"], np.exp(got["student_ce"]), rtol=1e-6)
    assert 0.0 <= got["full_ece"] <= 2.0


def test_summed_over_batches_equals_whole():
    parts = [_random_batch(seed) for seed in (1, 2, 3)]
    total = None
    for part in parts:
        total = metrics.add_sums(total, metrics.eval_sums(*part))
    whole = [np.concatenate([p[i] for p in parts]) for i in range(4)]
    want = metrics.finalize(metrics.eval_sums(*whole))
    _assert_close(metrics.finalize(total), want, tol=1e-6)
    _assert_close(metrics.finalize(total), reference_metrics(*whole, metrics.DEFAULT_TAIL_KS, 10))


def test_padded_vocabulary_and_huge_logits_stay_finite():
    s, t, y, m = _random_batch(4, (3, 4, 40))
    s, t = s * 1e3, t * 1e3  # logits of magnitude ~1e4: near one-hot distributions
    t[..., 32:] = -np.inf  # padded vocabulary entries, never a target
    s[..., 36:] = -np.inf
    y = y % 32
    got = metrics.finalize(metrics.eval_sums(s, t, y, m, tail_ks=(1, 50)))
    flat = [v for k, v in got.items() if k != "tail_mass"] + list(got["tail_mass"].values())
    assert np.all(np.isfinite(flat))
    want = reference_metrics(np.where(np.isinf(s), -1e30, s), np.where(np.isinf(t), -1e30, t), y, m,
                        (1, 50), 10)
    _assert_close(got, want, tol=1e-4)


def test_masked_positions_with_inf_logits_or_ignore_targets_do_not_leak():
    # A masked position may hold all -inf logits (padding) or an out-of-range target (-100, the
    # usual ignore index): the metrics are those of the valid positions alone.
    s, t, y, m = _random_batch(6)
    m[0, 1] = m[1, 2] = m[1, 4] = 0.0
    s[0, 1], t[0, 1] = -np.inf, -np.inf
    y[1, 2], y[1, 4] = -100, 10**6
    got = metrics.finalize(metrics.eval_sums(s, t, y, m))
    flat = [v for k, v in got.items() if k != "tail_mass"] + list(got["tail_mass"].values())
    assert np.all(np.isfinite(flat))
    _assert_close(got, reference_metrics(s, t, y, m, metrics.DEFAULT_TAIL_KS, 10))


def test_tail_mass_is_exact_when_top_mass_is_near_one():
    # Teacher tail mass ~1e-9: 1 − Σ top-K would round to 0 (or below) in float32.
    t = np.zeros((1, 100), np.float32)
    t[0, 0] = 25.0
    s = np.zeros_like(t)
    got = metrics.finalize(metrics.eval_sums(s, t, np.zeros(1, int), np.ones(1), tail_ks=(1, 2)))
    want1 = 99 * np.exp(-25.0) / (np.exp(0.0) * 99 * np.exp(-25.0) + 1.0)
    np.testing.assert_allclose(got["tail_mass"][1], want1, rtol=1e-5)
    np.testing.assert_allclose(got["tail_mass"][2], want1 * 98 / 99, rtol=1e-5)


def test_bad_input():
    s, t, y, m = _random_batch(5)
    with pytest.raises(ValueError, match="same shape"):
        metrics.eval_sums(s, t[..., :10], y, m)
    with pytest.raises(ValueError, match="without the vocabulary axis"):
        metrics.eval_sums(s, t, y[:, :2], m)
    with pytest.raises(ValueError, match="tail_ks"):
        metrics.eval_sums(s, t, y, m, tail_ks=(0, 5))
    with pytest.raises(ValueError, match="ece_bins"):
        metrics.eval_sums(s, t, y, m, ece_bins=0)
    with pytest.raises(ValueError, match="no valid positions"):
        metrics.finalize(metrics.eval_sums(s, t, y, np.zeros_like(m)))
    with pytest.raises(ValueError, match="same tail_ks"):
        metrics.add_sums(metrics.eval_sums(s, t, y, m), metrics.eval_sums(s, t, y, m, tail_ks=(1,)))
