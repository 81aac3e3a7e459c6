"""Streaming evaluation metrics of a student against its teacher (TAD_SPEC.md, "Evaluation
metrics").

The log-softmax, top-K (ties: lowest index) and KL come from `tad_core`, the loss's kernel. The
teacher's padded entries follow its convention: a student -inf entry is dropped from both.

`eval_sums` reduces one batch of logits to a small dict of float32 sums (scalars and one [M] vector
per Full-ECE bin statistic); sums of several batches add up key by key (`add_sums`), and `finalize`
turns the total into the metrics of the whole split. Nothing of size [N, V] ever leaves the device,
so a held-out split of any length streams through in constant host memory.

Shape suffixes: `_btv` = [..., T, V] logits, `_bt` = [..., T], `_btk` = [..., T, K], `_m` = [M]
bins.
Any number of leading dims (including none) is accepted, as in `tad_jax.losses`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from tad_jax import checks
from tad_jax import tad_core as core

DEFAULT_TAIL_KS = (1, 2, 5, 10, 20, 50)


def _tail_mass_sums(lpt_btv, mask_bt, tail_ks):
    """Σ_t m_t α_T(K)(t) for each K, exactly (no 1 − Σ top-K cancellation).

    α(Kmax) is the teacher's log tail mass of `tad_core` (a logsumexp over the tail, the head
    told apart by value, as in the loss); each smaller K adds the sorted top probabilities between
    K and Kmax to it. K ≥ V gives 0 (no tail).
    """
    vocab = lpt_btv.shape[-1]
    k_max = min(max(tail_ks), vocab)
    top_lp_btk, top_idx_btk = core.top_k(lpt_btv, k_max)
    if k_max < vocab:
        log_alpha_bt = core.teacher_log_alpha(lpt_btv, core.head_of(top_lp_btk, top_idx_btk))
        alpha_max_bt = jnp.exp(log_alpha_bt)  # 0 for an all -inf tail or row
    else:
        alpha_max_bt = jnp.zeros(lpt_btv.shape[:-1], jnp.float32)
    top_p_btk = jnp.exp(top_lp_btk)
    # between_btk[..., j] = Σ_{i > j} top_p[..., i]: the sorted mass ranked j+2 .. k_max, as a
    # suffix sum that never contains top_p[j] (subtracting it would cancel the tail to 0).
    suffix_btk = jnp.flip(jnp.cumsum(jnp.flip(top_p_btk[..., 1:], -1), -1), -1)
    between_btk = jnp.concatenate([suffix_btk, jnp.zeros_like(top_p_btk[..., :1])], -1)
    out = {}
    for k in tail_ks:
        alpha_bt = alpha_max_bt + between_btk[..., k - 1] if k < vocab else 0.0 * alpha_max_bt
        out[f"tail_mass_k{k}"] = _valid_sum(alpha_bt, mask_bt)
    return out


def _full_ece_sums(lps_btv, targets_bt, mask_bt, ece_bins):
    """Per-bin hit counts and probability sums of every student probability (Liu et al. 2024).

    At most M probabilities of one position can reach the bins m ≥ 1 (each is ≥ 1/M and they sum
    to 1), so those bins are filled from the student's top-M entries alone; bin 0 takes the rest
    of the position's total mass. That is ~6x faster on XLA CPU than M masked passes over [N, V].
    """
    vocab = lps_btv.shape[-1]
    top_p_btk = jnp.exp(core.top_k(lps_btv, min(ece_bins, vocab))[0])
    top_bin_btk = _bin_of(top_p_btk, ece_bins)
    total_bt = jnp.sum(jnp.exp(lps_btv), axis=-1)  # ≈ 1; summed rather than assumed
    weighted_btk = jnp.where(mask_bt[..., None] > 0, top_p_btk, 0.0)
    conf = [jnp.sum(jnp.where(top_bin_btk == m, weighted_btk, 0.0)) for m in range(1, ece_bins)]
    conf0 = _valid_sum(total_bt, mask_bt) - sum(conf, jnp.float32(0.0))
    tgt_p_bt = jnp.exp(core.at_targets(lps_btv, targets_bt))
    # A target outside [0, V) (e.g. an unmasked -100) is no entry k = y: no hit (at_targets
    # reads 0 there, whose exp(0) = 1 would put a hit in the top bin).
    tgt_bin_bt = jnp.where((targets_bt >= 0) & (targets_bt < vocab),
                           _bin_of(tgt_p_bt, ece_bins), -1)
    hits = [jnp.sum(jnp.where(tgt_bin_bt == m, mask_bt, 0.0)) for m in range(ece_bins)]
    return {"ece_conf_m": jnp.stack([conf0, *conf]), "ece_hits_m": jnp.stack(hits)}


def _valid_sum(x_bt, mask_bt):
    """Σ x over the valid positions, by a select: a masked position's NaN or inf (all -inf
    padding logits, or an out-of-range target such as -100) must not leak as 0·NaN."""
    return jnp.sum(jnp.where(mask_bt > 0, x_bt, 0.0))


def _bin_of(p, ece_bins):
    """Equal-width bin [m/M, (m+1)/M) of each probability; p = 1 goes to the last bin."""
    return jnp.clip(jnp.floor(p * ece_bins).astype(jnp.int32), 0, ece_bins - 1)


def _check_args(student_logits, teacher_logits, targets, mask, tail_ks, ece_bins):
    if jnp.shape(student_logits) != jnp.shape(teacher_logits):
        raise ValueError(f"student logits {jnp.shape(student_logits)} and teacher logits "
                         f"{jnp.shape(teacher_logits)} must have the same shape [..., T, V].")
    checks.floating("student_logits", student_logits)
    checks.floating("teacher_logits", teacher_logits)
    checks.ids("targets", targets, "token ids")
    want = jnp.shape(student_logits)[:-1]
    if jnp.shape(targets) != want or jnp.shape(mask) != want:
        raise ValueError(f"targets {jnp.shape(targets)} and mask {jnp.shape(mask)} must both be "
                         f"the logits shape without the vocabulary axis, {want}.")
    if not tail_ks or any(int(k) != k or k < 1 for k in tail_ks):
        raise ValueError(f"tail_ks must be positive integers, got {tail_ks!r}.")
    if int(ece_bins) != ece_bins or ece_bins < 1:
        raise ValueError(f"ece_bins must be a positive integer, got {ece_bins!r}.")


def eval_sums(student_logits, teacher_logits, targets, mask, *,
              tail_ks: Sequence[int] = DEFAULT_TAIL_KS, ece_bins: int = 10) -> dict:
    """Sums of the evaluation statistics over the valid positions of one batch.

    Jittable (``tail_ks`` and ``ece_bins`` static). Temperature is 1 throughout, as in the paper's
    held-out metrics. Argmax ties go to the lowest token id (jnp.argmax).

    Args:
      student_logits: float `[..., T, V]`.
      teacher_logits: float `[..., T, V]`.
      targets: int `[..., T]`, the next token y at each position.
      mask: `[..., T]`, non-zero = the position counts; None: every position counts.
      tail_ks: the K of the teacher tail masses α_T(K).
      ece_bins: M, the number of equal-width Full-ECE bins over [0, 1].

    Returns:
      Dict of float32 sums: ``count``, ``kl``, ``student_nll``, ``teacher_nll``, ``mismatch``,
      ``top1_agree``, ``tail_mass_k{K}`` for each K, and ``ece_conf_m`` / ``ece_hits_m`` of
      shape [M].

    Raises:
      ValueError: on mismatched shapes, non-float logits, non-integer targets or bad
        ``tail_ks`` / ``ece_bins``.
    """
    if mask is None:
        mask = jnp.ones(jnp.shape(targets), jnp.float32)
    _check_args(student_logits, teacher_logits, targets, mask, tail_ks, ece_bins)
    mask_bt = (jnp.asarray(mask) != 0).astype(jnp.float32)
    targets_bt = jnp.asarray(targets).astype(jnp.int32)
    s_btv, t_btv = core.tempered_pair(student_logits, teacher_logits, 1.0)
    lps_btv, lpt_btv = core.log_softmax(s_btv), core.log_softmax(t_btv)
    # jnp.argmax, not top_k's first index: using top_k's indices made XLA CPU ~50x slower here.
    s_top_bt, t_top_bt = jnp.argmax(lps_btv, -1), jnp.argmax(lpt_btv, -1)
    tail = _tail_mass_sums(lpt_btv, mask_bt, tuple(tail_ks))
    ece = _full_ece_sums(lps_btv, targets_bt, mask_bt, int(ece_bins))
    kl_bt = core.token_terms(s_btv, t_btv, None).kl  # the loss's kernel, K = 0
    sums = {
        "count": jnp.sum(mask_bt),
        "kl": _valid_sum(kl_bt, mask_bt),
        "student_nll": -_valid_sum(_at(lps_btv, targets_bt), mask_bt),
        "teacher_nll": -_valid_sum(_at(lpt_btv, targets_bt), mask_bt),
        "mismatch": jnp.sum(mask_bt * (t_top_bt != targets_bt)),
        "top1_agree": jnp.sum(mask_bt * (s_top_bt == t_top_bt)),
        **tail,
        **ece,
    }
    return {k: jnp.asarray(v, jnp.float32) for k, v in sums.items()}


def _at(lp_btv, targets_bt):
    """lp[..., t, y_t], floored at the float32 minimum (a valid target on a -inf entry gives a
    huge finite NLL rather than inf; masked positions are dropped by `_valid_sum`)."""
    out_bt = core.at_targets(lp_btv, targets_bt)
    return jnp.maximum(out_bt, jnp.finfo(jnp.float32).min)


def add_sums(total: Mapping | None, sums: Mapping) -> dict:
    """Adds one batch's sums to a running total (None = nothing yet), on the host in float64.

    float64 on the host keeps the running count and sums exact over long splits.
    """
    sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}
    if total is None:
        return sums
    if set(total) != set(sums):
        raise ValueError(f"cannot add sums with different keys: {sorted(total)} vs {sorted(sums)}; "
                         "use the same tail_ks and ece_bins for every batch.")
    return {k: total[k] + sums[k] for k in sums}


def finalize(sums: Mapping) -> dict:
    """Turns summed statistics into the metrics of the split.

    Args:
      sums: the output of `eval_sums`, or several of them added key by key.

    Returns:
      Dict of Python floats: ``tokens`` (N), ``kl`` (mean KL(p_T‖p_S)), ``full_ece`` (in [0, 2]),
      ``mismatch_rate``, ``top1_agreement``, ``student_ce``, ``student_ppl``, ``teacher_ce``,
      ``teacher_ppl``, and ``tail_mass``: {K: mean α_T(K)} with int keys in increasing order.

    Raises:
      ValueError: the sums hold no valid position.
    """
    n = float(np.asarray(sums["count"]))
    if n <= 0:
        raise ValueError("no valid positions were evaluated (all masked, or an empty split): check "
                         "the held-out data and its loss_mask.")
    mean = {k: float(np.asarray(sums[k])) / n for k in
            ("kl", "student_nll", "teacher_nll", "mismatch", "top1_agree")}
    ece = np.sum(np.abs(np.asarray(sums["ece_hits_m"]) - np.asarray(sums["ece_conf_m"]))) / n
    ks = sorted(int(k[len("tail_mass_k"):]) for k in sums if k.startswith("tail_mass_k"))
    return {
        "tokens": n,
        "kl": mean["kl"],
        "full_ece": float(ece),
        "mismatch_rate": mean["mismatch"],
        "top1_agreement": mean["top1_agree"],
        "student_ce": mean["student_nll"],
        "student_ppl": math.exp(min(mean["student_nll"], 700.0)),
        "teacher_ce": mean["teacher_nll"],
        "teacher_ppl": math.exp(min(mean["teacher_nll"], 700.0)),
        "tail_mass": {k: float(np.asarray(sums[f"tail_mass_k{k}"])) / n for k in ks},
    }
