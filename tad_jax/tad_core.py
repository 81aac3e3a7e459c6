"""The one TAD kernel: per-position terms of Eq. 2-3 and the Eq. 6 gradient of the paper.

Everything that computes TAD's math calls this module: `losses.tad_divergence` / `kl_divergence`
(one block: the whole [..., T, V] logits), `fused` (one block per token chunk) and `metrics`
(log-softmax, top-K, KL). Definitions: /work/shared/TAD_SPEC.md (arXiv 2602.20816, Sec. 2, App. A).

Shape suffixes: `_v` = the vocabulary axis (last), `_k` = top-K, nothing = one value per position;
every function takes any number of leading (position) axes.

Conventions, for every caller:
- a = s/τ, b = t/τ in float32 (float64 if given float64): the tempered student / teacher logits.
- Padded vocabulary (`tempered_pair`): an entry where the STUDENT logit is -inf (a padded column
  of the student's head, e.g. a -inf bias) is dropped from both distributions, as slicing the
  vocabulary would: finite values, 0 gradient there. A teacher -inf is a zero probability that
  the teacher assigns: with both sides -inf the entry is dropped (padding of both); with the
  student finite there, the student is pushed off it (p_T = 0: forward KL and TAD stay finite).
  A position where the teacher has no entry left holds no distribution: its terms and gradient
  are 0, and α_T = α_S = 0 for K ≥ 1 (α ≡ 1 for K = 0, so that KL stays exact).
- Top-K: `top_k`, exact, ties at the K-th place go to the lowest vocabulary index (as
  `lax.top_k`), whatever V's padding or chunking. Membership of the head I is decided from the
  values (`Head.kth`, `Head.last`), so no [.., V] mask is ever materialised.
- Log space: α_T, α_S and D_KL2 come from logsumexps over the tail (head excluded by a select),
  never from 1 − Σ_I p (cancellation when the head holds almost all the mass).

Cost, measured on the TPU v5p program compiled ahead of time (`scripts/bench_loss.py`, jax.grad,
in f32 [N, V] tensors' worth of bytes; the same ratios at [1, 4096, 32000], [1, 2048, 128256]
and [1, 1024, 256000], f32 and bf16): KL 7.0; TAD 9.0 = 1.29x (1.14x with finite student
logits: `student_padding=False`, as the training step calls it for a head without a bias), and
no [N, V] temporary. Before this kernel: 5.4x / 7.9x (f32 / bf16), 4.0x / 5.8x, 3.5x / 5.1x and
3.75 f32 [N, V] temporaries.
Where the bytes go on TPU: top_k (one pass over t, and over s too to merge the student's padding
into t: XLA TPU fuses that producer into its TopK), one pass of maxima and one of sums, and
the gradient (3 passes, as KL's).
On TPU at τ = 1, and in the fused loss, a Pallas kernel (`tpu_kernel`) makes the top-(K+1), the
maxima and the sums from one read of the logits, widening them and merging the student's
padding into t in VMEM: TAD 9.0 -> 5.0-5.1 f32 [N, V] units in float32, 4.5 -> 2.5-2.6 in bf16
(0.72-0.73x KL's 7.0 / 3.5; the gradient's three passes and the kernel's read of s and t).
Off TPU (`_on_tpu`, the one device split) the head comes from a two-level search fused with the
pass of maxima (`_blocked_terms`), and the head's sums from its K values: TAD then makes KL's
passes and KL's number of reductions. H100 compile, temporaries (f32 [N, V] units, f32 / bf16):
at [1, 4096, 32000] 0.17 / 0.14 in the default call and 0.08 / 0.06 with finite student
logits, at [1, 1024, 256000] 0.02 / 0.02 and 0.01 / 0.01 (with lax.top_k: 1.26 / 0.76 and
0.26). XLA CPU, fwd+bwd TAD/KL on 2 shared cores: 1.2-1.4x at [8, 512, 32000] f32 (noisy
host), 0.8-1.05x at V = 128256 and 256000 (lax.top_k and seven separate sums: 2.07x and 1.6x).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tad_jax import checks

BETA_SCOPES = ("row", "segment")


@dataclasses.dataclass(frozen=True)
class TADConfig:
    """TAD's settings, validated once (static: hashable, usable as a jit/custom_vjp argument).

    Attributes:
      top_k: K >= 0, the size of the teacher's head I (K = 0: the tail is the whole vocabulary).
      beta: β > 0 of Eq. 3; β(X) = β / max(ᾱ(X), eps_alpha).
      temperature: τ > 0; probabilities are softmax(logits / τ), the divergence is times τ².
      eps_alpha: floor (> 0) of the mean teacher tail mass ᾱ(X).
      beta_scope: what a sequence X of Eq. 3 is: "row" (a packed training row, pretraining) or
        "segment" (one document of a packed row, from `segment_ids`: supervised distillation).

    Raises:
      ValueError: on a non-integer or negative top_k, non-positive or infinite
        beta/temperature/eps_alpha, or an unknown beta_scope.
    """

    top_k: int = 10
    beta: float = 2.0
    temperature: float = 1.0
    eps_alpha: float = 1e-6
    beta_scope: str = "row"

    def __post_init__(self):
        # Any static integer (numpy's too, e.g. from a config array); not a bool or a jax value.
        static_int = isinstance(self.top_k, (int, np.integer)) and not isinstance(self.top_k, bool)
        if not static_int or self.top_k < 0:
            raise ValueError(f"top_k must be a static integer >= 0 (a Python or numpy int, not a "
                             f"jax value), got {self.top_k!r}.")
        object.__setattr__(self, "top_k", int(self.top_k))
        for name in ("beta", "temperature", "eps_alpha"):
            object.__setattr__(self, name, checks.positive(name, getattr(self, name)))
        if self.beta_scope not in BETA_SCOPES:
            raise ValueError(f"beta_scope must be one of {BETA_SCOPES}, got {self.beta_scope!r}.")

    def check_vocab(self, vocab: int) -> None:
        """Raises ValueError unless K < V (the tail must be non-empty)."""
        if self.top_k >= vocab:
            raise ValueError(f"top_k must satisfy 0 <= top_k < V={vocab} (the tail must be "
                             f"non-empty), got {self.top_k}.")


# ------------------------------------------------------------------------------- numerics


def widen(x):
    """x in float32, or float64 when given float64."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def tempered_pair(s_v, t_v, temperature, merge=True):
    """(a, b) = (s/τ, t/τ) widened; b is -inf wherever a is (the student's padded entries).

    So b > -inf implies a > -inf: every product p_T·(b − a) below is finite. `merge=False` is for
    callers that guarantee it already (the fused loss merges the heads' biases once) or whose
    student logits are finite (the losses' `student_padding=False`).
    """
    s_v, t_v = widen(s_v), widen(merge_padding(s_v, t_v) if merge else t_v)
    if temperature != 1.0:
        s_v, t_v = s_v / temperature, t_v / temperature
    return s_v, t_v


def merge_padding(s_v, t_v):
    """t with -inf wherever s is -inf (the student's padded entries leave both distributions).

    Written as t + (0 or -inf): the same values as a select (t is never +inf), but XLA GPU then
    keeps the student's padding mask inside each fusion instead of writing it out as a bool
    [.., V] array (H100 compile of jax.grad of TAD at [1, 4096, 32000] f32: temporaries 0.17
    instead of 0.30 f32 [N, V]; `scripts/bench_loss.py --gpu_target h100:1`).
    """
    return t_v + jnp.where(jnp.isneginf(s_v), -jnp.inf, 0.0).astype(t_v.dtype)


def finite_shift(x):
    """x where finite, else 0: a shift that keeps exp(-inf - shift) = 0 instead of NaN."""
    return jnp.where(jnp.isfinite(x), x, 0.0)


def logsumexp(x_v, where_v=None):
    """logsumexp over the last axis (optionally over `where_v` only); -inf if nothing is left."""
    if where_v is not None:
        x_v = jnp.where(where_v, x_v, -jnp.inf)
    m = finite_shift(jnp.max(x_v, axis=-1))
    return jnp.log(jnp.sum(jnp.exp(x_v - m[..., None]), axis=-1)) + m


def log_share(lse_part, lse_all):
    """log of a part's share of the mass, lse_part − lse_all (both with the same offset):
    -inf (a zero share) where there is no mass at all (lse_all = -inf), not -inf − -inf = NaN.
    log α_T of every caller (`token_terms`, `teacher_log_alpha`, the fused pre-pass)."""
    return jnp.where(jnp.isneginf(lse_all), -jnp.inf, lse_part - lse_all)


def log_softmax(x_v):
    """float32 log-softmax; -inf entries stay -inf (never NaN)."""
    x_v = widen(x_v)
    return x_v - finite_shift(logsumexp(x_v))[..., None]


# ------------------------------------------------------------------------------- top-K


def top_k(x_v, k):
    """Exact top-k over the last axis: (values, indices), largest first.

    Tie rule: among equal values the lowest index comes first (`lax.top_k`'s rule), so the K-th
    place is decided the same way whatever the padding of V or the chunk sizes. Values are
    compared in their own dtype (or widened: exact, same order and ties).
    Implementation: `lax.top_k` on TPU, or when V is short next to k; elsewhere a two-level
    search that reads x once instead of sorting it (`_blocked_top_k`; see `_on_tpu`).
    """
    x_v = _whole_last_axis(x_v)
    if k == 0:
        return jax.lax.top_k(x_v, 0)
    block = _head_block(x_v.shape[-1], k)
    if block is None:
        return _top_k_2d(x_v, k)
    return _on_tpu(lambda x: _top_k_2d(x, k), lambda x: _blocked_top_k(x, k, block), x_v)


def _blocked_top_k(x_v, k, block):
    (bmax,) = _block_maxima((x_v,), block)
    _, cols, (cand,) = _candidates(bmax, k, block, x_v.shape[-1], lambda c: (_take(x_v, c),))
    pos_k = _top_k_2d(_equal_zeros(cand), k)[1]
    # The barrier keeps XLA CPU from fusing the result into its consumers, which turned the
    # TopK into a full sort (the fused loss's pre-pass: 0.62 -> 2.16 CPU-s without it).
    return jax.lax.optimization_barrier((_take(cand, pos_k), _take(cols, pos_k)))


def _on_tpu(tpu, other, *args):
    """tpu(*args) when compiled for TPU, else other(*args): the one device split of the top-K.

    The two-level search (`_block_maxima`, `_candidates`) reads the logits once and gathers
    k·block of them per position. XLA TPU tiles the vocabulary axis over its 128 lanes: the
    block maxima become a relayout copy and the gathers an [.., V] scan per index, so jax.grad
    of TAD at [1, 4096, 32000] f32 moved 114 f32 [N, V] tensors' worth of bytes, against 9.0
    with `lax.top_k` (TPU v5p compile, `scripts/bench_loss.py`). A variant laid out for TPU's
    (8, 128) tiles (block maxima of a [N/8, V/128, 8, 128] view, (1, 128)-slice gathers) moved
    21, and more than that: XLA TPU made the gathers a 10·N-trip loop, whose body the cost
    analysis counts once. XLA GPU's TopK needs its input written out (the merged teacher:
    temporaries of 1.26 f32 [N, V] on an H100 compile, 0.17 blocked), and XLA CPU's sorts
    (blocked: ~8x faster at [8, 512, 32000], 2 cores).
    """
    return jax.lax.platform_dependent(*args, tpu=tpu, default=other)


# Columns per block of the two-level top-k. It needs at least 4k blocks (smaller blocks for a
# large k): with fewer the candidates are a good part of V anyway.
_BLOCKS = (128, 64, 32)


def _head_block(vocab, k):
    """The block width of the two-level top-k of a [.., vocab] array, or None (lax.top_k)."""
    return next((b for b in _BLOCKS if vocab >= 4 * k * b), None)


def _block_maxima(xs_v, block):
    """Maxima of each `block` consecutive entries of the last axis ([.., ceil(V / block)]) of
    every array in xs_v: row reductions of a [.., V/block, block] view (no copy off TPU), fused
    with the arrays' elementwise producers; a shorter last block when block does not divide V."""
    vocab = xs_v[0].shape[-1]
    whole = vocab - vocab % block

    def one(x_v):
        bmax = jnp.max(x_v[..., :whole].reshape(*x_v.shape[:-1], whole // block, block), -1)
        if whole == vocab:
            return bmax
        return jnp.concatenate([bmax, jnp.max(x_v[..., whole:], -1, keepdims=True)], -1)

    return tuple(one(x) for x in xs_v)


def _candidates(bmax, k, block, vocab, gather):
    """The k blocks with the largest maxima [.., k] and their columns [.., k·block], both in
    ascending order, and `gather(columns)` (-inf past V).

    The k largest entries always lie in those blocks (a block holding one of them has a maximum
    among the k largest block maxima; ties between blocks go to the lower block, as between
    entries). Ascending column order keeps the lowest-index tie rule for a top-k over them.
    """
    kb = min(k, bmax.shape[-1])
    cidx = jnp.sort(_top_k_2d(_equal_zeros(bmax), kb)[1], axis=-1)
    cols = (cidx[..., None] * block + jnp.arange(block, dtype=cidx.dtype))
    cols = cols.reshape(*cidx.shape[:-1], kb * block)
    valid = cols < vocab
    got = gather(jnp.minimum(cols, vocab - 1))
    return cidx, cols, tuple(jnp.where(valid, g, -jnp.inf) for g in got)


def at_targets(x_v, targets):
    """x[..., y] at each position: x [..., V], targets y int [...] (0 where y is outside [0, V)).

    A select and a sum over V rather than a gather: the select is elementwise and the sum a
    local reduction whatever V's sharding (a gather along an explicitly sharded V is a
    ShardingTypeError), and its transpose is a select, not a scatter.
    """
    hit_v = jax.lax.broadcasted_iota(jnp.int32, x_v.shape, x_v.ndim - 1) == targets[..., None]
    return jnp.sum(jnp.where(hit_v, x_v, 0), axis=-1)


def _take(x_v, cols):
    return jnp.take_along_axis(x_v, cols, axis=-1)


def _equal_zeros(x):
    """x with every value that compares equal to 0 made +0.0, for the top_k calls of the
    two-level search. lax.top_k orders 0.0 above -0.0 (and, on XLA CPU, subnormals apart from
    0, which its comparisons flush to 0), while `Head`/`in_tail` and the block maxima compare
    values: without this a tie at the K-th place between them could pick a block or an entry
    other than the lowest-index one, and "tail + the head's K values" would miss or count twice
    an entry (lse of b off by 5e-3 at V = 1000, tests/test_review_kernel.py). Only the [.., V/block]
    maxima and the [.., k·block] candidates pass through it."""
    return jnp.where(x == 0, jnp.zeros_like(x), x)


def _top_k_2d(x_v, k):
    """lax.top_k on a 2-D view, values in x's dtype.

    XLA TPU's TopK rewrite only takes rank-2 operands (a rank-3 input becomes a full sort:
    measured at [1, 4096, 32000]), and the barrier keeps the TopK whole: when its values are
    sliced downstream, XLA TPU otherwise rewrites it into a full sort of [m, V] (measured in the
    fused loss's [512, 256000] chunks: fused TAD/KL bytes 1.66x -> 1.27x, temporaries 1.62x ->
    1.00x). XLA CPU sorts bf16 (~70x slower than f32: it gets widened values) and aborts on the
    barrier (its TopkDecomposer, jax 0.10). Every platform gets `_equal_zeros` (on CPU free,
    its TopK reads a widened copy anyway; on TPU fused into the TopK's producer): otherwise a
    tie between 0.0 and -0.0 at the K-th place could leave the `Head` rule naming K + 1 entries.
    """
    def cpu(x):
        vals, idx = jax.lax.top_k(_equal_zeros(widen(x)), k)
        return vals.astype(x.dtype), idx

    def accelerator(x):
        return tuple(jax.lax.optimization_barrier(jax.lax.top_k(_equal_zeros(x), k)))

    def rows(x_v):
        shape = x_v.shape[:-1] + (k,)
        vals, idx = jax.lax.platform_dependent(
            x_v.reshape(-1, x_v.shape[-1]), cpu=cpu, default=accelerator)
        return vals.reshape(shape), idx.reshape(shape)

    return _per_shard(rows, x_v)


def _per_shard(f, x_v):
    """f(x) for an f that works on each position alone; shard by shard (`jax.shard_map`) when
    x has explicitly sharded leading axes, whose merge by a reshape is not a local operation
    (a ShardingTypeError). The last axis must be whole (`_whole_last_axis`)."""
    mesh, spec = _explicit_spec(x_v)
    if spec is None or all(a is None for a in spec[:-1]):
        return f(x_v)
    spec = jax.sharding.PartitionSpec(*spec[:-1], None)
    return jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=spec)(x_v)


def _whole_last_axis(x_v):
    """x with its last axis (V; T in `beta_x`) unsharded: a top_k, sort or segment sum along an
    explicitly sharded axis is an error."""
    mesh, spec = _explicit_spec(x_v)
    if spec is None or spec[-1] is None:
        return x_v
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec[:-1], None))
    return jax.sharding.reshard(x_v, whole)


def _explicit_spec(x):
    """(mesh, spec) of x's sharding in its type, a spec with one entry per axis (only Explicit
    mesh axes show there), or (None, None) when its type carries no such spec."""
    sharding = jax.typeof(x).sharding
    spec = getattr(sharding, "spec", None)
    if spec is None or len(spec) != x.ndim:
        return None, None
    return sharding.mesh, spec


class Head(NamedTuple):
    """The teacher's head I at each position: indices [.., K], the K-th value, its last index.

    i ∈ I  ⇔  b_i > kth, or b_i = kth and i <= last (the tied entries the lowest-index rule took).
    """

    idx_k: jax.Array
    kth: jax.Array
    last: jax.Array


def teacher_head(b_v, k) -> Head | None:
    """The head of the tempered teacher logits b (None for K = 0)."""
    if k == 0:
        return None
    return head_of(*top_k(b_v, k))


class Maxima(NamedTuple):
    """Maxima over V of a and b, and over the tail only, per position (-inf where none).

    ms_tail None: reduced in `token_terms`' pass of sums, with the tail's sum (online).
    """

    m_s: jax.Array
    m_t: jax.Array
    ms_tail: jax.Array
    mt_tail: jax.Array


def pair_terms(s_v, t_v, k, temperature, merge=True) -> tuple[Head | None, TokenTerms]:
    """`head_and_terms` of `tempered_pair(s, t, τ, merge)`, from the raw logits [.., V].

    No tempered or merged copy of the logits is written: the two-level search gathers its
    candidates from s and t; on TPU at τ = 1 the Pallas kernel (`tpu_kernel`, where it
    applies) reads s and t, widens them and merges the padding in VMEM; elsewhere on TPU
    `lax.top_k` reads t (merged with s's padding) in its own dtype (widening keeps order and
    ties; dividing by τ ≠ 1 may not: values that flush to 0 or overflow become ties). XLA TPU's
    TopK does not fuse its producer.
    """
    s_v, t_v = _whole_last_axis(s_v), _whole_last_axis(t_v)
    a_v, b_v = tempered_pair(s_v, t_v, temperature, merge)
    # The Pallas kernel (`tpu_kernel`) at τ = 1 only, where a, b are s and t widened and merged:
    # it takes s and t (float32 or bf16) and widens and merges in VMEM. TPU v5p compile, jax.grad
    # of TAD/KL bytes (`scripts/bench_loss.py`, [1, 1024, 256000]): TopK 1.29x; the kernel on a
    # merged (and for bf16 widened) copy written for it, float32 1.14x, bf16 1.86x with
    # temporaries of 2.0 f32 [N, V]; in VMEM, 0.72x for both. τ = 2 keeps TopK: the kernel would
    # take tempered copies (float32: the same bytes, temporaries 0.001 -> 1.0), and a division
    # in VMEM need not round as XLA's, whose b the gradient's tail test (`in_tail`) reads.
    from tad_jax import tpu_kernel  # (imports this module)

    kernel = temperature == 1.0 and tpu_kernel.applies(s_v, t_v, k)
    if kernel and _KERNEL_INTERPRET:
        return tpu_kernel.head_and_terms(s_v, t_v, k, merge=merge, interpret=True)
    block = _head_block(b_v.shape[-1], k) if k else None
    if not kernel and (block is None or temperature != 1.0):
        return head_and_terms(a_v, b_v, k, pallas=False)

    def tpu(s_v, t_v):
        if kernel:
            return tpu_kernel.head_and_terms(s_v, t_v, k, merge=merge)
        return top_k_terms(s_v, t_v, k, merge=merge)

    def other(s_v, t_v):
        if block is None:  # V short next to K: `lax.top_k`
            return head_and_terms(a_v, b_v, k, pallas=False)

        def gather(cols):
            return tempered_pair(_take(s_v, cols), _take(t_v, cols), temperature, merge)

        return _blocked_terms(a_v, b_v, k, block, gather)

    return _on_tpu(tpu, other, s_v, t_v)


def head_and_terms(a_v, b_v, k, from_matmul=False, pallas=True) -> tuple[Head | None, TokenTerms]:
    """The teacher's head I (the top-k of b) and `token_terms(a, b, I)`, a, b: [.., V].

    `from_matmul`: a is the output of a matmul in the same program (the fused loss), whose
    epilogue XLA TPU can take the student's maxima into (`_sorted_terms`). `pallas=False`: never
    the TPU kernel (for a caller whose a, b would be written out only for it, `pair_terms`).

    Off TPU (`_on_tpu`) the two-level search (`_blocked_terms`) makes the head and the maxima
    pass of `token_terms` one pass, and the head's K values give its sums: TAD then reads the
    logits as often as KL, with KL's number of reductions. On TPU, and when V is short next to
    k, the top-(K+1) (`lax.top_k`) gives the teacher's maxima and `token_terms` reduces the
    student's, then the sums (`_sorted_terms`); on TPU, where `tpu_kernel.applies` (float32 or
    bf16, K <= 32, V fits in the chip's VMEM), a Pallas kernel does all of it from one read of a and
    b (fused TAD / fused KL bytes with whole rows 1.113x -> 1.001x; `tpu_kernel`). (None,
    terms) for K = 0.
    """
    if k == 0:
        return None, token_terms(a_v, b_v, None)
    block = _head_block(b_v.shape[-1], k)

    def sorted_terms(a_v, b_v):
        return _sorted_terms(a_v, b_v, *top_k(b_v, k + 1), from_matmul)

    from tad_jax import tpu_kernel  # (imports this module)

    kernel = pallas and tpu_kernel.applies(a_v, b_v, k)
    if kernel and _KERNEL_INTERPRET:
        return tpu_kernel.head_and_terms(a_v, b_v, k, interpret=True)

    def tpu(a_v, b_v):
        if kernel:
            return tpu_kernel.head_and_terms(a_v, b_v, k, from_matmul)
        return sorted_terms(a_v, b_v)

    if block is None:
        return _on_tpu(tpu, sorted_terms, a_v, b_v)
    return _on_tpu(tpu, lambda a, b: _blocked_terms(a, b, k, block), a_v, b_v)


# Tests: run `tpu_kernel` (Pallas' interpreter) wherever it applies, on any platform.
_KERNEL_INTERPRET = False


def top_k_terms(a_v, b_v, k, from_matmul=False, merge=False) -> tuple[Head, TokenTerms]:
    """`head_and_terms` by `lax.top_k` (`_sorted_terms`) from a, b in their own dtype (at τ = 1:
    tempered = raw): b merged with a's padding when `merge`, its top-(K+1) taken in b's dtype
    (widening keeps order and ties; XLA TPU's TopK reads it once), then both widened. XLA's
    path beside the TPU kernel: `pair_terms` and `tpu_kernel` (where the kernel does not run).
    """
    if merge:
        b_v = merge_padding(a_v, b_v)
    vals, idx = _top_k_2d(b_v, k + 1)
    return _sorted_terms(widen(a_v), widen(b_v), widen(vals), idx, from_matmul)


def _sorted_terms(a_v, b_v, vals, idx, from_matmul=False) -> tuple[Head, TokenTerms]:
    """`head_and_terms` from the teacher's top-(K+1) of b (vals, idx [.., K+1], largest first).

    Its first value is max b and its last the maximum of b's tail, so only the student's two
    maxima are left. `from_matmul` (a made by a matmul of the same program): max a as a plain
    reduction, which XLA TPU fuses into the matmul, and the tail's in the pass of sums
    (`token_terms`, online), so no pass reads b before it. Else both in one variadic reduction
    (reads a and b once): a lone max of a was XLA TPU's slowest op there (jax.grad of TAD at
    [1, 4096, 32000] bf16: 1.64 M estimated cycles, against 0.93 M for the variadic one).
    TPU v5p compile of fused TAD at V = 256000 (`scripts/bench_fused.py --tpu`): 125.2 ->
    121.0 GB accessed with rows spanning chunks, 45.7 -> 41.5 GB with whole rows (fused KL:
    101.8 and 37.3), estimated cycles 181.5 -> 175.7 M and 110.0 -> 109.7 M (KL 139.3, 113.1).
    """
    k = vals.shape[-1] - 1
    head = head_of(vals[..., :k], idx[..., :k])
    if from_matmul:
        m_s, ms_tail = jnp.max(a_v, axis=-1), None
    else:
        ninf = jnp.asarray(-jnp.inf, a_v.dtype)
        m_s, ms_tail = _reduce_v((a_v, jnp.where(in_tail(b_v, head), a_v, ninf)), -jnp.inf,
                                 jnp.maximum)
    return head, token_terms(a_v, b_v, head, Maxima(m_s, vals[..., 0], ms_tail, vals[..., k]))


def _blocked_terms(a_v, b_v, k, block, gather=None):
    """`head_and_terms` by the two-level search: the maxima of blocks of V of a and b in one
    pass; the head from the k blocks with the largest maxima of b (`_candidates`); the tail
    maxima from the other blocks' maxima and the candidates outside the head. Exact: no sort,
    no [.., V] mask. `gather(columns)`: (a, b) at those columns (default: from a_v, b_v)."""
    vocab = b_v.shape[-1]
    a_v, b_v = _whole_last_axis(a_v), _whole_last_axis(b_v)
    gather = gather or (lambda cols: (_take(a_v, cols), _take(b_v, cols)))
    bmax_s, bmax_t = _block_maxima((a_v, b_v), block)
    cidx, cols, (a_c, b_c) = _candidates(bmax_t, k, block, vocab, gather)
    vals_k, pos_k = _top_k_2d(_equal_zeros(b_c), k)
    head = head_of(vals_k, _take(cols, pos_k))
    # The blocks outside the candidates hold tail entries only.
    chosen = jnp.any(jnp.arange(bmax_t.shape[-1]) == cidx[..., None], axis=-2)
    tail_c = in_tail(b_c, head, cols)

    def tail_max(bmax, x_c):
        return jnp.maximum(jnp.max(jnp.where(chosen, -jnp.inf, bmax), axis=-1),
                           jnp.max(jnp.where(tail_c, x_c, -jnp.inf), axis=-1))

    a_k = _take(a_c, pos_k)
    ms_tail, mt_tail = tail_max(bmax_s, a_c), tail_max(bmax_t, b_c)
    m_s, m_t = _row_maxima(bmax_s, bmax_t, ms_tail, mt_tail, a_k, vals_k)
    return head, token_terms(a_v, b_v, head, Maxima(m_s, m_t, ms_tail, mt_tail), (a_k, vals_k))


def _row_maxima(bmax_s, bmax_t, ms_tail, mt_tail, a_k, b_k):
    """max a and max b per position: the maxima of the block maxima, or (on CPU) the larger of
    the tail's and the head's (a_k, b_k: the head's K values, b_k largest first); equal values.

    XLA CPU rewrites a max of block maxima into one more pass over a and b (jax.grad of TAD at
    [8, 512, 32000] f32, 2 cores: 1040-1100 -> 990-1020 ms, TAD/KL 1.36x -> 1.31x in
    `scripts/bench_loss.py`, two runs of each, interleaved). On XLA GPU the other form made
    the block-maxima fusion write the student's padding mask out (H100 compile: temporaries
    0.17 -> 0.34 f32 [N, V] at [1, 4096, 32000]; `scripts/bench_loss.py --gpu_target h100:1`).
    """
    def from_head(ms_tail, mt_tail, a_k, b_k):
        return jnp.maximum(ms_tail, jnp.max(a_k, axis=-1)), jnp.maximum(mt_tail, b_k[..., 0])

    return jax.lax.platform_dependent(
        ms_tail, mt_tail, a_k, b_k, cpu=from_head,
        default=lambda *_: (jnp.max(bmax_s, axis=-1), jnp.max(bmax_t, axis=-1)))


def head_of(vals_k, idx_k) -> Head:
    """The `Head` of a `top_k` result (values largest first, ties in index order)."""
    kth = vals_k[..., -1]
    last = jnp.max(jnp.where(vals_k == kth[..., None], idx_k, -1), axis=-1)
    return Head(idx_k, kth, last)


def in_tail(b_v, head: Head | None, idx_v=None):
    """True on the tail (i ∉ I), elementwise from b's values: fused into its consumer. `idx_v`:
    the vocabulary index of each entry of b_v (default: its position on the last axis)."""
    if head is None:
        return jnp.ones(b_v.shape, bool)
    if idx_v is None:
        idx_v = jax.lax.broadcasted_iota(jnp.int32, b_v.shape, b_v.ndim - 1)
    kth, last = head.kth[..., None], head.last[..., None]
    return (b_v < kth) | ((b_v == kth) & (idx_v > last))


# ------------------------------------------------------------------------------- the kernel


class TokenTerms(NamedTuple):
    """Per-position TAD terms (float32 [...]): the spec's pieces and what the gradient needs."""

    kl1: jax.Array  # D_KL1: K head terms + the (K+1)-th bucket α_T log(α_T / α_S)
    kl2: jax.Array  # D_KL2: KL of the renormalised tails (0 where α_T = 0)
    log_alpha_t: jax.Array  # log α_T
    log_alpha_s: jax.Array  # log α_S
    # The log-partitions as (row maximum m, log Σ e^(x − m)): lse = m + log_z. Kept apart so that
    # the gradient takes exp((a − m) − log_z), offset-free (a − m is exact near the maximum).
    m_s: jax.Array  # max a (0 where a is all -inf)
    m_t: jax.Array  # max b (likewise)
    log_zs: jax.Array  # logsumexp(a) − m_s
    log_zt: jax.Array  # logsumexp(b) − m_t
    rel_tail_s: jax.Array  # logsumexp of a over the tail − m_s

    @property
    def kl(self):
        """KL(p_T || p_S) = D_KL1 + α_T·D_KL2 (Eq. 2)."""
        return self.kl1 + jnp.exp(self.log_alpha_t) * self.kl2


def token_terms(a_v, b_v, head: Head | None, maxima: Maxima | None = None,
                head_ab=None) -> TokenTerms:
    """TAD's per-position terms from tempered logits a, b (`tempered_pair`) and the head I.

    Two passes over [.., V] (with a head, each one variadic reduction, `_reduce_v`; for K = 0
    plain reductions, which XLA TPU fuses with the fused loss's logits matmul: fused KL 101.8
    instead of 110.1 GB accessed in `scripts/bench_fused.py --tpu`), then [..] arithmetic:
      maxima  m_s = max a, m_t = max b, and over the tail only m̃_s, m̃_t
      sums    Z_s = Σ e^(a − m_s), Z_t = Σ e^(b − m_t), Z̃_s = Σ_tail e^(a − m̃_s),
              Z̃_t = Σ_tail e^(b − m̃_t), C̃ = Σ_tail e^(b − m̃_t)·δ, H_0 = Σ_I e^(b − m_t),
              H_1 = Σ_I e^(b − m_t)·δ,  with δ = (b − m_t) − (a − m_s) (row offsets cancel)
      lse(a) = log Z_s + m_s, lse(b) = log Z_t + m_t, lse_tail likewise from Z̃, m̃
      α_T = exp(lse_tail(b) − lse(b)),  α_S = exp(lse_tail(a) − lse(a))        (log space)
      D_KL2 = Σ_tail p̃_T (log p̃_T − log p̃_S)
            = C̃/Z̃_t − (lse_tail(b) − m_t) + (lse_tail(a) − m_s)   (each bracket from Z̃, m̃ − m)
      D_KL1 = Σ_I p_T (log p_T − log p_S) + α_T (log α_T − log α_S)
            = (H_1 − (log Z_t − log Z_s)·H_0)/Z_t + α_T (log α_T − log α_S)
    With `head` None (K = 0) the tail is everything: D_KL1 = 0, D_KL2 = KL.
    `maxima` (optional): the first pass, done already (`_blocked_terms`); its m̃_s may be None,
    then m̃_s and Z̃_s come from the pass of sums (`_reduce_lse_v`). `head_ab` (optional):
    (a, b) at the head's indices [.., K]; then the pass of sums takes the tail's three only (as
    KL's three), and Z_s = e^(m̃_s − m_s)·Z̃_s + Σ_I e^(a − m_s), Z_t = e^(m̃_t − m_t)·Z̃_t + H_0,
    H_0 and H_1 from the K values (sums of positive terms: no cancellation).
    """
    tail_v = None if head is None else in_tail(b_v, head)
    if maxima is None:
        maxima = _maxima(a_v, b_v, tail_v)
    # The maxima are shifts only: lse = log Σ e^(x − m) + m does not depend on m (no gradient).
    shift = lambda m: jax.lax.stop_gradient(finite_shift(m))
    m_s, m_t, mt_tail = shift(maxima.m_s), shift(maxima.m_t), shift(maxima.mt_tail)
    if tail_v is None:
        es_v, et_v = jnp.exp(a_v - m_s[..., None]), jnp.exp(b_v - m_t[..., None])
        zs, zt, cross = _reduce_each((es_v, et_v, _times(et_v, _delta(a_v, b_v, m_s, m_t))),
                                     0.0, jnp.add)
        ms_tail, zs_tail, zt_tail, h0, h1 = m_s, zs, zt, 0.0, 0.0
    else:
        sums_v = tail_summands(a_v, b_v, tail_v, m_s, m_t, mt_tail, head_ab is None)
        ms_tail = None if maxima.ms_tail is None else shift(maxima.ms_tail)
        ms_tail, zs_tail, sums = _tail_lse_and_sums(a_v, tail_v, ms_tail, sums_v)
        ms_tail = shift(ms_tail)
        zt_tail, cross = sums[:2]
        if head_ab is None:
            zs, zt, h0, h1 = sums[2:]
        else:  # the head's sums from its K values; Z = (the tail's, rescaled) + (the head's)
            a_k, b_k = head_ab
            eh_k = jnp.exp(b_k - m_t[..., None])
            h0 = jnp.sum(eh_k, -1)
            h1 = jnp.sum(_times(eh_k, (b_k - m_t[..., None]) - (a_k - m_s[..., None])), -1)
            zs = _rescale(zs_tail, ms_tail - m_s) + jnp.sum(jnp.exp(a_k - m_s[..., None]), -1)
            zt = _rescale(zt_tail, mt_tail - m_t) + h0
    return finish_terms(Sums(zs, zt, zs_tail, zt_tail, cross, h0, h1), m_s, m_t, ms_tail,
                        mt_tail, head is not None)


class Sums(NamedTuple):
    """The pass of sums of `token_terms`, per position (f32 [..]):
    Z_s, Z_t, Z̃_s, Z̃_t, C̃, H_0, H_1."""

    zs: jax.Array
    zt: jax.Array
    zs_tail: jax.Array
    zt_tail: jax.Array
    cross: jax.Array
    h0: jax.Array
    h1: jax.Array


def finish_terms(sums: Sums, m_s, m_t, ms_tail, mt_tail, with_head=True) -> TokenTerms:
    """`TokenTerms` from the pass of sums and the (finite-shifted) maxima: [..] arithmetic only,
    the Eq. 2-3 formulas of `token_terms`' docstring. Shared by `token_terms` and the TPU kernel
    (`tpu_kernel`), which makes the sums itself. `with_head` False: K = 0 (α ≡ 1, D_KL1 = 0)."""
    zs, zt, zs_tail, zt_tail, cross, h0, h1 = sums
    log_zs, log_zt = jnp.log(zs), jnp.log(zt)
    # Tail logsumexps relative to the row maxima (rel = lse_tail − m), so that no difference of
    # two absolute logsumexps brings the logits' offset back in (f32 at |logits| ~ 1e4).
    rel_s, rel_t = jnp.log(zs_tail) + (ms_tail - m_s), jnp.log(zt_tail) + (mt_tail - m_t)
    # A position where the teacher has no entry left (all -inf, or all the student's padding)
    # has no distribution: every term is 0 and, for K ≥ 1, α_T = α_S = 0 (Σ over the tail of a
    # zero p_T), not 0/0 = NaN. For K = 0, α ≡ 1 (the tail is V), so β(X) stays β (KL exact).
    empty = zt == 0
    if not with_head:
        log_alpha_t = log_alpha_s = jnp.zeros_like(log_zt)
    else:
        log_alpha_t = log_share(rel_t, log_zt)  # (log_zt = -inf exactly where empty)
        log_alpha_s = jnp.where(empty, -jnp.inf, rel_s - log_zs)
    has_tail = zt_tail > 0  # α_T = 0: the tail terms are 0 (the limit x log x -> 0), not NaN
    kl2 = jnp.where(has_tail, cross / jnp.where(has_tail, zt_tail, 1.0) - rel_t + rel_s, 0.0)
    kl1 = jnp.where(has_tail, jnp.exp(log_alpha_t) * (log_alpha_t - log_alpha_s), 0.0)
    if with_head:
        # (h0 = h1 = 0 where empty; the selects keep -inf and 0/0 out of both branches.)
        log_ratio = jnp.where(empty, 0.0, log_zt - log_zs)
        kl1 = kl1 + (h1 - log_ratio * h0) / jnp.where(empty, 1.0, zt)
    return TokenTerms(kl1, kl2, log_alpha_t, log_alpha_s, m_s, m_t, log_zs, log_zt, rel_s)


def _delta(a_v, b_v, m_s, m_t):
    """δ = (b − m_t) − (a − m_s): log p_T − log p_S up to the row constants (which cancel).
    b > -inf implies a > -inf (`tempered_pair`), so δ is finite wherever e^b > 0."""
    return (b_v - m_t[..., None]) - (a_v - m_s[..., None])


def tail_summands(a_v, b_v, tail_v, m_s, m_t, mt_tail, with_head_sums=True):
    """The summands of the pass of sums (elementwise, [.., V] or any block of V): (e^(b − m̃_t),
    e^(b − m̃_t)·δ) over the tail, and with `with_head_sums` (e^(a − m_s), e^(b − m_t),
    e^(b − m_t), e^(b − m_t)·δ over the head): summed over V they are Z̃_t, C̃, Z_s, Z_t, H_0,
    H_1 of `token_terms` (maxima finite-shifted). Z̃_s's summand: `student_tail_summand`."""
    delta_v = _delta(a_v, b_v, m_s, m_t)
    ett_v = jnp.where(tail_v, jnp.exp(b_v - mt_tail[..., None]), 0.0)
    sums_v = (ett_v, _times(ett_v, delta_v))
    if with_head_sums:
        es_v, et_v = jnp.exp(a_v - m_s[..., None]), jnp.exp(b_v - m_t[..., None])
        eh_v = jnp.where(tail_v, 0.0, et_v)
        sums_v += (es_v, et_v, eh_v, _times(eh_v, delta_v))
    return sums_v


def student_tail_summand(a_v, tail_v, ms_tail):
    """e^(a − m̃_s) over the tail, 0 on the head: summed over V, Z̃_s (m̃_s finite-shifted)."""
    return jnp.where(tail_v, jnp.exp(a_v - ms_tail[..., None]), 0.0)


def _tail_lse_and_sums(a_v, tail_v, ms_tail, sums_v):
    """(m̃_s, Z̃_s, the sums of sums_v) in one pass: the student's tail as (max, Σ e^(a − max))
    and each of sums_v summed over V. ms_tail None: the tail's maximum is not known yet, so
    both come from one online reduction (`_reduce_lse_v`); else (finite) Z̃_s = Σ_tail
    e^(a − m̃_s)."""
    if ms_tail is None:
        return _reduce_lse_v(jnp.where(tail_v, a_v, -jnp.inf), sums_v)
    *sums, zs_tail = _reduce_v((*sums_v, student_tail_summand(a_v, tail_v, ms_tail)), 0.0,
                               jnp.add)
    return ms_tail, zs_tail, sums


def _maxima(a_v, b_v, tail_v) -> Maxima:
    """`Maxima` in one pass over a and b (tail_v None: the tail is everything)."""
    if tail_v is None:  # (K = 0: plain reductions, see `token_terms`)
        m_s, m_t = _reduce_each((a_v, b_v), -jnp.inf, jnp.maximum)
        return Maxima(m_s, m_t, m_s, m_t)
    ninf = jnp.asarray(-jnp.inf, a_v.dtype)
    return Maxima(*_reduce_v((a_v, b_v, jnp.where(tail_v, a_v, ninf), jnp.where(tail_v, b_v, ninf)),
                             -jnp.inf, jnp.maximum))


def _rescale(z, shift):
    """z·e^shift, 0 where z = 0 (whatever the shift of an empty tail)."""
    return jnp.where(z > 0, z * jnp.exp(jnp.where(z > 0, shift, 0.0)), 0.0)


def _times(e_v, x_v):
    """e·x with 0 where e = 0 (so e^(-inf)·inf padding terms are 0, not NaN)."""
    return jnp.where(e_v > 0, e_v * x_v, 0.0)


def _reduce_v(xs_v, init, op):
    """op-reductions of several [.., V] arrays over V (op: jnp.add or jnp.maximum).

    Accelerators: ONE variadic reduce, i.e. one pass that reads the logits once; XLA TPU did not
    fuse the separate reductions into one loop (TPU v5p compile, `scripts/bench_loss.py`: jax.grad
    of TAD at [1, 4096, 32000] moved 12.0 -> 9.0 f32 [N, V] tensors' worth of bytes, KL 7.0).
    XLA CPU (isolated here): separate reductions, which it vectorises; the variadic reduce made
    jax.grad of KL 2.1x slower there (2 cores, [8, 512, 32000] f32).
    """
    xs_v = tuple(jnp.asarray(x) for x in xs_v)
    axis = xs_v[0].ndim - 1

    def variadic(*xs):
        inits = tuple(jnp.asarray(init, x.dtype) for x in xs)
        return tuple(jax.lax.reduce(xs, inits, lambda x, y: tuple(map(op, x, y)), (axis,)))

    return jax.lax.platform_dependent(*xs_v, cpu=lambda *xs: _reduce_each(xs, init, op),
                                      default=variadic)


def _reduce_lse_v(x_v, sums_v):
    """(max x, Σ e^(x − max x), the sums of sums_v) over V in ONE variadic reduce (online).

    Partial results (m₁, z₁), (m₂, z₂) merge as (max, z₁ + z₂·e^(m₂ − m₁)) when m₁ ≥ m₂ (and
    symmetrically): one exp per merge, and no shift is needed before the pass. An entry is
    (x, 1), or (-inf, 0) where x = -inf; so z = 0 where x is all -inf. Exact up to rounding, at
    any distance of x from the other maxima (unlike a shift by the row's max). The same reduce
    on every platform: on CPU only short vocabularies reach it (`head_and_terms`).
    """
    x_v = widen(x_v)
    dtype, axis = x_v.dtype, x_v.ndim - 1
    one_v = (x_v > -jnp.inf).astype(dtype)
    n = len(sums_v)

    def merge(p, q):
        (m1, z1), (m2, z2) = p[n:], q[n:]
        first = m1 >= m2
        e = jnp.exp(jnp.where(m1 == m2, 0.0, -jnp.abs(m1 - m2)))  # (-inf, -inf): e^0, z = 0
        lse = (jnp.maximum(m1, m2), jnp.where(first, z1 + z2 * e, z1 * e + z2))
        return tuple(u + w for u, w in zip(p[:n], q[:n], strict=True)) + lse

    operands = (*(jnp.asarray(x, dtype) for x in sums_v), x_v, one_v)
    inits = tuple(jnp.asarray(v, dtype) for v in (0.0,) * n + (-jnp.inf, 0.0))
    *sums, m, z = jax.lax.reduce(operands, inits, merge, (axis,))
    return m, z, sums


def _reduce_each(xs_v, init, op):
    """`_reduce_v` as separate reductions (op: jnp.add or jnp.maximum; `init` is its identity)."""
    del init
    reduce_one = jnp.sum if op is jnp.add else jnp.max
    return tuple(reduce_one(x, axis=-1) for x in xs_v)


def teacher_log_alpha(b_v, head: Head | None):
    """log α_T alone (two passes over b, as `token_terms`); -inf where b has no entry left."""
    if head is None:
        return jnp.zeros(b_v.shape[:-1], b_v.dtype)
    tail_v = in_tail(b_v, head)
    m, m_tail = (finite_shift(x) for x in _reduce_v(
        (b_v, jnp.where(tail_v, b_v, -jnp.inf)), -jnp.inf, jnp.maximum))
    z, z_tail = _reduce_v((jnp.exp(b_v - m[..., None]),
                           jnp.where(tail_v, jnp.exp(b_v - m_tail[..., None]), 0.0)),
                          0.0, jnp.add)
    # Offset-free, as in `token_terms`; -inf where b is all -inf (a position with no entry).
    return log_share(jnp.log(z_tail) + (m_tail - m), jnp.log(z))


def token_grad(a_v, b_v, head: Head | None, terms: TokenTerms, gamma):
    """Eq. 6: ∂L_DIV/∂a = p_S − p_T + [i ∉ I]·γ·(α_T·p̃_S,i − p_T,i), float32 [.., V].

    γ = β(X) − 1 per position ([...]; L_DIV = KL + γ·α_T·D_KL2). A function of the logits and
    per-position scalars only (no [.., V] residual). α_T·p̃_S,i = exp(a_i − lse_tail(a) + log α_T)
    in log space: exact when both tails are tiny. Every exponent is taken relative to the row
    maxima (offset-free: at |logits| ~ 1e4 in float32 an absolute logsumexp is off by its ulp,
    1e-3). Padded entries get 0.
    """
    rel_a_v = a_v - terms.m_s[..., None]
    # Σ p_T = 0 where the teacher has no entry left: KL is 0 whatever the student, so is its
    # gradient p_S·Σ p_T − p_T (an infinite shift makes p_S 0 there).
    log_zs = jnp.where(jnp.isneginf(terms.log_zt), jnp.inf, finite_shift(terms.log_zs))
    ps_v = jnp.exp(rel_a_v - log_zs[..., None])
    pt_v = jnp.exp((b_v - terms.m_t[..., None]) - finite_shift(terms.log_zt)[..., None])
    grad_v = ps_v - pt_v
    if head is None:  # the tail is everything: α_T·p̃_S = p_S
        return (1.0 + gamma)[..., None] * grad_v
    shift = jnp.where(jnp.isfinite(terms.log_alpha_t) & jnp.isfinite(terms.rel_tail_s),
                      terms.log_alpha_t - terms.rel_tail_s, -jnp.inf)
    tail_v = jnp.exp(rel_a_v + shift[..., None]) - pt_v
    return grad_v + jnp.where(in_tail(b_v, head), gamma[..., None] * tail_v, 0.0)


# ------------------------------------------------------------------------------- β(X)


def beta_x(log_alpha_t, mask, cfg: TADConfig, segment_ids=None):
    """β(X) = β / max(ᾱ(X), eps_alpha) at every position [..., T] (Eq. 3).

    ᾱ(X) is the mean teacher tail mass over the valid positions of the sequence X holding the
    position: the row (the last axis) for `cfg.beta_scope == "row"`, or, for "segment", the
    positions of the row with the same `segment_ids` (one document of a packed row; any
    integers, not only the pipeline's [0, T]). Teacher-only: a constant for differentiation. A
    sequence with no valid position gets β/eps_alpha, which multiplies only zeros.

    Args:
      log_alpha_t: float [..., T], log α_T per position.
      mask: float 0/1 [..., T], 1 = the position counts.
      cfg: the TAD settings.
      segment_ids: int [..., T] (needed for "segment").

    Raises:
      ValueError: beta_scope "segment" without segment_ids.
    """
    alpha = jnp.where(mask > 0, jnp.exp(log_alpha_t), 0.0)
    if cfg.beta_scope == "row":
        mean = jnp.sum(alpha, -1, keepdims=True) / jnp.maximum(jnp.sum(mask, -1, keepdims=True), 1)
        return jnp.broadcast_to(cfg.beta / jnp.maximum(mean, cfg.eps_alpha), alpha.shape)
    if segment_ids is None:
        raise ValueError('beta_scope="segment" needs segment_ids ([..., T], one id per document '
                         'of a packed row); pass them, or use beta_scope="row".')
    like, t = alpha, alpha.shape[-1]
    # Sorts and sums along T: T whole (gathered where it is explicitly sharded), then back.
    alpha, mask, ids = (_whole_last_axis(jnp.asarray(x)) for x in (alpha, mask, segment_ids))
    # (+ zeros like α: the ids and the mask take α's sharding, which the vmap below needs;
    # a mask of None made by `losses` is unsharded.)
    seg = _dense_ids((ids + jnp.zeros_like(alpha, ids.dtype)).reshape(-1, t))
    valid = jnp.where(mask > 0, jnp.ones_like(alpha), jnp.zeros_like(alpha))
    sums = jax.vmap(lambda x, s: jax.ops.segment_sum(x, s, num_segments=t))
    alpha_sum = sums(alpha.reshape(-1, t), seg)
    count = sums(valid.reshape(-1, t), seg)
    mean = jnp.take_along_axis(alpha_sum / jnp.maximum(count, 1.0), seg, axis=-1)
    beta = cfg.beta / jnp.maximum(mean, cfg.eps_alpha)
    return _sharded_like(beta.reshape(like.shape), like)


def _dense_ids(ids_rt):
    """Each id's rank among its row's distinct ids, int [R, T] in [0, T).

    Any integers name documents (a clip into [0, T] merged those outside it, e.g. 100 and 200,
    or -1 and -2). Sorts along T only, batched (a vmapped searchsorted failed on rows sharded
    over Explicit mesh axes).
    """
    order = jnp.argsort(ids_rt, axis=-1)
    sorted_ids = jnp.take_along_axis(ids_rt, order, axis=-1)
    starts = jnp.concatenate([jnp.zeros_like(sorted_ids[:, :1], bool),
                              sorted_ids[:, 1:] != sorted_ids[:, :-1]], axis=-1)
    rank = jnp.cumsum(starts.astype(jnp.int32), axis=-1)
    return jnp.take_along_axis(rank, jnp.argsort(order, axis=-1), axis=-1)


def _sharded_like(x, like):
    """x resharded as `like` where their explicit shardings differ (`_whole_last_axis` undone)."""
    mesh, spec = _explicit_spec(like)
    if spec is None or _explicit_spec(x)[1] == spec:
        return x
    return jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, spec))
