"""The teacher's per-position statistics that a cache stores, computed from its logits.

Shapes: `_btv` = [..., T, V], `_btk` = [..., T, K_max], `_bts` = [..., T, S], `_bt` = [..., T].
Everything is at the cache's temperature τ: p_T = softmax(z_T / τ).

Per position, with I = the teacher's top-K_max ids (ties: the lowest id wins, as `lax.top_k`):
- `head_ids`, `head_logp`: I (in decreasing p_T) and log p_T on I, normalised over the whole V;
- `log_alpha`: log α_T = log Σ_{i∉I} p_T,i, from a logsumexp over the tail (never 1 − Σ_I p);
- `tail_entropy`: H̃ = −Σ_{i∉I} p̃_T,i log p̃_T,i of the renormalised tail p̃_T = p_T / α_T. With
  `log_alpha` it gives the unnormalised Σ_tail p log p = α_T (log α_T − H̃) that smaller K need
  (`loss.read_top_k`); stored normalised because that stays finite when α_T underflows;
- `sample_ids`: S tail ids drawn i.i.d. from p̃_T (inverse CDF), each standing for α_T / S mass.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class TeacherStats(NamedTuple):
    """What a cache holds per position (int32 and float32, float64 under x64; `format` packs
    them into the compact on-disk records)."""

    head_ids: jax.Array  # int32 [..., T, K_max], decreasing p_T
    head_logp: jax.Array  # float32 [..., T, K_max], log p_T (full-vocabulary normalised)
    log_alpha: jax.Array  # float32 [..., T], log α_T of the K_max tail (-inf: no tail mass)
    tail_entropy: jax.Array  # float32 [..., T], H̃ of the K_max tail (0 when α_T = 0)
    sample_ids: jax.Array  # int32 [..., T, S], i.i.d. draws from p̃_T (0s when α_T = 0)


def _lse(x_btv):
    """logsumexp over the last axis; -inf (not NaN) for an all -inf row."""
    m_bt = jnp.max(x_btv, axis=-1)
    m_bt = jnp.where(jnp.isfinite(m_bt), m_bt, 0.0)
    return jnp.log(jnp.sum(jnp.exp(x_btv - m_bt[..., None]), axis=-1)) + m_bt


def head_mask(ids_btk, vocab: int):
    """bool [..., T, V]: True on the ids (a scatter of N·K writes, not K compares per entry)."""
    lead = ids_btk.shape[:-1]
    iotas = [jax.lax.broadcasted_iota(jnp.int32, ids_btk.shape, d) for d in range(len(lead))]
    return jnp.zeros(lead + (vocab,), bool).at[(*iotas, ids_btk)].set(True)


def tail_log_probs(t_btv, head_btv):
    """(log p̃ over the tail, -inf on the head; log α; logsumexp over V) of scaled logits t."""
    lse_bt = _lse(t_btv)
    tail_btv = jnp.where(head_btv, -jnp.inf, t_btv)
    lse_tail_bt = _lse(tail_btv)
    safe = jnp.where(jnp.isfinite(lse_tail_bt), lse_tail_bt, 0.0)
    return tail_btv - safe[..., None], lse_tail_bt - lse_bt, lse_bt


def sample_tail(log_p_tail_btv, key, num_samples: int):
    """int32 [..., T, S]: i.i.d. draws from exp(log_p_tail) (a normalised tail) by inverse CDF.

    O(V + S log V) per position (a cumulative sum and a binary search), where Gumbel-max would
    draw S·V random numbers. Zero-probability entries are never returned: a search lands on the
    first entry whose cumulative sum exceeds u·total, and a rounding at the very top falls back
    to the last entry with mass. A row without mass returns 0s (their weight α_T is 0).
    """
    p_btv = jnp.exp(log_p_tail_btv)
    cdf_btv = jnp.cumsum(p_btv, axis=-1)
    u_bts = jax.random.uniform(key, cdf_btv.shape[:-1] + (num_samples,), jnp.float32)
    target_bts = u_bts * cdf_btv[..., -1:]
    search = jnp.vectorize(lambda c, x: jnp.searchsorted(c, x, side="right"),
                           signature="(v),(s)->(s)")
    ids_bts = search(cdf_btv, target_bts)
    vocab = p_btv.shape[-1]
    last_bt = vocab - 1 - jnp.argmax(jnp.flip(p_btv > 0, axis=-1), axis=-1)
    ids_bts = jnp.where(ids_bts >= vocab, last_bt[..., None], ids_bts)
    return ids_bts.astype(jnp.int32)


def teacher_stats(teacher_logits, key, *, k_max: int, num_samples: int,
                  temperature: float = 1.0) -> TeacherStats:
    """The cache statistics of teacher logits `[..., T, V]` (jittable; config args static).

    Args:
      teacher_logits: float `[..., T, V]` (vocabulary already cut to the tokenizer's).
      key: a PRNG key; the draws of position (b, t) depend on the key and the shape only.
      k_max: K_max, 1 <= K_max < V.
      num_samples: S >= 1 tail draws per position.
      temperature: τ > 0.

    Returns:
      `TeacherStats` (float32 / int32).
    """
    vocab = teacher_logits.shape[-1]
    if not 1 <= k_max < vocab:
        raise ValueError(f"k_max must satisfy 1 <= k_max < V={vocab}, got {k_max}.")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    t_btv = teacher_logits.astype(jnp.promote_types(teacher_logits.dtype, jnp.float32))
    t_btv = t_btv / temperature
    top_btk, ids_btk = jax.lax.top_k(t_btv, k_max)
    log_p_tail_btv, log_alpha_bt, lse_bt = tail_log_probs(t_btv, head_mask(ids_btk, vocab))
    p_tail_btv = jnp.exp(log_p_tail_btv)
    entropy_bt = -jnp.sum(jnp.where(p_tail_btv > 0, p_tail_btv * log_p_tail_btv, 0.0), axis=-1)
    has_tail = jnp.isfinite(log_alpha_bt)
    return TeacherStats(
        head_ids=ids_btk.astype(jnp.int32),
        head_logp=top_btk - lse_bt[..., None],
        log_alpha=log_alpha_bt,
        tail_entropy=jnp.where(has_tail, entropy_bt, 0.0),
        sample_ids=jnp.where(has_tail[..., None], sample_tail(log_p_tail_btv, key, num_samples),
                             0),
    )
