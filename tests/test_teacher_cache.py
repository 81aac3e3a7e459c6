"""Tests of tad_jax.teacher_cache: the cached TAD / KL against the online losses, the format,
the writer (resume), the reader (alignment, shuffling, resume, refusals) and a cached train step.

References: `tad_jax.tad_divergence` / `kl_divergence` on the teacher's full logits (the online
loss), float64 numpy for the teacher's statistics. Statistical tests: a mean over N independent
cache draws is compared with the exact value by z = (mean − exact) / (std / √N); under a correct
(unbiased) estimator z is ≈ N(0, 1) (N ≥ 2,000: the CLT holds to well under 1% here), so |z| > 3
is a false alarm with probability 0.27% per statistic. Each test checks a handful of statistics
(the loss, two fixed random projections of the gradient, listed per test), with fixed seeds, so
the suite's outcome is deterministic; a fresh seed would fail a correct implementation with
probability ≈ 0.27% × (statistics checked) ≈ 1-2% over the whole file.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_setup import tiny, tiny_config

from tad_jax import kl_divergence, tad_components, tad_divergence
from tad_jax.teacher_cache import format as fmt
from tad_jax.teacher_cache import (
    kl_divergence_cached,
    read_top_k,
    tad_divergence_cached,
    teacher_stats,
)
from tad_jax.teacher_cache import loss as cl
from tad_jax.teacher_cache import reader as rd
from tad_jax.teacher_cache import writer as wr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXACT = dict(rtol=1e-10, atol=1e-12)  # float64
DRAWS = 2000
Z_MAX = 3.0


def _data(shape=(2, 4, 24), seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    s = (2.0 * jax.random.normal(ks[0], shape)).astype(dtype)
    t = (3.0 * jax.random.normal(ks[1], shape)).astype(dtype)
    mask = (jax.random.uniform(ks[2], shape[:-1]) < 0.8).at[0, 0].set(True)
    return s, t, mask


def _exact_targets(teacher_btv, top_k, tau=1.0) -> cl.TailTargets:
    """The cache's targets with the *whole* tail as targets of weight p_T (no sampling): the
    cached loss must then equal the online loss exactly. float64 numpy."""
    t = np.asarray(teacher_btv, np.float64) / tau
    lp = t - np.log(np.sum(np.exp(t - t.max(-1, keepdims=True)), -1, keepdims=True)) \
        - t.max(-1, keepdims=True)
    order = np.argsort(-lp, axis=-1, kind="stable")
    head, tail = order[..., :top_k], order[..., top_k:]
    tail_lp = np.take_along_axis(lp, tail, -1)
    alpha = np.exp(tail_lp).sum(-1)
    return cl.TailTargets(
        head_ids=jnp.asarray(head, jnp.int32),
        head_logp=jnp.asarray(np.take_along_axis(lp, head, -1)),
        log_alpha=jnp.asarray(np.log(alpha)),
        tail_plogp=jnp.asarray((np.exp(tail_lp) * tail_lp).sum(-1)),
        tail_ids=jnp.asarray(tail, jnp.int32), tail_mass=jnp.asarray(np.exp(tail_lp)))


def _per_position(s, targets, mask, beta=2.0, tau=1.0, eps=1e-6):
    mask = jnp.asarray(mask, jnp.float64)
    bx = cl.beta_x(targets.log_alpha, mask, beta, eps)
    return cl._cached_per_position(s, targets, bx, mask, tau)


# ---------------------------------------------------------------------------------------------
# Exact parts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k, tau", [(0, 1.0), (3, 1.0), (6, 2.0)])
def test_exact_parts_equal_the_online_loss(x64, top_k, tau):
    """With the whole tail as weighted targets the cached loss IS the online loss: so D_KL1, the
    bucket, β(X) and the entropy constant are exact (to float64 rounding, far below 1e-6)."""
    s, t, mask = _data(dtype=jnp.float64)
    targets = _exact_targets(t, top_k, tau)
    got = _per_position(s, targets, mask, tau=tau)
    want = tad_divergence(s, t, mask, top_k=top_k, beta=2.0, temperature=tau, reduction="none")
    np.testing.assert_allclose(got, want, **EXACT)
    g_got = jax.grad(lambda s: jnp.sum(_per_position(s, targets, mask, tau=tau)))(s)
    g_want = jax.grad(lambda s: tad_divergence(s, t, mask, top_k=top_k, temperature=tau,
                                               reduction="sum"))(s)
    np.testing.assert_allclose(g_got, g_want, **EXACT)
    # The pieces one by one, against tad_components (not scaled by τ²).
    comp = tad_components(s, t, mask, top_k=top_k, beta=2.0, temperature=tau)
    sc = s / tau
    lse_s, lse_tail_s = cl.student_log_normalisers(sc, targets.head_ids)
    kl1 = cl.head_term(sc, lse_s, targets) + cl.bucket_term(targets.log_alpha, lse_tail_s - lse_s)
    np.testing.assert_allclose(jnp.where(mask, kl1, 0), comp["kl1"], **EXACT)
    np.testing.assert_allclose(cl.beta_x(targets.log_alpha, mask, 2.0, 1e-6), comp["beta_x"],
                               **EXACT)
    alpha_kl2 = cl.tail_constant(targets) - cl.tail_cross(sc, lse_tail_s, targets)
    np.testing.assert_allclose(jnp.where(mask, alpha_kl2, 0), comp["alpha_t"] * comp["kl2"],
                               **EXACT)


def test_segment_scope_equals_the_online_loss(x64):
    """beta_scope="segment" (β(X) per document of a packed row; a reviewer found the cache
    ignoring it): with the whole tail as targets, value and gradient are tad_divergence's."""
    s, t, mask = _data(dtype=jnp.float64)
    seg = jnp.array([[1, 1, 2, 2], [3, 3, 3, 4]], jnp.int32)
    targets = _exact_targets(t, 3)
    kw = dict(beta_scope="segment", segment_ids=seg)

    def cached(s):
        bx = cl.beta_x(targets.log_alpha, jnp.asarray(mask, jnp.float64), 2.0, 1e-6, **kw)
        return jnp.sum(cl._cached_per_position(s, targets, bx, jnp.asarray(mask, jnp.float64),
                                               1.0))

    online = lambda s: tad_divergence(s, t, mask, top_k=3, reduction="sum", **kw)
    np.testing.assert_allclose(cached(s), online(s), **EXACT)
    np.testing.assert_allclose(jax.grad(cached)(s), jax.grad(online)(s), **EXACT)
    row = tad_divergence(s, t, mask, top_k=3, reduction="sum")
    assert abs(float(online(s)) - float(row)) > 1e-3  # the test tells the scopes apart
    stats = teacher_stats(t, jax.random.PRNGKey(0), k_max=5, num_samples=3)
    with pytest.raises(ValueError, match="segment_ids"):
        tad_divergence_cached(s, stats, mask, top_k=3, beta_scope="segment")


def test_cached_distillation_loss_reads_beta_scope(x64):
    from types import SimpleNamespace

    s, t, mask = _data(dtype=jnp.float64)
    seg = jnp.array([[1, 1, 2, 2], [3, 3, 3, 4]], jnp.int32)
    stats = teacher_stats(t, jax.random.PRNGKey(0), k_max=5, num_samples=3)
    batch = {**dict(zip(rd.CACHE_KEYS, stats, strict=True)), "loss_mask": mask,
             "targets": jnp.zeros(mask.shape, jnp.int32), "segment_ids": seg}
    loss_cfg = tiny_config().loss
    loss_cfg.top_k, loss_cfg.fused = 3, False
    for scope in ("row", "segment"):
        loss_cfg.beta_scope = scope
        _, parts = cl.cached_distillation_loss(SimpleNamespace(logits=s), batch, loss_cfg, None,
                                               None, s.shape[-1])
        want = tad_divergence_cached(s, stats, mask, top_k=3, beta=loss_cfg.beta,
                                     reduction="sum", beta_scope=scope, segment_ids=seg)
        np.testing.assert_allclose(parts["div"], want, **EXACT)


def test_stats_are_the_teachers(x64):
    """teacher_stats: top-K ids and log-probs, log α_T and H̃ against float64 numpy."""
    _, t, _ = _data(dtype=jnp.float64)
    st = teacher_stats(t, jax.random.PRNGKey(0), k_max=5, num_samples=3, temperature=1.5)
    ref = _exact_targets(t, 5, 1.5)
    np.testing.assert_array_equal(st.head_ids, ref.head_ids)
    np.testing.assert_allclose(st.head_logp, ref.head_logp, **EXACT)
    np.testing.assert_allclose(st.log_alpha, ref.log_alpha, **EXACT)
    alpha = np.exp(ref.log_alpha)
    entropy = -(ref.tail_plogp / alpha - ref.log_alpha)  # H̃ = −Σ p̃ log p̃
    np.testing.assert_allclose(st.tail_entropy, entropy, **EXACT)
    in_head = (np.asarray(st.sample_ids)[..., :, None] == np.asarray(st.head_ids)[..., None, :])
    assert not in_head.any(), "a tail draw landed on a head id"


def test_smaller_k_read_equals_a_cache_written_with_k(x64):
    """A K_max = 7 cache read at K = 3: head, α_T(K) and Σ_{K-tail} p log p equal a K = 3 cache's
    (float64), and its targets weigh α_T(K) in total: exact head entries K..K_max−1 plus the
    draws, reweighted by the K_max tail's mass."""
    _, t, _ = _data(dtype=jnp.float64)
    key = jax.random.PRNGKey(1)
    big = read_top_k(teacher_stats(t, key, k_max=7, num_samples=4), 3)
    small = read_top_k(teacher_stats(t, key, k_max=3, num_samples=4), 3)
    for field in ("head_ids", "head_logp", "log_alpha", "tail_plogp"):
        np.testing.assert_allclose(getattr(big, field), getattr(small, field), **EXACT)
    np.testing.assert_allclose(big.tail_mass.sum(-1), np.exp(big.log_alpha), **EXACT)
    assert big.tail_ids.shape[-1] == 4 + 4 and small.tail_ids.shape[-1] == 4


def test_custom_gradient_is_the_gradient_of_the_estimate(x64):
    """The custom_vjp's gradient equals autodiff of a plain-jnp version of the same estimate."""
    s, t, mask = _data(dtype=jnp.float64)
    stats = teacher_stats(t, jax.random.PRNGKey(2), k_max=6, num_samples=5)
    tg = read_top_k(stats, 4)

    def plain(s):
        lp = jax.nn.log_softmax(s)
        tail_s = jnp.where(jax.nn.one_hot(tg.head_ids, s.shape[-1]).sum(-2) > 0, -jnp.inf, s)
        lpt = tail_s - jax.scipy.special.logsumexp(tail_s, -1, keepdims=True)
        head = jnp.sum(jnp.exp(tg.head_logp) * (tg.head_logp - jnp.take_along_axis(
            lp, tg.head_ids, -1)), -1)
        alpha = jnp.exp(tg.log_alpha)
        log_alpha_s = jax.scipy.special.logsumexp(tail_s, -1) - jax.scipy.special.logsumexp(s, -1)
        cross = jnp.sum(tg.tail_mass * jnp.take_along_axis(lpt, tg.tail_ids, -1), -1)
        bx = cl.beta_x(tg.log_alpha, mask, 2.0, 1e-6)
        loss = head + alpha * (tg.log_alpha - log_alpha_s) + bx * (
            tg.tail_plogp - alpha * tg.log_alpha - cross)
        return jnp.sum(jnp.where(mask, loss, 0.0)) / jnp.sum(mask)

    cached = lambda s: tad_divergence_cached(s, stats, mask, top_k=4, beta=2.0)
    np.testing.assert_allclose(cached(s), plain(s), **EXACT)
    np.testing.assert_allclose(jax.grad(cached)(s), jax.grad(plain)(s), **EXACT)


# ---------------------------------------------------------------------------------------------
# Unbiasedness and variance
# ---------------------------------------------------------------------------------------------


def _draws(s, t, mask, *, k_max, top_k, samples, divergence="tad", draws=DRAWS, seed=3,
           targets_fn=None):
    """(loss [draws], gradient [draws, ...]) of the cached loss over independent caches."""
    def one(key):
        stats = teacher_stats(t, key, k_max=k_max, num_samples=samples)
        if divergence == "kl":
            f = lambda s: kl_divergence_cached(s, stats, mask)
        elif targets_fn is not None:
            tg = targets_fn(stats)
            f = lambda s: jnp.sum(_per_position(s, tg, mask)) / jnp.sum(mask)
        else:
            f = lambda s: tad_divergence_cached(s, stats, mask, top_k=top_k, beta=2.0)
        return jax.value_and_grad(f)(s)

    return jax.jit(jax.vmap(one))(jax.random.split(jax.random.PRNGKey(seed), draws))


def _z(samples, exact):
    samples = np.asarray(samples, np.float64)
    return (samples.mean(0) - exact) / (samples.std(0, ddof=1) / np.sqrt(len(samples)))


def _check_unbiased(vals, grads, exact, g_exact):
    """3 statistics: the loss, two fixed random projections of the gradient (0.8% false alarm)."""
    dirs = jax.random.normal(jax.random.PRNGKey(99), (2,) + g_exact.shape)
    zs = [_z(vals, float(exact))]
    for d in dirs:
        zs.append(_z(np.tensordot(np.asarray(grads), np.asarray(d), axes=g_exact.ndim),
                     float(jnp.sum(d * g_exact))))
    assert max(abs(z) for z in zs) < Z_MAX, zs
    return zs


@pytest.mark.parametrize("k_max, top_k", [(4, 4), (7, 3)])
def test_cached_tad_is_unbiased(x64, k_max, top_k):
    """Mean over 2,000 caches (S = 4) of the loss and of the gradient = the online TAD (3 SE);
    (7, 3) is a K < K_max read. float64, so that no rounding difference between the two paths
    weighs against the small standard errors."""
    s, t, mask = _data(dtype=jnp.float64)
    exact = tad_divergence(s, t, mask, top_k=top_k, beta=2.0)
    g_exact = jax.grad(lambda s: tad_divergence(s, t, mask, top_k=top_k, beta=2.0))(s)
    vals, grads = _draws(s, t, mask, k_max=k_max, top_k=top_k, samples=4)
    _check_unbiased(vals, grads, exact, g_exact)
    # Head entries and masked positions carry no sampling noise: equal in every draw.
    heads = jax.nn.one_hot(jax.lax.top_k(t, top_k)[1], t.shape[-1]).sum(-2) > 0
    fixed = np.asarray(heads | ~mask[..., None])
    np.testing.assert_allclose(np.asarray(grads)[:, fixed], np.broadcast_to(
        np.asarray(g_exact)[fixed], (DRAWS, fixed.sum())), rtol=1e-4, atol=1e-6)


def test_cached_kl_is_unbiased(x64):
    s, t, mask = _data(seed=5, dtype=jnp.float64)
    exact = kl_divergence(s, t, mask)
    g_exact = jax.grad(lambda s: kl_divergence(s, t, mask))(s)
    vals, grads = _draws(s, t, mask, k_max=4, top_k=4, samples=4, divergence="kl")
    _check_unbiased(vals, grads, exact, g_exact)


def test_the_test_has_power_a_k_read_without_reweighting_is_rejected(x64):
    """Negative control: reading K < K_max by treating the K_max-tail draws as draws from the
    K-tail (dropping the exact entries K..K_max−1 and their weight) is biased, and the same
    statistics reject it by far (|z| > 10)."""
    s, t, mask = _data(dtype=jnp.float64)

    def naive(stats):
        tg = read_top_k(stats, 3)
        n = stats.sample_ids.shape[-1]
        alpha = jnp.exp(tg.log_alpha)[..., None]
        return tg._replace(tail_ids=stats.sample_ids, tail_mass=jnp.broadcast_to(
            alpha / n, stats.sample_ids.shape))

    exact = tad_divergence(s, t, mask, top_k=3, beta=2.0)
    vals, _ = _draws(s, t, mask, k_max=7, top_k=3, samples=4, targets_fn=naive)
    assert abs(_z(vals, float(exact))) > 10


def test_variance_falls_as_one_over_s(x64):
    """Var(loss) · S is constant: S = 2, 8, 32 agree within 20% (the variance estimates from
    2,000 draws have ~3% relative error each)."""
    s, t, mask = _data(seed=7, dtype=jnp.float64)
    scaled = []
    for samples in (2, 8, 32):
        vals, _ = _draws(s, t, mask, k_max=4, top_k=4, samples=samples)
        scaled.append(np.var(np.asarray(vals, np.float64), ddof=1) * samples)
    assert max(scaled) / min(scaled) < 1.2, scaled


def test_float16_head_log_probs_change_the_loss_little():
    """The format stores log p_T in float16: the loss moves by < 1e-3 relative."""
    s, t, mask = _data(seed=8)
    stats = teacher_stats(t, jax.random.PRNGKey(0), k_max=6, num_samples=4)
    q = stats._replace(head_logp=stats.head_logp.astype(jnp.float16).astype(jnp.float32))
    a = tad_divergence_cached(s, stats, mask, top_k=6)
    b = tad_divergence_cached(s, q, mask, top_k=6)
    assert abs(float(a - b)) < 1e-3 * abs(float(a))


def test_bad_arguments_raise():
    s, t, mask = _data()
    stats = teacher_stats(t, jax.random.PRNGKey(0), k_max=4, num_samples=2)
    with pytest.raises(ValueError, match="K_max=4"):
        tad_divergence_cached(s, stats, mask, top_k=5)
    with pytest.raises(ValueError, match="covers positions"):
        tad_divergence_cached(s[:, :3], stats, mask[:, :3], top_k=2)
    with pytest.raises(ValueError, match="beta must be > 0"):
        tad_divergence_cached(s, stats, mask, top_k=2, beta=0.0)
    with pytest.raises(ValueError, match="reduction"):
        kl_divergence_cached(s, stats, mask, reduction="avg")


# ---------------------------------------------------------------------------------------------
# Format
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab, nbytes", [(256, 1), (257, 2), (65536, 2), (65537, 3),
                                           (256000, 3), (2**24 + 1, 4)])
def test_ids_take_the_fewest_whole_bytes(vocab, nbytes):
    assert fmt.id_bytes(vocab) == nbytes
    ids = np.array([0, 1, vocab // 2, vocab - 1])
    np.testing.assert_array_equal(fmt.unpack_ids(fmt.pack_ids(ids, nbytes), nbytes), ids)


def test_bytes_per_token_meet_the_goal():
    """≤ 128 bytes/token at K = 10, S = 16 (80 at V = 32000, 106 at Gemma's 256000)."""
    assert fmt.bytes_per_token(32000, 10, 16) == 80
    assert fmt.bytes_per_token(256000, 10, 16) == 106
    for v, k, s in [(32000, 10, 16), (256000, 20, 64)]:
        assert fmt.record_dtype(v, k, s, 7).itemsize == 7 * fmt.bytes_per_token(v, k, s)


def test_format_round_trip():
    _, t, _ = _data(shape=(3, 5, 300))
    stats = jax.device_get(teacher_stats(t, jax.random.PRNGKey(0), k_max=4, num_samples=3))
    dtype = fmt.record_dtype(300, 4, 3, 5)
    back = fmt.decode(np.frombuffer(fmt.encode(stats, dtype).tobytes(), dtype))
    for field in ("head_ids", "sample_ids", "log_alpha", "tail_entropy"):
        np.testing.assert_array_equal(getattr(back, field), getattr(stats, field))
    np.testing.assert_array_equal(back.head_logp, stats.head_logp.astype(np.float16))


# ---------------------------------------------------------------------------------------------
# Rows, writer, reader, training (a tiny random teacher over a small prepared corpus)
# ---------------------------------------------------------------------------------------------

K_MAX, SAMPLES, ROWS_PER_SHARD = 12, 4, 16


def _small_config(root):
    """configs/tiny.py over the first 30,000 characters of its corpus, prepared in root/prep."""
    from tad_jax.data.prepared import prepare

    corpus, _ = tiny.build_assets()
    small = os.path.join(root, "corpus.txt")
    with open(corpus) as f, open(small, "w") as g:
        g.write(f.read()[:30_000])
    cfg = tiny_config(**{"data.train_files": small, "data.val_fraction": 0.2,
                         "data.prepared_dir": os.path.join(root, "prep")})
    prepare(cfg.data, cfg.data.prepared_dir)
    return cfg


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """(config, cache folder, manifest) of a whole cache written in one go."""
    root = str(tmp_path_factory.mktemp("teacher_cache"))
    cfg = _small_config(root)
    out = os.path.join(root, "cache")
    manifest = wr.write_cache(cfg, out, k_max=K_MAX, num_samples=SAMPLES,
                              rows_per_shard=ROWS_PER_SHARD, batch_size=8, log=lambda _: None)
    cfg.data.teacher_cache = out
    return cfg, out, manifest


def test_rows_are_the_online_pipelines_unshuffled_rows(written):
    """PackedRows (rows by index) = the online concat-then-split rows of unshuffled documents."""
    from tad_jax.data import make_train_iterator
    from tad_jax.teacher_cache.rows import packed_rows

    cfg, _, _ = written
    data = cfg.data.copy_and_resolve_references()
    data.shuffle, data.num_epochs = False, 1
    rows = packed_rows(data)
    online = [b for b in make_train_iterator(data, seed=0, process_index=0, process_count=1)]
    flat = {k: np.concatenate([b[k] for b in online]) for k in online[0]}
    assert len(rows) > 2 * ROWS_PER_SHARD
    for r in range(len(rows)):
        for k, v in rows[r].items():
            np.testing.assert_array_equal(v, flat[k][r], err_msg=f"row {r} {k}")
    assert not flat["loss_mask"][len(rows):].any()


def _teacher_stats_of(cfg, batch):
    from tad_jax.builders import build_teacher
    from tad_jax.run_setup import resolved_config

    model, params = build_teacher(resolved_config(cfg))
    logits = model.apply({"params": params}, jnp.asarray(batch["input_ids"]),
                         segment_ids=jnp.asarray(batch["segment_ids"]),
                         positions=jnp.asarray(batch["positions"])).logits
    return teacher_stats(logits, jax.random.PRNGKey(0), k_max=K_MAX, num_samples=SAMPLES)


def test_reader_batches_carry_their_rows_teacher(written):
    """After shuffling, each row's cached head ids / log-probs / α_T are the teacher's on that
    row's tokens (a teacher forward on the batch), and the draws lie in the tail."""
    cfg, _, manifest = written
    assert manifest["bytes_per_token"] == K_MAX * 4 + 8 + SAMPLES * 2  # V = 512: 2-byte ids
    assert len(manifest["shards"]) == manifest["num_shards"] > 2
    it = rd.make_cached_train_iterator(cfg, seed=3, process_index=0, process_count=1)
    batch = next(it)
    want = _teacher_stats_of(cfg, batch)
    got = rd.cache_batch(batch)
    np.testing.assert_array_equal(got.head_ids, want.head_ids)
    np.testing.assert_allclose(got.head_logp, np.asarray(want.head_logp, np.float16), rtol=0,
                               atol=0.01)  # float16 storage
    np.testing.assert_allclose(got.log_alpha, want.log_alpha, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.tail_entropy, want.tail_entropy, rtol=1e-5, atol=1e-5)
    in_head = got.sample_ids[..., :, None] == got.head_ids[..., None, :]
    assert not in_head.any()
    rd.CacheReader(cfg.data.teacher_cache).verify()


def _row_keys(batch):
    return {(tuple(r[:8]), tuple(p[:8])) for r, p, m in zip(batch["input_ids"],
            batch["positions"], batch["loss_mask"], strict=True) if m.any()}


def test_reader_shuffles_shards_over_hosts_and_resumes_exactly(written):
    cfg, _, _ = written
    make = lambda pi=0, pc=1, seed=0: rd.make_cached_train_iterator(
        cfg, seed=seed, process_index=pi, process_count=pc)
    it = make()
    for _ in range(2):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(2)]
    again = make()
    again.set_state(state)
    for a, b in zip(want, [next(again) for _ in range(2)], strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(next(make(seed=0))["input_ids"], next(make(seed=1))["input_ids"])
    # Two hosts see disjoint rows, each with half the batch.
    h0, h1 = next(make(0, 2)), next(make(1, 2))
    assert h0["input_ids"].shape[0] == cfg.data.global_batch_size // 2
    assert not _row_keys(h0) & _row_keys(h1)


@pytest.mark.slow  # two or three cache writes (a teacher compile each)
def test_writer_resumes_after_a_kill(written, tmp_path):
    """A write stopped after 2 shards, with a torn temp file and a shard whose marker never got
    written (killed between rename and marker), resumes to the same bytes as a one-go write,
    without rewriting the finished shards."""
    cfg, whole, manifest = written
    cfg = cfg.copy_and_resolve_references()
    cfg.data.teacher_cache = ""
    out = str(tmp_path / "cache")
    kw = dict(k_max=K_MAX, num_samples=SAMPLES, rows_per_shard=ROWS_PER_SHARD, batch_size=8,
              log=lambda _: None)
    wr.write_cache(cfg, out, max_shards=3, **kw)
    assert "shards" not in fmt.read_manifest(out)
    os.remove(fmt.shard_path(out, 2, ".json"))  # killed after the rename, before the marker
    with open(os.path.join(out, ".tmp_shard_00003.bin"), "wb") as f:
        f.write(b"torn")  # killed mid-write of shard 3
    kept = os.stat(fmt.shard_path(out, 0)).st_mtime_ns
    with pytest.raises(ValueError, match="incomplete"):
        rd.CacheReader(out)
    final = wr.write_cache(cfg, out, **kw)
    assert os.stat(fmt.shard_path(out, 0)).st_mtime_ns == kept
    assert final["shards"] == manifest["shards"]  # same checksums: the same bytes
    with pytest.raises(ValueError, match="other settings"):
        wr.write_cache(cfg, out, **{**kw, "num_samples": SAMPLES + 1})


def test_a_cache_that_does_not_fit_is_refused(written, tmp_path, monkeypatch):
    cfg, _, _ = written
    for field, value, words in [("loss.temperature", 2.0, "temperature"),
                                ("loss.top_k", K_MAX + 1, "K_max=12"),
                                ("data.seq_len", 16, "seq_len")]:
        bad = cfg.copy_and_resolve_references()
        group, leaf = field.split(".")
        bad[group][leaf] = value
        with pytest.raises(ValueError, match=words):
            rd.open_cache(bad)
    tok = str(tmp_path / "tok")
    shutil.copytree(cfg.data.tokenizer, tok)
    with open(os.path.join(tok, "tokenizer_config.json")) as f:
        tok_cfg = json.load(f)
    tok_cfg["model_max_length"] = 7
    with open(os.path.join(tok, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f)
    bad = cfg.copy_and_resolve_references()
    bad.data.tokenizer = tok
    with pytest.raises(ValueError, match="tokenizer"):
        rd.open_cache(bad)
    with pytest.raises(ValueError, match="vocabulary"):
        rd.open_cache(cfg, vocab_size=500)
    prep = str(tmp_path / "prep")  # the same folder less its last document: other data
    shutil.copytree(cfg.data.prepared_dir, prep)
    offsets = np.load(os.path.join(prep, "train.offsets.npy"))
    np.save(os.path.join(prep, "train.offsets.npy"), offsets[:-1])
    bad = cfg.copy_and_resolve_references()
    bad.data.prepared_dir = prep
    with pytest.raises(ValueError, match="other tokenised data"):
        rd.open_cache(bad)
    # A prepared folder's ids hash comes from its meta.json, without reading the ids file.
    from tad_jax.data import prepared
    from tad_jax.teacher_cache.rows import PackedRows

    read = []
    monkeypatch.setattr(prepared, "_file_sha256", lambda *a: read.append(a) or "")
    fmt.data_hash(PackedRows(cfg.data.prepared_dir, "train", cfg.data.seq_len))
    assert read == []
    monkeypatch.undo()
    # The same document lengths over other tokens (a reviewer found them accepted): prepared
    # again (meta.json gets the new ids' sha256), or an older folder (no sha256 in meta.json:
    # the ids file is read).
    import hashlib

    for prepared_again in (True, False):
        shutil.rmtree(prep)
        shutil.copytree(cfg.data.prepared_dir, prep)
        ids_path = os.path.join(prep, "train.ids.bin")
        ids = np.fromfile(ids_path, np.int32)
        ids[100] = (ids[100] + 1) % 512
        ids.tofile(ids_path)
        meta = json.loads((tmp_path / "prep" / "meta.json").read_text())
        if prepared_again:
            meta["splits"]["train"]["ids_sha256"] = hashlib.sha256(ids.tobytes()).hexdigest()
        else:
            del meta["splits"]["train"]["ids_sha256"]
        (tmp_path / "prep" / "meta.json").write_text(json.dumps(meta))
        with pytest.raises(ValueError, match="other tokenised data"):
            rd.open_cache(bad)
    bad = cfg.copy_and_resolve_references()
    bad.data.mode = "sft"
    with pytest.raises(ValueError, match="pretrain"):
        rd.open_cache(bad)
    bad = cfg.copy_and_resolve_references()
    bad.loss.divergence = "jsd"
    with pytest.raises(ValueError, match="jsd"):
        rd.make_cached_train_iterator(bad, seed=0, process_index=0, process_count=1)


@pytest.mark.parametrize("fused", [False, True])
def test_cached_train_step_needs_no_teacher(written, fused):
    """The cached step runs with teacher_params=None (so it never calls the teacher), and its
    divergence is tad_divergence_cached of the student's logits (fused: from chunks of hidden
    states and the head, 40 positions per chunk)."""
    from tad_jax import builders, run_setup, sharding, step

    cfg, _, _ = written
    cfg = run_setup.resolved_config(cfg)
    cfg.loss.fused, cfg.loss.chunk_size = fused, 40
    mesh = sharding.make_mesh(cfg.mesh)
    with run_setup.mesh_context(mesh):
        t_model, t_params, s_model, params, mask, vocab = builders.build_models(cfg, mesh)
    tx, schedule = step.make_optimizer(cfg, 10)
    train_step = jax.jit(step.make_train_step(cfg, s_model, t_model, mask, tx, schedule, vocab))
    batch = next(rd.make_cached_train_iterator(cfg, seed=0, process_index=0, process_count=1))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    _, metrics = train_step(step.init_state(params, mask, tx), batch, None)
    logits = s_model.apply({"params": params}, batch["input_ids"],
                           segment_ids=batch["segment_ids"], positions=batch["positions"]).logits
    want = tad_divergence_cached(logits, rd.cache_batch(batch), batch["loss_mask"], top_k=10,
                                 beta=2.0)
    np.testing.assert_allclose(metrics["div_loss"], want, rtol=1e-5)


@pytest.mark.slow  # two or three cache writes (a teacher compile each)
def test_a_cache_of_the_first_rows_serves_only_those(written, tmp_path):
    """--max_rows: the cache covers rows [0, 20); one epoch of a run reads exactly those. Two
    writer processes (each its shards i mod 2) write the same bytes as one."""
    cfg, _, _ = written
    cfg = cfg.copy_and_resolve_references()
    out, alone = str(tmp_path / "cache"), str(tmp_path / "alone")
    kw = dict(k_max=K_MAX, num_samples=SAMPLES, rows_per_shard=8, max_rows=20, batch_size=8,
              log=lambda _: None)
    first = wr.write_cache(cfg, out, process_index=0, process_count=2, **kw)
    assert "shards" not in first and not os.path.exists(fmt.shard_path(out, 1))
    manifest = wr.write_cache(cfg, out, process_index=1, process_count=2, **kw)
    assert manifest["rows"] == 20 and manifest["num_shards"] == 3 and manifest["data_rows"] > 20
    assert manifest["shards"] == wr.write_cache(cfg, alone, **kw)["shards"]
    cfg.data.teacher_cache, cfg.data.num_epochs = out, 1
    from tad_jax.teacher_cache.rows import packed_rows

    rows = packed_rows(cfg.data)
    want = {(tuple(rows[r]["input_ids"][:8]), tuple(rows[r]["positions"][:8]))
            for r in range(20)}
    got = set()
    for batch in rd.make_cached_train_iterator(cfg, seed=0, process_index=0, process_count=1):
        got |= _row_keys(batch)
    assert got == want


@pytest.mark.parametrize("divergence, chunk, cap, scope", [
    ("tad", 3, None, "row"), ("kl", 8, 5.0, "row"), ("tad", 64, 5.0, "row"),
    ("tad", 3, None, "segment")])
def test_fused_cached_loss_equals_the_unfused(x64, divergence, chunk, cap, scope):
    """Chunks of hidden states × head = the unfused cached loss and CE on full logits, value and
    gradients (hidden, W, bias); chunk sizes that do not divide N = 8 included."""
    from tad_jax import causal_lm_loss
    from tad_jax.teacher_cache.fused import fused_cached_loss

    ks = jax.random.split(jax.random.PRNGKey(11), 5)
    h = jax.random.normal(ks[0], (2, 4, 6), jnp.float64)
    w = jax.random.normal(ks[1], (6, 24), jnp.float64)
    b = jax.random.normal(ks[2], (24,), jnp.float64)
    y = jax.random.randint(ks[3], (2, 4), 0, 24)
    _, t, mask = _data(dtype=jnp.float64)
    stats = teacher_stats(t, ks[4], k_max=5, num_samples=3)
    kw = dict(beta_scope=scope, segment_ids=jnp.array([[1, 1, 2, 2], [3, 3, 3, 4]]))

    def unfused(h, w, b):
        z = h @ w + b
        z = z if cap is None else cap * jnp.tanh(z / cap)
        if divergence == "tad":
            div = tad_divergence_cached(z, stats, mask, top_k=3, reduction="sum", **kw)
        else:
            div = kl_divergence_cached(z, stats, mask, reduction="sum")
        return causal_lm_loss(z, y, mask, reduction="sum") + 2.0 * div

    def fused(h, w, b):
        clm, div = fused_cached_loss(h, w, stats, y, mask, divergence=divergence, top_k=3,
                                     bias_v=b, final_logit_softcap=cap, chunk_size=chunk, **kw)
        return clm + 2.0 * div

    np.testing.assert_allclose(fused(h, w, b), unfused(h, w, b), **EXACT)
    for got, want in zip(jax.grad(fused, (0, 1, 2))(h, w, b),
                         jax.grad(unfused, (0, 1, 2))(h, w, b), strict=True):
        np.testing.assert_allclose(got, want, **EXACT)


def test_the_cached_step_skips_the_teachers_flops():
    """Compiled on abstract shapes, the cached step costs the online step less the teacher's
    forward: 0.62x on the tiny config (the teacher is 2 of 3 layers); --dry_run compiles it too."""
    from tad_jax.dry_run import dry_run
    from tad_jax.teacher_cache.cost import flops_cached_vs_online

    cfg = tiny_config()
    figures = flops_cached_vs_online(cfg)
    assert 0.5 < figures["ratio_cached_vs_online"] < 0.75, figures
    cfg.data.teacher_cache = "/not/needed/for/a/dry/run"
    assert dry_run(cfg, print_fn=lambda _: None)["flops_per_token"] == pytest.approx(
        figures["cached"], rel=1e-6)
