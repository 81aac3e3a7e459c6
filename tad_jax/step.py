"""The optimizer, the train state and the pure step functions (jit them with shardings).

Public API:
- `make_optimizer(config, total_steps) -> (optax transform, lr schedule)`
- `split_trainable(params, mask)`, `merge_trainable(train, frozen)`, `init_state(params, mask, tx)`,
  `state_shardings(abstract_state, param_shardings, mesh)`
- `make_train_step(...)`: `train_step(state, batch, teacher_params) -> (state, metrics)`; the
  metrics are `METRIC_KEYS`
- `make_eval_step(...)`: `eval_step(student_params, teacher_params, batch) -> sums`;
  `finalize_eval(sums)` -> the `eval_*` scalars of metrics.jsonl

Shapes: `_bt` = [batch, T], `_abt` = [micro-batches, batch / micro-batches, T], `_btv` = [B, T, V].

The train state is a dict `{"step", "params", "opt_state"}`: `params` holds every student
parameter (frozen ones included, so a checkpoint is a complete student), `opt_state` only covers
the trainable ones (frozen leaves are `None` in the tree the optimizer sees, so Adam stores no
moments for them and no gradient is computed for them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from tad_jax import losses, sharding
from tad_jax.models import lm_head

_DECAYED = ("kernel", "embedding")  # the param names that get weight decay
METRIC_KEYS = ("loss", "clm_loss", "div_loss", "cosine_loss", "grad_norm", "lr", "valid_tokens")


# ---------------------------------------------------------------------------------------------
# Optimizer and state


def make_optimizer(config, total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
    """AdamW (decay on matrices only) with warmup + cosine decay and global-norm clipping.

    The optimizer sees only trainable params (frozen leaves are None), so it keeps no state for
    the frozen ones.
    """
    o = config.opt
    warmup = min(o.warmup_steps, max(total_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=o.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=o.lr * o.min_lr_ratio)
    tx = optax.chain(
        optax.clip_by_global_norm(o.clip_norm) if o.clip_norm > 0 else optax.identity(),
        optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                    mask=_decay_mask),
    )
    return tx, schedule


def _decay_mask(params):
    """True on weight matrices (kernels, embeddings), False on norm scales and biases: by name,
    since rank does not tell them apart (q/k/v biases are [heads, head_dim], scanned layers
    stack norms into [layers, d])."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _param_key(path)[-1] in _DECAYED, params)


def split_trainable(params, mask):
    """(trainable, frozen): two trees shaped like params, None where the other holds the leaf."""
    train = jax.tree.map(lambda p, m: p if m else None, params, mask)
    frozen = jax.tree.map(lambda p, m: None if m else p, params, mask)
    return train, frozen


def merge_trainable(train, frozen):
    """Inverse of `split_trainable`."""
    return jax.tree.map(lambda a, b: b if a is None else a, train, frozen,
                        is_leaf=lambda x: x is None)


def init_state(params, mask, tx) -> dict:
    """The train state of freshly initialised params."""
    train, _ = split_trainable(params, mask)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(train)}


def state_shardings(abstract_state, param_shardings, mesh):
    """Shardings of the state: params as given, optimizer moments like their params."""
    rep = sharding.replicated(mesh)
    by_shape = {}

    def opt_leaf(path, leaf):
        # Adam's mu/nu have the param's path as a suffix; scalars (counts) are replicated.
        if getattr(leaf, "ndim", 0) == 0:
            return rep
        key = _param_key(path)
        return by_shape.get(key, rep)

    flat, _ = jax.tree_util.tree_flatten_with_path(param_shardings)
    for path, s in flat:
        by_shape[_param_key(path)] = s
    opt = jax.tree_util.tree_map_with_path(opt_leaf, abstract_state["opt_state"])
    return {"step": rep, "params": param_shardings, "opt_state": opt}


def _param_key(path) -> tuple:
    """The trailing dict keys of a tree path (the param's name inside the params tree)."""
    keys = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
    return tuple(keys)


# ---------------------------------------------------------------------------------------------
# The step


def make_train_step(config, student_model, teacher_model, mask, tx, schedule, vocab_size,
                    mesh=None):
    """The pure step `train_step(state, batch, teacher_params) -> (state, metrics)`.

    Gradient accumulation is a `lax.scan` over micro-batches inside the step rather than
    `optax.MultiSteps`: the summed per-token losses are divided once by the valid tokens of the
    whole batch, so the update equals the one of the unsplit batch (MultiSteps would average
    per-micro-batch means, weighting tokens unequally when padding differs), and the host
    dispatches one call per optimizer step.
    """
    lo = config.loss
    accum = int(config.opt.grad_accum_steps)
    head_trainable = _head_trainable(student_model.config, mask)
    # Built once from the config: the step itself never branches on fused / unfused.
    make = _fused_loss if lo.fused else _unfused_loss
    loss_fn = make(lo, student_model.config, teacher_model.config, vocab_size, head_trainable)

    def micro_loss(train_p, frozen_p, mb, teacher_params):
        params = merge_trainable(train_p, frozen_p)
        fwd = dict(segment_ids=mb["segment_ids"], positions=mb["positions"],
                   return_logits=not lo.fused)
        if config.data.get("teacher_cache") and not config.data.get("teacher_cache_online"):
            # The cached teacher's statistics replace its forward pass.
            from tad_jax.teacher_cache.loss import cached_distillation_loss

            s_out = student_model.apply({"params": params}, mb["input_ids"], **fwd)
            total, parts = cached_distillation_loss(s_out, mb, lo, student_model.config, params,
                                                    vocab_size)
            return total, jnp.stack([total, parts["clm"], parts["div"], parts["cosine"]])
        t_out = teacher_model.apply({"params": teacher_params}, mb["input_ids"], **fwd)
        s_out = student_model.apply({"params": params}, mb["input_ids"], **fwd)
        total, parts = loss_fn(params, s_out, teacher_params, t_out, mb)
        return total, jnp.stack([total, parts["clm"], parts["div"], parts["cosine"]])

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(state, batch, teacher_params):
        train_p, frozen_p = split_trainable(state["params"], mask)
        n_valid = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
        if accum == 1:
            (_, sums), grads = grad_fn(train_p, frozen_p, batch, teacher_params)
        else:
            micro = _split_micro(batch, accum, mesh)

            def body(carry, mb):
                (_, s), g = grad_fn(train_p, frozen_p, mb, teacher_params)
                return jax.tree.map(jnp.add, carry, (g, s)), None

            zeros = (jax.tree.map(jnp.zeros_like, train_p), jnp.zeros(4, jnp.float32))
            (grads, sums), _ = jax.lax.scan(body, zeros, micro)
        grads = jax.tree.map(lambda g: g / n_valid, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], train_p)
        train_p = optax.apply_updates(train_p, updates)
        means = sums / n_valid
        metrics = dict(loss=means[0], clm_loss=means[1], div_loss=means[2], cosine_loss=means[3],
                       grad_norm=optax.tree.norm(grads), lr=schedule(state["step"]),
                       valid_tokens=n_valid)
        new_state = {"step": state["step"] + 1, "params": merge_trainable(train_p, frozen_p),
                     "opt_state": opt_state}
        return new_state, metrics

    return train_step


def _head_trainable(student_cfg, mask) -> bool:
    """Whether the student's output head trains (a tied head follows the embeddings' mask)."""
    if student_cfg.tie_word_embeddings:
        return bool(mask["embed"]["embedding"])
    return bool(mask["lm_head"]["kernel"])


def _loss_settings(lo, mb):
    """TAD's validated settings and the segment ids they need (None for beta_scope "row")."""
    from tad_jax.config import tad_config

    tad = tad_config(lo)
    return tad, (mb["segment_ids"] if tad.beta_scope == "segment" else None)


def _unfused_loss(lo, s_cfg, t_cfg, vocab_size, head_trainable):
    """Eq. 4 (+ cosine) from the models' [B, T, V] logits, sliced to the shared vocabulary."""
    del t_cfg, head_trainable
    use_hidden = lo.cosine_weight > 0
    # A head without a bias gives finite logits; a bias may carry -inf padding (as the fused
    # loss allows), which the divergence must then drop from both sides.
    student_padding = bool(s_cfg.lm_head_bias)

    def loss_fn(s_params, s_out, t_params, t_out, mb):
        del s_params, t_params
        tad, seg = _loss_settings(lo, mb)
        t_hidden = jax.lax.stop_gradient(t_out.hidden_states)
        return losses.distillation_loss(
            s_out.logits[..., :vocab_size], jax.lax.stop_gradient(t_out.logits[..., :vocab_size]),
            mb["targets"], mb["loss_mask"], divergence=lo.divergence, top_k=tad.top_k,
            beta=tad.beta, temperature=tad.temperature, eps_alpha=tad.eps_alpha,
            beta_scope=tad.beta_scope, segment_ids=seg, jsd_weight=lo.jsd_weight,
            cosine_weight=lo.cosine_weight,
            student_hidden=s_out.hidden_states if use_hidden else None,
            teacher_hidden=t_hidden if use_hidden else None, reduction="sum",
            student_padding=student_padding)

    return loss_fn


def _fused_loss(lo, s_cfg, t_cfg, vocab_size, head_trainable):
    """Eq. 4 from hidden states and output heads in token chunks (tad_jax.fused): no [B, T, V]
    logits are ever materialised. The cosine term is added here (the fused loss has none). A
    frozen head (the paper's frozen, tied embeddings) skips the [d, V] head gradient altogether."""
    from tad_jax import fused
    from tad_jax.models import lm_head

    cut = lambda b: None if b is None else b[:vocab_size]

    def loss_fn(s_params, s_out, t_params, t_out, mb):
        tad, seg = _loss_settings(lo, mb)
        s_hidden, t_hidden = s_out.hidden_states, jax.lax.stop_gradient(t_out.hidden_states)
        w_s, b_s = lm_head(s_cfg, s_params)
        w_t, b_t = jax.tree.map(jax.lax.stop_gradient, lm_head(t_cfg, t_params))
        total, parts = fused.fused_distillation_loss(
            s_hidden, w_s[:, :vocab_size], t_hidden, w_t[:, :vocab_size], mb["targets"],
            mb["loss_mask"], divergence=lo.divergence, config=tad, segment_ids=seg,
            chunk_size=lo.chunk_size, student_bias=cut(b_s), teacher_bias=cut(b_t),
            final_logit_softcap=s_cfg.final_logit_softcap, reduction="sum",
            student_head_grad=head_trainable)
        cos = jnp.zeros((), jnp.float32)
        if lo.cosine_weight > 0:
            cos = losses.cosine_hidden_loss(s_hidden, t_hidden, mb["loss_mask"], reduction="sum")
            total = total + lo.cosine_weight * cos
        return total, {"clm": parts["clm"], "div": parts["div"],
                       "cosine": jax.lax.stop_gradient(cos)}

    return loss_fn


def _split_micro(batch, accum: int, mesh):
    """[B, T] -> [accum, B / accum, T], micro-batch a = rows a, a + accum, ...

    Strided rows keep every micro-batch spread over all batch shards (each device's contiguous
    block of rows contributes B / (accum * shards) rows to each micro-batch).
    """
    def split(x):
        b = x.shape[0]
        y = jnp.swapaxes(x.reshape((b // accum, accum) + x.shape[1:]), 0, 1)
        if mesh is not None:
            spec = jax.sharding.PartitionSpec(None, sharding.BATCH_AXES)
            y = jax.lax.with_sharding_constraint(y, jax.sharding.NamedSharding(mesh, spec))
        return y

    return jax.tree.map(split, batch)


def make_eval_step(student_model, teacher_model, vocab_size, *, tail_ks=None, ece_bins=10,
                   chunk_size=None):
    """`eval_step(student_params, teacher_params, batch) -> dict of float32 sums`.

    The sums are `tad_jax.metrics.eval_sums` (held-out KL, CE, top-1 agreement, mismatch, tail
    mass for each K in `tail_ks` (None: the paper's), Full-ECE statistics over `ece_bins` bins);
    add them over batches, then `finalize_eval` (or `metrics.finalize`).

    `chunk_size` (tokens; None = all at once): the heads are applied to blocks of about that many
    tokens (`max(1, chunk_size // B)` positions of every row) inside a `lax.scan` and the sums are
    added block by block, so no [B, T, V] logits exist (what `loss.fused=True` runs use: two
    float32 [8, 2048, 256000] logits are 33.6 GB). The sums are the same up to float32 rounding.
    """
    from tad_jax import metrics

    tail_ks = metrics.DEFAULT_TAIL_KS if tail_ks is None else tuple(tail_ks)
    sums_of = functools.partial(metrics.eval_sums, tail_ks=tail_ks, ece_bins=ece_bins)

    def eval_step(student_params, teacher_params, batch):
        fwd = dict(segment_ids=batch["segment_ids"], positions=batch["positions"],
                   return_logits=chunk_size is None)
        t = teacher_model.apply({"params": teacher_params}, batch["input_ids"], **fwd)
        s = student_model.apply({"params": student_params}, batch["input_ids"], **fwd)
        if chunk_size is None:
            return sums_of(s.logits[..., :vocab_size], t.logits[..., :vocab_size],
                           batch["targets"], batch["loss_mask"])
        heads = [(m.config, lm_head(m.config, p)) for m, p in
                 ((student_model, student_params), (teacher_model, teacher_params))]
        return _chunked_eval_sums(sums_of, heads, s.hidden_states, t.hidden_states, batch,
                                  vocab_size, chunk_size)

    return eval_step


def _chunked_eval_sums(sums_of, heads, hs_btd, ht_btd, batch, vocab_size, chunk_size):
    """`eval_sums` added over blocks of positions: [B, c, V] logits of each model at a time."""
    from tad_jax.models import head_logits

    b, t = batch["targets"].shape
    c = min(t, max(1, chunk_size // b))
    n = -(-t // c)

    def blocks(x):  # [B, T, ...] -> [n, B, c, ...], zero-padded (the mask is 0 there)
        x = jnp.pad(x, [(0, 0), (0, n * c - t)] + [(0, 0)] * (x.ndim - 2))
        return jnp.swapaxes(x.reshape((b, n, c) + x.shape[2:]), 0, 1)

    xs = (blocks(hs_btd), blocks(ht_btd), blocks(batch["targets"]), blocks(batch["loss_mask"]))

    def chunk_sums(x):
        hs, ht, tgt, mask = x
        (cs, (ws, bs)), (ct, (wt, bt)) = heads
        cut = lambda bias: None if bias is None else bias[:vocab_size]
        ls = head_logits(cs, hs, ws[:, :vocab_size], cut(bs))
        lt = head_logits(ct, ht, wt[:, :vocab_size], cut(bt))
        return sums_of(ls, lt, tgt, mask)

    body = lambda acc, x: (jax.tree.map(jnp.add, acc, chunk_sums(x)), None)
    shapes = jax.eval_shape(chunk_sums, jax.tree.map(lambda v: v[0], xs))
    acc0 = jax.tree.map(lambda z: jnp.zeros(z.shape, z.dtype), shapes)
    return jax.lax.scan(body, acc0, xs)[0]


def finalize_eval(sums: dict[str, Any]) -> dict[str, float]:
    """The `eval_*` scalars of metrics.jsonl from the summed statistics of the held-out split:
    eval_kl (KL(teacher || student), the paper's Fig. 1), eval_ce / eval_ppl (the student's
    cross-entropy on the next token), eval_top1_agreement, eval_full_ece, eval_mismatch_rate,
    eval_teacher_ce, eval_tail_mass_k{K} and eval_tokens."""
    from tad_jax import metrics

    m = metrics.finalize(sums)
    out = dict(eval_kl=m["kl"], eval_ce=m["student_ce"], eval_ppl=m["student_ppl"],
               eval_top1_agreement=m["top1_agreement"], eval_full_ece=m["full_ece"],
               eval_mismatch_rate=m["mismatch_rate"], eval_teacher_ce=m["teacher_ce"],
               eval_tokens=m["tokens"])
    out.update({f"eval_tail_mass_k{k}": v for k, v in m["tail_mass"].items()})
    return {k: float(v) for k, v in out.items()}
