"""Tests of tad_jax.losses against plain-jnp references written here.

The references compute probabilities directly (softmax, argsort top-K, Σ over the tail), not in log
space, so they are independent of the implementation; exactness checks run in float64.
Shapes: `_btv` = [..., T, V], `_bt` = [..., T].
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from tad_jax import (
    causal_lm_loss,
    cosine_hidden_loss,
    distillation_loss,
    js_divergence,
    kl_divergence,
    reverse_kl_divergence,
    tad_components,
    tad_divergence,
)
from tad_jax import tad_core as core

EXACT = dict(rtol=1e-10, atol=1e-12)  # float64 exactness
F32 = dict(rtol=1e-5, atol=1e-6)


def _logits(seed, shape, dtype=jnp.float32, scale=2.0):
    return (scale * jax.random.normal(jax.random.PRNGKey(seed), shape)).astype(dtype)


def _mask(seed, shape, p=0.7):
    return jax.random.uniform(jax.random.PRNGKey(seed), shape) < p


def _data(shape=(2, 5, 13), dtype=jnp.float32, seed=0):
    s = _logits(seed, shape, dtype)
    t = _logits(seed + 1, shape, dtype)
    m = _mask(seed + 2, shape[:-1])
    return s, t, m


# ---------------------------------------------------------------------------------------------
# References (plain jnp, probability space)
# ---------------------------------------------------------------------------------------------


def ref_components(s_btv, t_btv, mask_bt, top_k, beta, tau=1.0, eps=1e-6, empty_bt=None):
    # empty_bt: positions to treat as holding no distribution (α_T = 0, no loss).
    ps, pt = jax.nn.softmax(s_btv / tau), jax.nn.softmax(t_btv / tau)
    order = jnp.argsort(-t_btv, axis=-1, stable=True)[..., :top_k]
    top = jnp.any(order[..., :, None] == jnp.arange(t_btv.shape[-1]), axis=-2)
    at = jnp.sum(jnp.where(top, 0.0, pt), -1)
    if empty_bt is not None:
        at = jnp.where(empty_bt, 0.0, at)
    as_ = jnp.sum(jnp.where(top, 0.0, ps), -1)
    head = jnp.sum(jnp.where(top, pt * jnp.log(pt / ps), 0.0), -1)
    kl1 = head + at * jnp.log(at / as_)
    ptt, pst = pt / at[..., None], ps / as_[..., None]
    kl2 = jnp.sum(jnp.where(top, 0.0, ptt * jnp.log(ptt / pst)), -1)
    m = mask_bt.astype(s_btv.dtype)
    abar = jnp.sum(m * at, -1) / jnp.sum(m, -1)
    beta_x = beta / jnp.maximum(abar, eps)
    loss = tau**2 * m * (kl1 + beta_x[..., None] * at * kl2)
    if empty_bt is not None:
        loss = jnp.where(empty_bt, 0.0, loss)
    return dict(kl1=kl1, kl2=kl2, alpha_t=at, alpha_s=as_, beta_x=beta_x, loss=loss)


def ref_tad(s, t, m, top_k=3, beta=2.0, tau=1.0):
    loss = ref_components(s, t, m, top_k, beta, tau)["loss"]
    return jnp.sum(loss) / jnp.sum(m)


def ref_kl_bt(s, t, tau=1.0):
    ps, pt = jax.nn.softmax(s / tau), jax.nn.softmax(t / tau)
    return tau**2 * jnp.sum(pt * jnp.log(pt / ps), -1)


def ref_mean(loss_bt, m):
    return jnp.sum(jnp.where(m, loss_bt, 0.0)) / jnp.sum(m)


# ---------------------------------------------------------------------------------------------
# TAD values and gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 3, 12])
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_tad_matches_reference(x64, top_k, tau):
    s, t, m = _data(dtype=jnp.float64)
    got = tad_divergence(s, t, m, top_k=top_k, beta=1.5, temperature=tau, reduction="none")
    want = ref_components(s, t, m, top_k, 1.5, tau)["loss"]
    np.testing.assert_allclose(got, want, **EXACT)
    total = tad_divergence(s, t, m, top_k=top_k, beta=1.5, temperature=tau, reduction="sum")
    np.testing.assert_allclose(total, jnp.sum(want), **EXACT)
    mean = tad_divergence(s, t, m, top_k=top_k, beta=1.5, temperature=tau)
    np.testing.assert_allclose(mean, jnp.sum(want) / jnp.sum(m), **EXACT)


@pytest.mark.parametrize("top_k", [0, 1, 4, 12])
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_tad_custom_grad_equals_autodiff_of_reference(x64, top_k, tau):
    s, t, m = _data(dtype=jnp.float64)
    got = jax.grad(tad_divergence)(s, t, m, top_k=top_k, beta=3.0, temperature=tau)
    want = jax.grad(ref_tad)(s, t, m, top_k, 3.0, tau)
    np.testing.assert_allclose(got, want, **EXACT)


def test_tad_vjp_with_arbitrary_cotangent(x64):
    s, t, m = _data(dtype=jnp.float64)
    ct_bt = _logits(9, m.shape, jnp.float64)
    f = lambda s: tad_divergence(s, t, m, top_k=2, reduction="none")
    r = lambda s: ref_components(s, t, m, 2, 2.0)["loss"]
    (got,) = jax.vjp(f, s)[1](ct_bt)
    (want,) = jax.vjp(r, s)[1](ct_bt)
    np.testing.assert_allclose(got, want, **EXACT)


def test_tad_check_grads(x64):
    s, t, m = _data(dtype=jnp.float64)
    f = lambda s: tad_divergence(s, t, m, top_k=3, beta=2.0, temperature=1.3)
    jax.test_util.check_grads(f, (s,), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_teacher_gets_zero_cotangent():
    s, t, m = _data()
    for fn in (tad_divergence, kl_divergence, reverse_kl_divergence, js_divergence):
        g_t = jax.grad(fn, argnums=1)(s, t, m)
        chex.assert_trees_all_equal(g_t, jnp.zeros_like(t))


def test_components_and_kl_identity(x64):
    s, t, m = _data(dtype=jnp.float64)
    c = tad_components(s, t, m, top_k=4, beta=2.0, temperature=1.5)
    want = ref_components(s, t, m, 4, 2.0, 1.5)
    for key in ("kl1", "kl2", "alpha_t", "alpha_s"):
        np.testing.assert_allclose(c[key], jnp.where(m, want[key], 0.0), **EXACT, err_msg=key)
    np.testing.assert_allclose(c["beta_x"], jnp.broadcast_to(want["beta_x"][:, None], m.shape),
                               **EXACT)
    # The spec's identity: KL = D_KL1 + α_T·D_KL2, against an independent KL.
    kl = ref_kl_bt(s, t, 1.5) / 1.5**2
    np.testing.assert_allclose(c["kl1"] + c["alpha_t"] * c["kl2"], jnp.where(m, kl, 0.0), **EXACT)
    np.testing.assert_allclose(c["kl"], jnp.where(m, kl, 0.0), **EXACT)


def test_beta_x_one_gives_kl(x64):
    s, t, _ = _data(shape=(1, 6, 11), dtype=jnp.float64)
    m = jnp.ones((1, 6), bool)
    abar = float(jnp.mean(ref_components(s, t, m, 3, 1.0)["alpha_t"]))
    # β = ᾱ(X) makes β(X) = 1, so TAD reduces to KL: values and gradients.
    tad = lambda s: tad_divergence(s, t, m, top_k=3, beta=abar)
    np.testing.assert_allclose(tad(s), jnp.mean(ref_kl_bt(s, t)), **EXACT)
    np.testing.assert_allclose(tad_components(s, t, m, top_k=3, beta=abar)["beta_x"], [[1.0] * 6],
                               **EXACT)
    kl_grad = jax.grad(lambda s: jnp.mean(ref_kl_bt(s, t)))(s)
    np.testing.assert_allclose(jax.grad(tad)(s), kl_grad, **EXACT)


def test_shift_invariance(x64):
    s, t, m = _data(dtype=jnp.float64)
    shift_s = 100.0 * _logits(5, m.shape + (1,), jnp.float64)
    shift_t = -50.0 * _logits(6, m.shape + (1,), jnp.float64)
    f = lambda s, t: tad_divergence(s, t, m, top_k=3)
    np.testing.assert_allclose(f(s + shift_s, t + shift_t), f(s, t), rtol=1e-9)
    np.testing.assert_allclose(jax.grad(f)(s + shift_s, t + shift_t), jax.grad(f)(s, t),
                               rtol=1e-8, atol=1e-12)


def test_k_zero_is_beta_times_kl(x64):
    s, t, m = _data(dtype=jnp.float64)
    c = tad_components(s, t, m, top_k=0)
    kl = jnp.where(m, ref_kl_bt(s, t), 0.0)
    np.testing.assert_allclose(c["alpha_t"], m.astype(float), **EXACT)
    np.testing.assert_allclose(c["kl1"], 0.0, atol=1e-12)
    np.testing.assert_allclose(c["kl2"], kl, **EXACT)
    got = tad_divergence(s, t, m, top_k=0, beta=2.0, reduction="none")
    np.testing.assert_allclose(got, 2.0 * kl, **EXACT)


def test_k_vocab_minus_one_is_kl(x64):
    s, t, m = _data(dtype=jnp.float64)
    v = s.shape[-1]
    # One tail entry: both renormalised tails are the same point mass, so D_KL2 = 0.
    got = tad_divergence(s, t, m, top_k=v - 1, beta=5.0, reduction="none")
    np.testing.assert_allclose(got, jnp.where(m, ref_kl_bt(s, t), 0.0), **EXACT)
    g = jax.grad(tad_divergence)(s, t, m, top_k=v - 1, beta=5.0)
    want = jax.grad(lambda s: ref_mean(ref_kl_bt(s, t), m))(s)
    np.testing.assert_allclose(g, want, **EXACT)


def test_two_stage_top_k_is_lax_top_k():
    # V = 1024 takes the two-stage path; ties must go to the lowest index, as lax.top_k.
    from tad_jax.tad_core import top_k

    x = _logits(21, (3, 4, 1024))
    ties = jnp.round(_logits(22, (3, 4, 1024), scale=1.5))  # many equal values
    for arr in (x, ties, jnp.where(x > 2.0, -jnp.inf, x), jnp.zeros((2, 1024))):
        for k in (1, 11, 3):
            vals, idx = top_k(arr, k)
            want_vals, want_idx = jax.lax.top_k(arr, k)
            np.testing.assert_array_equal(vals, want_vals)
            np.testing.assert_array_equal(idx, want_idx)


@pytest.mark.parametrize("vocab", [1024, 1000, 777])
def test_blocked_head_and_maxima_are_exact(vocab):
    # The two-level search (blocks of 128/64/32, a shorter last block when V does not split):
    # head = lax.top_k's (ties to the lowest index, across block borders too), and the terms
    # from its maxima and the head's K values = token_terms' own two passes.
    a = _logits(23, (3, 4, vocab))
    ties = jnp.round(_logits(24, (3, 4, vocab), scale=1.5))
    pad = jnp.where(a > 1.5, -jnp.inf, ties)  # -inf entries in b (and b = a - a's padding)
    for b in (a + 0.5, ties, pad, jnp.zeros((3, 4, vocab)), jnp.full((3, 4, vocab), -jnp.inf)):
        for k in (1, 2, 5):
            assert core._head_block(vocab, k) is not None
            head, terms = core._blocked_terms(a, b, k, core._head_block(vocab, k))
            vals, idx = jax.lax.top_k(b, k)
            np.testing.assert_array_equal(head.idx_k, idx)
            np.testing.assert_array_equal(head.kth, vals[..., -1])
            want = core.token_terms(a, b, core.head_of(vals, idx))  # its own passes
            for g, w in zip(terms, want, strict=True):
                np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def test_tad_on_a_chunked_vocabulary(x64):
    # V = 1024 takes the two-stage top-K path (the other tests use small, prime-ish V).
    s, t, m = _data(shape=(2, 3, 1024), dtype=jnp.float64)
    f = lambda s: tad_divergence(s, t, m, top_k=7, beta=2.5)
    np.testing.assert_allclose(f(s), ref_tad(s, t, m, 7, 2.5), **EXACT)
    np.testing.assert_allclose(jax.grad(f)(s), jax.grad(ref_tad)(s, t, m, 7, 2.5), **EXACT)


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------


def test_masked_positions_contribute_nothing():
    s, t, m = _data()
    f = lambda s, t: tad_divergence(s, t, m, top_k=3)
    noise = jnp.where(m[..., None], 0.0, 30.0 * _logits(7, s.shape))
    # Changing anything at masked positions changes neither the loss nor β(X) (ᾱ(X)).
    np.testing.assert_allclose(f(s + noise, t - noise), f(s, t), **F32)
    beta_x = lambda t: tad_components(s, t, m, top_k=3)["beta_x"]
    np.testing.assert_allclose(beta_x(t - noise), beta_x(t), **F32)
    g = jax.grad(f)(s, t)
    assert np.all(np.asarray(g)[~np.asarray(m)] == 0.0)
    assert np.all(np.asarray(tad_divergence(s, t, m, reduction="none"))[~np.asarray(m)] == 0.0)


@pytest.mark.parametrize("fn", [tad_divergence, kl_divergence, reverse_kl_divergence,
                                js_divergence])
def test_all_inf_logits_at_masked_positions(fn):
    # Padded positions may hold anything, even all -inf logits: nothing may leak out of them.
    s, t, m = _data()
    s = jnp.where(m[..., None], s, -jnp.inf)
    t = jnp.where(m[..., None], t, -jnp.inf)
    loss, g = jax.value_and_grad(fn)(s, t, m)
    _finite(loss, g)
    assert np.all(np.asarray(g)[~np.asarray(m)] == 0.0)


@pytest.mark.parametrize("fill", [-jnp.inf, jnp.nan])
def test_causal_lm_loss_ignores_anything_at_masked_positions(x64, fill):
    # As for the divergences: the value and the gradient are those of the valid positions (0 at
    # masked ones, not NaN from an all -inf row's logsumexp; found by a reviewer).
    s, _, m = _data(dtype=jnp.float64)
    y = jax.random.randint(jax.random.PRNGKey(4), m.shape, 0, s.shape[-1])
    padded = jnp.where(m[..., None], s, fill)
    loss, g = jax.value_and_grad(causal_lm_loss)(padded, y, m)
    want_bt = -jnp.log(jnp.take_along_axis(jax.nn.softmax(s), y[..., None], -1)[..., 0])
    np.testing.assert_allclose(loss, ref_mean(want_bt, m), **EXACT)
    g_want = jax.grad(lambda s: ref_mean(-jnp.log(jnp.take_along_axis(
        jax.nn.softmax(s), y[..., None], -1)[..., 0]), m))(s)
    np.testing.assert_allclose(g, g_want, **EXACT)
    assert np.all(np.asarray(g)[~np.asarray(m)] == 0.0)


@pytest.mark.parametrize("divergence", ["tad", "kl", "rkl", "jsd"])
def test_distillation_loss_gradient_with_all_inf_masked_positions(divergence):
    s, t, m = _data()
    y = jax.random.randint(jax.random.PRNGKey(4), m.shape, 0, s.shape[-1])
    s = jnp.where(m[..., None], s, -jnp.inf)
    t = jnp.where(m[..., None], t, -jnp.inf)
    loss, g = jax.value_and_grad(lambda s: distillation_loss(s, t, y, m, divergence=divergence,
                                                             top_k=3)[0])(s)
    _finite(loss, g)
    assert np.all(np.asarray(g)[~np.asarray(m)] == 0.0)


@pytest.mark.parametrize("side", ["student", "teacher", "both"])
@pytest.mark.parametrize("name", ["tad", "kl", "rkl", "jsd"])
def test_empty_valid_position_gives_zero(x64, name, side):
    # A valid position whose logits are all -inf (after the student's padding leaves both
    # distributions) holds no distribution: it adds 0 and gets a 0 gradient, never NaN; for TAD
    # its α_T is 0 in ᾱ(X). (RKL and JSD with only the teacher empty are defined otherwise:
    # the student's mass sits where p_T = 0.)
    if side == "teacher" and name in ("rkl", "jsd"):
        pytest.skip("the student keeps a distribution: RKL = +inf, JSD > 0 (test above)")
    s, t, m = _data(dtype=jnp.float64)
    m = m.at[0, 1].set(True)
    empty = jnp.zeros_like(m).at[0, 1].set(True)
    ninf = jnp.where(empty[..., None], -jnp.inf, 0.0)
    s_in = s + ninf if side in ("student", "both") else s
    t_in = t + ninf if side in ("teacher", "both") else t
    fn, ref = {
        "tad": (lambda s, t, m: tad_divergence(s, t, m, top_k=3),
                lambda s: jnp.sum(ref_components(s, t, m, 3, 2.0, empty_bt=empty)["loss"])
                / jnp.sum(m)),
        "kl": (kl_divergence, lambda s: ref_mean(jnp.where(empty, 0.0, ref_kl_bt(s, t)), m)),
        "rkl": (reverse_kl_divergence,
                lambda s: ref_mean(jnp.where(empty, 0.0, ref_rkl_bt(s, t)), m)),
        "jsd": (js_divergence,
                lambda s: ref_mean(jnp.where(empty, 0.0, ref_jsd_bt(s, t, 0.5)), m)),
    }[name]
    loss, g = jax.value_and_grad(fn)(s_in, t_in, m)
    np.testing.assert_allclose(loss, ref(s), **EXACT)
    np.testing.assert_allclose(g, jnp.where(empty[..., None], 0.0, jax.grad(ref)(s)), **EXACT)


def test_beta_x_uses_valid_positions_only(x64):
    s, t, m = _data(dtype=jnp.float64)
    at = ref_components(s, t, m, 3, 2.0)["alpha_t"]
    want = 2.0 / (jnp.sum(jnp.where(m, at, 0.0), -1) / jnp.sum(m, -1))
    np.testing.assert_allclose(tad_components(s, t, m, top_k=3)["beta_x"],
                               jnp.broadcast_to(want[:, None], m.shape), **EXACT)


@pytest.mark.parametrize("fn", [tad_divergence, kl_divergence, reverse_kl_divergence,
                                js_divergence])
def test_all_masked_row_and_batch(fn):
    s, t, m = _data()
    m = m.at[0].set(False)
    loss, g = jax.value_and_grad(fn)(s, t, m)
    assert np.isfinite(loss) and np.all(np.isfinite(g))
    assert np.all(np.asarray(g[0]) == 0.0)
    none = jnp.zeros_like(m)
    loss, g = jax.value_and_grad(fn)(s, t, none)
    assert float(loss) == 0.0 and np.all(np.asarray(g) == 0.0)
    assert float(fn(s, t, none, reduction="sum")) == 0.0


# ---------------------------------------------------------------------------------------------
# Numerical extremes
# ---------------------------------------------------------------------------------------------


def _finite(loss, grad):
    assert np.all(np.isfinite(np.asarray(loss))), loss
    assert np.all(np.isfinite(np.asarray(grad, np.float32))), grad


def test_huge_logits_finite():
    s, t, m = _data()
    s = jnp.where(s > 0, 1e4, -1e4)
    t = jnp.where(t > 1, 1e4, -1e4)
    for fn in (tad_divergence, kl_divergence, reverse_kl_divergence, js_divergence):
        _finite(*jax.value_and_grad(fn)(s, t, m))


def test_negative_inf_vocab_padding_equals_unpadded():
    s, t, m = _data()
    pad = jnp.full(s.shape[:-1] + (5,), -jnp.inf)
    sp, tp = jnp.concatenate([s, pad], -1), jnp.concatenate([t, pad], -1)
    for fn in (tad_divergence, kl_divergence, reverse_kl_divergence, js_divergence):
        loss, g = jax.value_and_grad(fn)(sp, tp, m)
        _finite(loss, g)
        np.testing.assert_allclose(loss, fn(s, t, m), **F32)
        np.testing.assert_allclose(g[..., :-5], jax.grad(fn)(s, t, m), **F32)
        assert np.all(np.asarray(g[..., -5:]) == 0.0)


def test_tail_all_padding_alpha_zero():
    # K covers every real entry: the teacher tail is only -inf padding, α_T = α_S = 0.
    s, t, m = _data(shape=(2, 4, 6))
    pad = jnp.full(s.shape[:-1] + (3,), -jnp.inf)
    sp, tp = jnp.concatenate([s, pad], -1), jnp.concatenate([t, pad], -1)
    loss, g = jax.value_and_grad(tad_divergence)(sp, tp, m, top_k=6)
    _finite(loss, g)
    want = ref_mean(ref_kl_bt(s, t), m)
    np.testing.assert_allclose(loss, want, **F32)


def test_one_hot_teacher(x64):
    s, _, m = _data(dtype=jnp.float64)
    hot = jax.random.randint(jax.random.PRNGKey(3), m.shape, 0, s.shape[-1])
    t = jnp.where(jax.nn.one_hot(hot, s.shape[-1]) > 0, 0.0, -jnp.inf)
    loss, g = jax.value_and_grad(tad_divergence)(s, t, m, top_k=2)
    _finite(loss, g)
    c = tad_components(s, t, m, top_k=2)
    assert np.all(np.asarray(c["alpha_t"]) == 0.0)
    # α_T = 0: TAD is the cross-entropy on the hot token, and so is its gradient.
    ce = lambda s: causal_lm_loss(s, hot, m)
    np.testing.assert_allclose(loss, ce(s), **EXACT)
    np.testing.assert_allclose(g, jax.grad(ce)(s), **EXACT)
    # Finite (not -inf) one-hot: α_T underflows to 0 in float32.
    t32 = jnp.where(jax.nn.one_hot(hot, s.shape[-1]) > 0, 1e4, -1e4).astype(jnp.float32)
    _finite(*jax.value_and_grad(tad_divergence)(s.astype(jnp.float32), t32, m, top_k=2))


def test_tiny_student_tail_gradient_exact(x64):
    # The student's tail lies ~200 nats below its head: α_S underflows in float32 unless the
    # tail is normalised in log space. The gradient α_T·p̃_S − p_T on the tail must stay exact.
    s, t, m = _data(shape=(1, 3, 9))
    top = jax.lax.top_k(t, 2)[1]
    head = jnp.any(top[..., :, None] == jnp.arange(9), -2)
    s = jnp.where(head, s, s - 200.0)
    g32 = jax.grad(tad_divergence)(s, t, m, top_k=2)
    g64 = jax.grad(ref_tad)(s.astype(jnp.float64), t.astype(jnp.float64), m, 2, 2.0)
    np.testing.assert_allclose(g32, g64, rtol=1e-4, atol=1e-6)


def test_tiny_teacher_tail_gradient_exact(x64):
    # The other side of `token_grad`'s one exp: the teacher's tail ~200 nats below its head
    # (α_T/α_S ≈ e^-200), so p_S,i on the tail, not α_T·p̃_S,i, is the exponent taken; rows mix
    # both sides, and a third row sits near α_T = α_S.
    s, t, m = _data(shape=(1, 3, 9))
    top = jax.lax.top_k(t, 2)[1]
    head = jnp.any(top[..., :, None] == jnp.arange(9), -2)
    t = t.at[0, 0].set(jnp.where(head[0, 0], t[0, 0], t[0, 0] - 200.0))
    s = s.at[0, 1].set(jnp.where(head[0, 1], s[0, 1], s[0, 1] - 200.0))
    s = s.at[0, 2].set(t[0, 2] + 1e-3)
    g32 = jax.grad(tad_divergence)(s, t, m, top_k=2)
    g64 = jax.grad(ref_tad)(s.astype(jnp.float64), t.astype(jnp.float64), m, 2, 2.0)
    np.testing.assert_allclose(g32, g64, rtol=1e-4, atol=1e-6)


def test_bf16_close_to_f32():
    s, t, m = _data(shape=(2, 8, 64))
    sb, tb = s.astype(jnp.bfloat16), t.astype(jnp.bfloat16)
    for fn in (tad_divergence, kl_divergence):
        lb, gb = jax.value_and_grad(fn)(sb, tb, m)
        lf, gf = jax.value_and_grad(fn)(sb.astype(jnp.float32), tb.astype(jnp.float32), m)
        assert gb.dtype == jnp.bfloat16 and lb.dtype == jnp.float32
        _finite(lb, gb)
        # Same bf16 inputs: only the bf16 rounding of the returned gradient differs.
        np.testing.assert_allclose(lb, lf, rtol=1e-6)
        np.testing.assert_allclose(gb.astype(jnp.float32), gf, rtol=1e-2, atol=1e-4)
    # And bf16 inputs vs the float32 originals: within bf16 input rounding.
    np.testing.assert_allclose(tad_divergence(sb, tb, m), tad_divergence(s, t, m), rtol=2e-2)


def test_float16_matches_reference_with_vocab_padding(x64):
    # float16 cannot hold the internal ±1e30 head push / -inf clip: it must still give the
    # reference values (float64 of the same float16 inputs) and float16 gradients, padding or not.
    s, t, m = _data(shape=(2, 5, 13), dtype=jnp.float16)
    s64, t64 = s.astype(jnp.float64), t.astype(jnp.float64)
    pad = jnp.full(s.shape[:-1] + (3,), -jnp.inf, jnp.float16)
    sp, tp = jnp.concatenate([s, pad], -1), jnp.concatenate([t, pad], -1)
    refs = {tad_divergence: lambda a, b: ref_tad(a, b, m, 3, 2.0),
            kl_divergence: lambda a, b: ref_mean(ref_kl_bt(a, b), m)}
    for fn, ref in refs.items():
        kw = dict(top_k=3) if fn is tad_divergence else {}
        want, want_g = jax.value_and_grad(ref)(s64, t64)
        for a, b in ((s, t), (sp, tp)):
            loss, g = jax.value_and_grad(fn)(a, b, m, **kw)
            assert g.dtype == jnp.float16
            _finite(loss, g)
            np.testing.assert_allclose(loss, want, rtol=1e-5)
            np.testing.assert_allclose(g[..., :13].astype(jnp.float64), want_g, rtol=1e-2,
                                       atol=1e-5)
        comps = tad_components(sp, tp, m, top_k=3)
        assert all(np.all(np.isfinite(v)) for v in comps.values())


# ---------------------------------------------------------------------------------------------
# Transformations and sharding
# ---------------------------------------------------------------------------------------------


def test_jit_and_vmap():
    s, t, m = _data(shape=(3, 5, 13))
    f = lambda s, t, m: tad_divergence(s, t, m, top_k=3, reduction="none")
    want = f(s, t, m)
    np.testing.assert_allclose(jax.jit(f)(s, t, m), want, **F32)
    # Each [T, V] slice is one row, so vmapping over rows gives the batched result.
    np.testing.assert_allclose(jax.vmap(f)(s, t, m), want, **F32)
    gv = jax.vmap(jax.grad(lambda s, t, m: jnp.sum(f(s, t, m))))(s, t, m)
    np.testing.assert_allclose(gv, jax.grad(lambda s: jnp.sum(f(s, t, m)))(s), **F32)


def test_no_retracing():
    s, t, m = _data()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(s, t, m):
        return jax.value_and_grad(tad_divergence)(s, t, m, top_k=3)

    for i in range(3):
        step(s + i, t - i, m)


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
@pytest.mark.parametrize("mesh_shape,spec", [((8,), P("data")),
                                             ((4, 2), P("data", None, "vocab")),
                                             ((2, 4), P("data", "seq")),
                                             ((2, 2, 2), P("data", "seq", "vocab"))])
@pytest.mark.parametrize("vocab", [512, 40])  # the two-stage top-K, and lax.top_k (short V)
def test_sharded_equals_unsharded(mesh_shape, spec, axis_type, vocab):
    # Explicit shardings of the positions' axes once made the top-K's reshape a ShardingTypeError.
    names = tuple(a for a in spec if a is not None)
    mesh = jax.make_mesh(mesh_shape, names, axis_types=(axis_type,) * len(names))
    s, t, m = _data(shape=(8, 4, vocab))
    f = jax.jit(jax.value_and_grad(lambda s, t, m: tad_divergence(s, t, m, top_k=3)))
    want_l, want_g = f(s, t, m)
    sh = NamedSharding(mesh, spec)
    msh = NamedSharding(mesh, P(*spec[:2]))
    got_l, got_g = f(jax.device_put(s, sh), jax.device_put(t, sh), jax.device_put(m, msh))
    np.testing.assert_allclose(got_l, want_l, **F32)
    np.testing.assert_allclose(got_g, want_g, **F32)
    kl = jax.jit(kl_divergence)
    np.testing.assert_allclose(kl(jax.device_put(s, sh), jax.device_put(t, sh), m),
                               kl(s, t, m), **F32)
    # The target's log-probability along a sharded V (once a gather: a ShardingTypeError).
    y = jax.random.randint(jax.random.key(5), m.shape, 0, vocab)
    ce = jax.jit(jax.value_and_grad(causal_lm_loss))
    got_l, got_g = ce(jax.device_put(s, sh), jax.device_put(y, msh), jax.device_put(m, msh))
    want_l, want_g = ce(s, y, m)
    np.testing.assert_allclose(got_l, want_l, **F32)
    np.testing.assert_allclose(got_g, want_g, **F32)


# ---------------------------------------------------------------------------------------------
# Companion losses
# ---------------------------------------------------------------------------------------------


def ref_rkl_bt(s, t, tau=1.0):
    return ref_kl_bt(t, s, tau)


def ref_jsd_bt(s, t, w, tau=1.0):
    ps, pt = jax.nn.softmax(s / tau), jax.nn.softmax(t / tau)
    mix = w * pt + (1 - w) * ps
    return tau**2 * (w * jnp.sum(pt * jnp.log(pt / mix), -1)
                     + (1 - w) * jnp.sum(ps * jnp.log(ps / mix), -1))


@pytest.mark.parametrize("name", ["kl", "rkl", "jsd"])
def test_companion_divergences(x64, name):
    s, t, m = _data(dtype=jnp.float64)
    fn, ref = {
        "kl": (kl_divergence, ref_kl_bt),
        "rkl": (reverse_kl_divergence, ref_rkl_bt),
        "jsd": (lambda *a, **k: js_divergence(*a, weight=0.3, **k),
                lambda s, t, tau: ref_jsd_bt(s, t, 0.3, tau)),
    }[name]
    got = fn(s, t, m, temperature=1.7, reduction="none")
    np.testing.assert_allclose(got, jnp.where(m, ref(s, t, 1.7), 0.0), **EXACT)
    g = jax.grad(lambda s: fn(s, t, m, temperature=1.7))(s)
    want = jax.grad(lambda s: ref_mean(ref(s, t, 1.7), m))(s)
    np.testing.assert_allclose(g, want, **EXACT)
    np.testing.assert_allclose(fn(s, t, m, temperature=1.7, reduction="sum"),
                               jnp.sum(jnp.where(m, ref(s, t, 1.7), 0.0)), **EXACT)


def test_causal_lm_loss(x64):
    s, _, m = _data(dtype=jnp.float64)
    y = jax.random.randint(jax.random.PRNGKey(4), m.shape, 0, s.shape[-1])
    want_bt = -jnp.log(jnp.take_along_axis(jax.nn.softmax(s), y[..., None], -1)[..., 0])
    np.testing.assert_allclose(causal_lm_loss(s, y, m, "none"), jnp.where(m, want_bt, 0.0),
                               **EXACT)
    np.testing.assert_allclose(causal_lm_loss(s, y, m), ref_mean(want_bt, m), **EXACT)
    np.testing.assert_allclose(causal_lm_loss(s, y, None, "sum"), jnp.sum(want_bt), **EXACT)


def test_cosine_hidden_loss(x64):
    hs, ht, m = _data(shape=(2, 5, 7), dtype=jnp.float64)
    cos = jnp.sum(hs * ht, -1) / (jnp.linalg.norm(hs, axis=-1) * jnp.linalg.norm(ht, axis=-1))
    want = jnp.where(m, 1.0 - cos, 0.0)
    np.testing.assert_allclose(cosine_hidden_loss(hs, ht, m, "none"), want, rtol=1e-9)
    g = jax.grad(cosine_hidden_loss)(hs, ht, m)
    g_ref = jax.grad(lambda h: ref_mean(1.0 - jnp.sum(h * ht, -1) / (
        jnp.linalg.norm(h, axis=-1) * jnp.linalg.norm(ht, axis=-1)), m))(hs)
    np.testing.assert_allclose(g, g_ref, rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match="hidden sizes differ"):
        cosine_hidden_loss(hs, jnp.zeros((2, 5, 9)), m)


@pytest.mark.parametrize("divergence", ["tad", "kl", "rkl", "jsd"])
def test_distillation_loss_is_the_sum_of_its_parts(x64, divergence):
    s, t, m = _data(dtype=jnp.float64)
    y = jax.random.randint(jax.random.PRNGKey(4), m.shape, 0, s.shape[-1])
    hs, ht = _logits(11, (2, 5, 6), jnp.float64), _logits(12, (2, 5, 6), jnp.float64)
    total, parts = distillation_loss(s, t, y, m, divergence=divergence, top_k=2, beta=3.0,
                                     temperature=2.0, jsd_weight=0.4, cosine_weight=0.5,
                                     student_hidden=hs, teacher_hidden=ht)
    want_div = {
        "tad": lambda: ref_tad(s, t, m, 2, 3.0, 2.0),
        "kl": lambda: ref_mean(ref_kl_bt(s, t, 2.0), m),
        "rkl": lambda: ref_mean(ref_rkl_bt(s, t, 2.0), m),
        "jsd": lambda: ref_mean(ref_jsd_bt(s, t, 0.4, 2.0), m),
    }[divergence]()
    np.testing.assert_allclose(parts["div"], want_div, **EXACT)
    np.testing.assert_allclose(parts["clm"], causal_lm_loss(s, y, m), **EXACT)
    np.testing.assert_allclose(parts["cosine"], cosine_hidden_loss(hs, ht, m), **EXACT)
    np.testing.assert_allclose(total, parts["clm"] + want_div + 0.5 * parts["cosine"], **EXACT)
    total0, parts0 = distillation_loss(s, t, y, m, divergence=divergence, top_k=2)
    assert float(parts0["cosine"]) == 0.0


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

S = jnp.zeros((2, 3, 16))  # V = 16 > the default top_k


@pytest.mark.parametrize("call,match", [
    (lambda: tad_divergence(S, jnp.zeros((2, 3, 17))), "Slice the teacher"),
    (lambda: tad_divergence(S, jnp.zeros((2, 4, 16))), "time axis 1"),
    (lambda: tad_divergence(S, jnp.zeros((3, 3, 16))), "batch axis 0"),
    (lambda: tad_divergence(S, jnp.zeros((3, 16))), "different ranks"),
    (lambda: tad_divergence(jnp.zeros(8), jnp.zeros(8)), "at least 2-D"),
    (lambda: tad_divergence(S, S, jnp.ones((2, 4))), "mask shape"),
    (lambda: tad_divergence(S, S, top_k=-1), "top_k"),
    (lambda: tad_divergence(S, S, top_k=16), "top_k"),
    (lambda: tad_divergence(S, S, top_k=2.0), "top_k"),
    (lambda: tad_divergence(S, S, beta=0.0), "beta"),
    (lambda: tad_divergence(S, S, temperature=-1.0), "temperature"),
    (lambda: tad_divergence(S, S, eps_alpha=0.0), "eps_alpha"),
    (lambda: tad_divergence(S, S, reduction="avg"), "reduction"),
    (lambda: tad_divergence(S.astype(jnp.int32), S), "floating point"),
    (lambda: tad_divergence(S, S.astype(jnp.int32)), "floating point"),
    (lambda: tad_components(S, S, top_k=17), "top_k"),
    (lambda: kl_divergence(S, S, temperature=0.0), "temperature"),
    (lambda: kl_divergence(S, S, reduction="max"), "reduction"),
    (lambda: reverse_kl_divergence(S, jnp.zeros((2, 3, 15))), "Slice the teacher"),
    (lambda: js_divergence(S, S, weight=1.0), "weight"),
    (lambda: causal_lm_loss(S, jnp.zeros((2, 4), jnp.int32)), "targets shape"),
    (lambda: causal_lm_loss(S, jnp.zeros((2, 3))), "integer token ids"),
    (lambda: distillation_loss(S, S, jnp.zeros((2, 3), jnp.int32), None, divergence="mse"),
     "divergence"),
    (lambda: distillation_loss(S, S, jnp.zeros((2, 3), jnp.int32), None, cosine_weight=1.0),
     "student_hidden"),
    (lambda: jax.jit(lambda b: tad_divergence(S, S, beta=b))(2.0), "static Python number"),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------
# Padded vocabularies, infinities, the custom_vjp, β(X) per segment (issue 11)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [tad_divergence, kl_divergence, reverse_kl_divergence,
                                js_divergence])
def test_student_padded_vocabulary_equals_sliced(fn):
    # The student is -inf on padded columns, the teacher anything (here large): dropped from both.
    s, t, m = _data()
    pad = 4
    sp = jnp.concatenate([s, jnp.full(s.shape[:-1] + (pad,), -jnp.inf)], -1)
    tp = jnp.concatenate([t, 8.0 + _logits(9, t.shape[:-1] + (pad,))], -1)
    loss, g = jax.value_and_grad(fn)(sp, tp, m)
    _finite(loss, g)
    np.testing.assert_allclose(loss, fn(s, t, m), **F32)
    np.testing.assert_allclose(g[..., :-pad], jax.grad(fn)(s, t, m), **F32)
    assert np.all(np.asarray(g[..., -pad:]) == 0.0)


def test_reverse_kl_teacher_inf_has_finite_gradient(x64):
    # The teacher is -inf where the student has mass: RKL = +inf, the gradient is defined (that
    # of a teacher with the smallest normal probability there), finite, never NaN.
    s, t, m = _data(dtype=jnp.float64)
    t = t.at[..., 3].set(-jnp.inf)
    loss, g = jax.value_and_grad(reverse_kl_divergence)(s, t, m)
    assert np.isposinf(float(loss))
    assert np.all(np.isfinite(np.asarray(g)))
    tiny = jnp.finfo(jnp.float64).tiny
    lpt = jax.nn.log_softmax(t)
    lpt = jnp.where(jnp.isneginf(lpt), jnp.log(tiny), lpt)

    def ref(s):
        lps = jax.nn.log_softmax(s)
        return ref_mean(jnp.sum(jnp.exp(lps) * (lps - lpt), -1), m)

    np.testing.assert_allclose(g, jax.grad(ref)(s), **EXACT)
    assert np.all(np.asarray(g)[..., 3][np.asarray(m)] > 0)  # pushes the student off the entry


def test_grad_uses_the_custom_vjp():
    s, t, m = _data()
    for fn in (tad_divergence, kl_divergence):
        assert "custom_vjp_call" in str(jax.make_jaxpr(fn)(s, t, m)), fn.__name__
        assert "name=_tad_eq6_grad" in str(jax.make_jaxpr(jax.grad(fn))(s, t, m)), fn.__name__


def test_segment_scope_beta_x(x64):
    s, t, _ = _data(shape=(2, 6, 11), dtype=jnp.float64)
    m = jnp.array([[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 0, 0]], bool)
    seg = jnp.array([[1, 1, 1, 2, 2, 3], [5, 5, 7, 7, 0, 0]])
    at = ref_components(s, t, m, 3, 2.0)["alpha_t"]
    want = np.zeros(m.shape)
    for r in range(2):
        for sid in np.unique(seg[r]):
            here, valid = np.asarray(seg[r] == sid), np.asarray((seg[r] == sid) & m[r])
            mean = float(np.asarray(at[r])[valid].mean()) if valid.any() else 0.0
            want[r][here] = 2.0 / max(mean, 1e-6)
    got = tad_components(s, t, m, top_k=3, beta_scope="segment", segment_ids=seg)["beta_x"]
    np.testing.assert_allclose(got, want, **EXACT)
    loss = tad_divergence(s, t, m, top_k=3, beta_scope="segment", segment_ids=seg,
                          reduction="none")
    c = ref_components(s, t, m, 3, 2.0)
    np.testing.assert_allclose(loss, jnp.where(m, c["kl1"] + want * c["alpha_t"] * c["kl2"], 0),
                               **EXACT)
    with pytest.raises(ValueError, match="segment_ids"):
        tad_divergence(s, t, m, beta_scope="segment")
    with pytest.raises(ValueError, match="beta_scope"):
        tad_divergence(s, t, m, beta_scope="doc")


@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_student_padding_false_equals_default_on_finite_students(tau):
    # student_padding=False skips the merge before top_k (the training step's call): on finite
    # student logits it must give the same values and gradients, ties at the K-th place included.
    s, t, m = _data(shape=(2, 6, 40))
    ties = jnp.round(t)  # many equal teacher values: the K-th place is decided by the index
    for teacher in (t, ties):
        for fn, kw in ((tad_divergence, dict(top_k=5)), (kl_divergence, {})):
            want, want_g = jax.value_and_grad(fn)(s, teacher, m, temperature=tau, **kw)
            got, got_g = jax.value_and_grad(fn)(s, teacher, m, temperature=tau,
                                                student_padding=False, **kw)
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(got_g, want_g)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_pair_head_is_the_head_of_the_tempered_teacher(dtype, tau):
    # top_k reads the teacher in its own dtype when that ranks as t/τ (τ = 1 or narrower than
    # float32): same indices, K-th value and last index as top_k of the tempered, merged logits.
    s = _logits(3, (3, 7, 300)).astype(dtype)
    t = jnp.round(4.0 * _logits(4, (3, 7, 300))).astype(dtype) / 4  # ties at the K-th place
    s = s.at[..., 5:9].set(-jnp.inf)  # student padding: those entries leave the teacher too
    a, b = core.tempered_pair(s, t, tau)
    for k in (1, 6):
        got, terms = core.pair_terms(s, t, k, tau)
        want = core.teacher_head(b, k)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)
        assert not np.any(np.isin(np.asarray(got.idx_k), [5, 6, 7, 8]))
        for g, w in zip(terms, core.token_terms(a, b, want), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def test_tad_offset_invariant_in_float32(x64):
    # A common offset of the logits (|logits| ~ 1e4) must not come back through differences of
    # absolute logsumexps: the float32 value stays at the float64 reference of the unshifted case.
    s, t, m = _data(shape=(2, 5, 50))
    want = ref_tad(s.astype(jnp.float64), t.astype(jnp.float64), m, 3, 2.0)
    for off in (1e3, 1e4):
        got = tad_divergence((s + off).astype(jnp.float32), (t + off).astype(jnp.float32), m,
                             top_k=3)
        np.testing.assert_allclose(got, want, rtol=2e-3)


@pytest.mark.parametrize("vocab", [50, 2000])  # lax.top_k, and the two-level head (K = 3)
def test_tad_grad_offset_invariant_in_float32(x64, vocab):
    # The gradient at |logits| ~ 1e4 in float32: every exponent relative to the row maxima, so
    # it equals the float64 gradient of the same (rounded) logits to float32 precision; with
    # absolute logsumexps (ulp 1e-3 at 1e4) p_S and p_T were off by ~1e-3 relative.
    s, t, m = _data(shape=(2, 5, vocab))
    for off in (1e3, 1e4):
        s32, t32 = (s + off).astype(jnp.float32), (t + off).astype(jnp.float32)
        got = jax.grad(tad_divergence)(s32, t32, m, top_k=3)
        want = jax.grad(ref_tad)(s32.astype(jnp.float64), t32.astype(jnp.float64), m, 3, 2.0)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.max(abs(want))))


def test_pair_head_tempered_flush_to_zero():
    # bf16 values that the division by τ flushes to 0 become ties in b: the head must be the
    # tempered teacher's (one member for K = 1), not the raw ranking's.
    t = jnp.array([[1.5e-38, 2.0e-38, -5.0, -6.0]], jnp.float32).astype(jnp.bfloat16)
    s = jnp.array([[0.5, 1.0, 2.0, 0.0]], jnp.float32)
    for tau in (1.0, 2.0):
        got = core.pair_terms(s, t, 1, tau)[0]
        want = core.teacher_head(core.tempered_pair(s, t, tau)[1], 1)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)
