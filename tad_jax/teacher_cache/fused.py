"""The cached TAD / KL (and the CLM term) from hidden states and the output head, in token chunks.

For big vocabularies: the student's logits `[N, V]` never exist at once. A `lax.scan` over chunks
of `chunk_size` positions computes each chunk's logits (h·W + b, Gemma2's soft-cap), the cached
divergence (`loss._cached_per_position`, each position its own row with its own β(X)) and the
cross-entropy; `jax.checkpoint` on the chunk recomputes its logits in the backward pass instead of
keeping them, so peak memory is ~chunk_size × V floats. β(X) depends on the teacher only, so it is
computed from the cache for every row before the scan: exact, as in the unfused loss. Shapes:
`_btd` = [B, T, d], `_dv` = [d, V], `_n*` = flattened positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tad_jax.teacher_cache import loss as cl
from tad_jax.teacher_cache.stats import TeacherStats


def _chunked(x, n_chunks, chunk):
    pad = n_chunks * chunk - x.shape[0]
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape((n_chunks, chunk) + x.shape[1:])


def fused_cached_loss(hidden_btd, w_dv, cache_batch: TeacherStats, targets_bt, mask_bt, *,
                      divergence="tad", top_k=10, beta=2.0, temperature=1.0, eps_alpha=1e-6,
                      beta_scope="row", segment_ids=None, bias_v=None, final_logit_softcap=None,
                      chunk_size=1024):
    """(clm_sum, div_sum): Σ over valid positions of the CE and of the cached divergence.

    Equals `causal_lm_loss(..., reduction="sum")` and `tad_divergence_cached` /
    `kl_divergence_cached(..., reduction="sum")` on logits = softcap(h·W + b), with their
    gradients (w.r.t. hidden states, W and b).

    Args:
      hidden_btd: float `[B, T, d]` final hidden states (after the last norm).
      w_dv: float `[d, V]` output head; `bias_v`: `[V]` or None.
      cache_batch: `TeacherStats` `[B, T, ...]`; targets_bt: int `[B, T]`; mask_bt: `[B, T]`.
      divergence: "tad" or "kl"; top_k, beta, temperature, eps_alpha, beta_scope,
        segment_ids: as the unfused losses.
      final_logit_softcap: c of logits = c·tanh(logits / c) (Gemma2), or None.
      chunk_size: positions per scan step.

    Raises:
      ValueError: an unknown divergence, chunk_size < 1, or the unfused losses' errors.
    """
    if divergence not in ("tad", "kl"):
        raise ValueError(f"divergence must be 'tad' or 'kl' from a cache, got {divergence!r}.")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}.")
    mask_bt = cl._check(jnp.zeros(hidden_btd.shape[:-1] + (1,)), cache_batch, mask_bt, "sum")
    if divergence == "kl":
        top_k = cache_batch.head_ids.shape[-1]
    targets = cl.read_top_k(cache_batch, top_k)
    if divergence == "tad":
        bx_bt = cl.beta_x(targets.log_alpha, mask_bt, cl._positive("beta", beta),
                          cl._positive("eps_alpha", eps_alpha), beta_scope, segment_ids)
    else:
        bx_bt = jnp.ones(mask_bt.shape, jnp.float32)
    temperature = cl._positive("temperature", temperature)
    dtype = jnp.promote_types(hidden_btd.dtype, jnp.float32)  # float32, or float64 if given
    n = mask_bt.size
    chunk = min(chunk_size, n)
    n_chunks = -(-n // chunk)
    flat = lambda x: _chunked(x.reshape((n,) + x.shape[mask_bt.ndim:]), n_chunks, chunk)
    xs = (flat(hidden_btd), jax.tree.map(flat, targets), flat(bx_bt), flat(mask_bt),
          flat(targets_bt.astype(jnp.int32)))

    @jax.checkpoint
    def chunk_sums(w_dv, bias_v, h_cd, t, bx_c, m_c, y_c):
        logits_cv = jnp.dot(h_cd.astype(dtype), w_dv.astype(dtype))
        if bias_v is not None:
            logits_cv = logits_cv + bias_v.astype(dtype)
        if final_logit_softcap:
            logits_cv = final_logit_softcap * jnp.tanh(logits_cv / final_logit_softcap)
        # Positions as [C, 1, ...]: β(X) is per position already (its sequence's, computed above).
        one = jax.tree.map(lambda x: x[:, None], t)
        div = cl._cached_per_position(logits_cv[:, None], one, bx_c[:, None], m_c[:, None],
                                      temperature)
        lse = jax.nn.logsumexp(logits_cv, axis=-1)
        ce = lse - jnp.take_along_axis(logits_cv, y_c[:, None], axis=-1)[:, 0]
        return jnp.sum(jnp.where(m_c > 0, ce, 0.0)), jnp.sum(div)

    def body(carry, x):
        clm, div = chunk_sums(w_dv, bias_v, *x)
        return (carry[0] + clm, carry[1] + div), None

    zero = jnp.zeros((), dtype)
    (clm, div), _ = jax.lax.scan(body, (zero, zero), xs)
    return clm, div
