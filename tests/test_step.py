"""Tests of tad_jax.step: one train step against a hand-written reference (clipped AdamW on the
gradient of the plain loss), gradient accumulation, the fused loss, the eval step against numpy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_setup import models_and_batch, reference_loss, tiny_config

from tad_jax.step import finalize_eval, init_state, make_eval_step, make_optimizer, make_train_step

# Adam's eps well above the smallest gradients keeps g / (|g| + eps) well conditioned, so float32
# summation-order noise in tiny gradients cannot dominate the comparisons of updates.
STEP_CHANGES = {"opt.warmup_steps": 0, "opt.clip_norm": 0.05, "opt.eps": 1e-3}


@pytest.fixture(scope="module")
def one_step():
    """Models, a batch, and one step from fresh params with 1 and with 4 micro-batches."""
    cfg, models, batch = models_and_batch(tiny_config(**STEP_CHANGES))
    teacher_model, teacher_params, student_model, params, mask, vocab = models
    outs = {}
    for accum in (1, 4):
        cfg.opt.grad_accum_steps = accum
        tx, schedule = make_optimizer(cfg, 30)
        step = jax.jit(make_train_step(cfg, student_model, teacher_model, mask, tx,
                                       schedule, vocab))
        outs[accum] = step(init_state(params, mask, tx), batch, teacher_params)
    cfg.opt.grad_accum_steps = 1
    return cfg, models, batch, outs


def test_one_step_equals_clipped_adamw_on_the_reference_gradient(one_step):
    cfg, models, batch, outs = one_step
    teacher_model, teacher_params, student_model, params, mask, vocab = models
    o = cfg.opt
    _, schedule = make_optimizer(cfg, 30)
    new_state, metrics = outs[1]

    ref = jax.jit(jax.value_and_grad(
        lambda p: reference_loss(p, teacher_model, teacher_params, student_model, batch, vocab)))
    loss, g = ref(params)
    g = jax.tree.map(lambda x, m: x if m else jnp.zeros_like(x), g, mask)
    norm = float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(g))))
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-5)
    assert norm > o.clip_norm  # the clip is exercised
    lr = float(schedule(0))
    assert lr == pytest.approx(o.lr)

    def adam_first_step(p, gr, m):
        if not m:
            return p  # frozen: untouched
        gr = gr * o.clip_norm / norm
        # First Adam step: m_hat = g, v_hat = g^2.
        upd = gr / (np.abs(gr) + o.eps) + (o.weight_decay * p if p.ndim >= 2 else 0.0)
        return p - lr * upd

    expected = jax.tree.map(adam_first_step, jax.device_get(params), jax.device_get(g), mask)
    got = jax.device_get(new_state["params"])
    for (path, e), a in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(got),
                            strict=True):
        np.testing.assert_allclose(a, e, atol=1e-6, rtol=1e-5, err_msg=str(path))
    assert int(new_state["step"]) == 1


def test_weight_decay_skips_norms_and_biases_whatever_their_rank():
    """config.opt.weight_decay: matrices only, not norms or biases, also when they are 2-D
    (per-head q/k/v biases [heads, head_dim]; norms stacked [layers, d] by scan_layers)."""
    cfg = tiny_config(**{"opt.warmup_steps": 0, "opt.clip_norm": 0.0})
    tx, schedule = make_optimizer(cfg, 30)
    shapes = {"embed": {"embedding": (16, 4)},
              "layers": {"attn_norm": {"scale": (2, 4), "bias": (2, 4)},
                         "attn": {"q": {"kernel": (2, 4, 2, 2), "bias": (2, 2, 2)}},
                         "mlp": {"up": {"kernel": (2, 4, 8)}}},
              "final_norm": {"scale": (4,)},
              "lm_head": {"kernel": (4, 16), "bias": (16,)}}
    params = jax.tree.map(lambda s: jnp.ones(s, jnp.float32), shapes,
                          is_leaf=lambda x: isinstance(x, tuple))
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    new = jax.device_get(jax.tree.map(jnp.add, params, updates))
    decayed = 1.0 - float(schedule(0)) * cfg.opt.weight_decay
    for path, leaf in jax.tree_util.tree_leaves_with_path(new):
        name = path[-1].key
        want = decayed if name in ("kernel", "embedding") else 1.0
        np.testing.assert_allclose(leaf, want, rtol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_frozen_params_have_no_optimizer_state(one_step):
    cfg, models, _, _ = one_step
    _, _, _, params, mask, _ = models
    assert not all(jax.tree.leaves(mask)), "the tiny student should freeze its embeddings"
    tx, _ = make_optimizer(cfg, 30)
    state = init_state(params, mask, tx)
    n_train = sum(x.size for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask),
                                         strict=True) if m)
    moments = sum(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0)
    assert moments == 2 * n_train  # Adam's mu and nu, for the trainable params only


def test_gradient_accumulation_equals_the_full_batch(one_step):
    (s1, m1), (s4, m4) = one_step[3][1], one_step[3][4]
    for k in ("loss", "clm_loss", "div_loss", "grad_norm"):
        np.testing.assert_allclose(float(m4[k]), float(m1[k]), rtol=1e-5, err_msg=k)
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s4["params"]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("head_trains", [False, True])
def test_fused_loss_step_equals_the_logits_step(one_step, head_trains):
    """Frozen head (the default: the fused loss skips the head gradient) and a trained head."""
    cfg, models, batch, _ = one_step
    teacher_model, teacher_params, student_model, params, mask, vocab = models
    if head_trains:
        mask = jax.tree.map(lambda _: True, mask)
    outs = []
    for fused in (False, True):
        cfg.loss.fused, cfg.loss.cosine_weight, cfg.loss.chunk_size = fused, 0.5, 64
        tx, schedule = make_optimizer(cfg, 30)
        step = jax.jit(make_train_step(cfg, student_model, teacher_model, mask, tx,
                                       schedule, vocab))
        outs.append(step(init_state(params, mask, tx), batch, teacher_params))
    cfg.loss.fused, cfg.loss.cosine_weight = False, 0.0
    (s0, m0), (s1, m1) = outs
    assert float(m0["cosine_loss"]) > 0
    for k in ("loss", "clm_loss", "div_loss", "cosine_loss", "grad_norm"):
        np.testing.assert_allclose(float(m1[k]), float(m0[k]), rtol=1e-5, err_msg=k)
    for a, b in zip(jax.tree.leaves(s0["params"]), jax.tree.leaves(s1["params"]), strict=True):
        np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-5)


def test_eval_step_matches_numpy(one_step):
    _, models, batch, _ = one_step
    teacher_model, teacher_params, student_model, params, _, vocab = models
    sums = jax.jit(make_eval_step(student_model, teacher_model, vocab))(
        params, teacher_params, batch)
    kw = dict(segment_ids=batch["segment_ids"], positions=batch["positions"])
    t = np.asarray(teacher_model.apply({"params": teacher_params}, batch["input_ids"], **kw)
                   .logits, np.float64)
    s = np.asarray(student_model.apply({"params": params}, batch["input_ids"], **kw).logits,
                   np.float64)
    m = np.asarray(batch["loss_mask"], np.float64)
    lt = t - np.log(np.exp(t - t.max(-1, keepdims=True)).sum(-1, keepdims=True)) - t.max(-1,
                                                                                       keepdims=True)
    ls = s - np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True)) - s.max(-1,
                                                                                       keepdims=True)
    kl = (np.exp(lt) * (lt - ls)).sum(-1)
    ce = -np.take_along_axis(ls, np.asarray(batch["targets"])[..., None], -1)[..., 0]
    agree = (s.argmax(-1) == t.argmax(-1)).astype(np.float64)
    out = finalize_eval(jax.device_get(sums))
    np.testing.assert_allclose(out["eval_kl"], (kl * m).sum() / m.sum(), rtol=1e-4)
    np.testing.assert_allclose(out["eval_ce"], (ce * m).sum() / m.sum(), rtol=1e-5)
    np.testing.assert_allclose(out["eval_ppl"], np.exp((ce * m).sum() / m.sum()), rtol=1e-4)
    assert out["eval_top1_agreement"] == pytest.approx((agree * m).sum() / m.sum(), abs=1e-7)
    assert out["eval_tokens"] == m.sum()


@pytest.mark.parametrize("chunk_size", [40, 1024])  # 5 positions of the 8 rows (padded), all
def test_chunked_eval_step_equals_the_whole_logits_one(one_step, chunk_size):
    _, models, batch, _ = one_step
    teacher_model, teacher_params, student_model, params, _, vocab = models
    whole = jax.jit(make_eval_step(student_model, teacher_model, vocab))(
        params, teacher_params, batch)
    chunked = jax.jit(make_eval_step(student_model, teacher_model, vocab,
                                     chunk_size=chunk_size))(params, teacher_params, batch)
    assert whole.keys() == chunked.keys()
    for k in whole:
        np.testing.assert_allclose(chunked[k], whole[k], rtol=2e-5, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("lm_head_bias", [False, True])
def test_unfused_loss_drops_padding_of_a_head_with_bias(lm_head_bias):
    # A student head with a bias may carry -inf padding columns (as the fused loss allows): the
    # unfused step loss must then drop them from both sides (finite, = the sliced loss). Without
    # a bias the logits are finite and the merge is skipped (student_padding=False): same value.
    from types import SimpleNamespace

    from tad_jax import losses
    from tad_jax.config import base_config
    from tad_jax.step import _unfused_loss

    lo = base_config().loss
    lo.cosine_weight = 0.0
    key_s, key_t = jax.random.split(jax.random.key(0))
    zs = jax.random.normal(key_s, (2, 6, 30))
    zt = 3.0 * jax.random.normal(key_t, (2, 6, 30))
    mb = {"targets": jnp.zeros((2, 6), jnp.int32), "loss_mask": jnp.ones((2, 6))}
    fn = _unfused_loss(lo, SimpleNamespace(lm_head_bias=lm_head_bias), None, 30, True)
    out = lambda z: SimpleNamespace(logits=z, hidden_states=None)
    sliced, _ = losses.distillation_loss(zs[..., :28], zt[..., :28], mb["targets"],
                                         mb["loss_mask"], top_k=lo.top_k, beta=lo.beta,
                                         reduction="sum")
    padded = zs.at[..., 28:].set(-jnp.inf) if lm_head_bias else zs
    total, _ = fn(None, out(padded), None, out(zt), mb)
    if lm_head_bias:
        np.testing.assert_allclose(total, sliced, rtol=1e-5)
    else:
        want, _ = losses.distillation_loss(zs, zt, mb["targets"], mb["loss_mask"],
                                           top_k=lo.top_k, beta=lo.beta, reduction="sum")
        np.testing.assert_allclose(total, want, rtol=1e-6)
