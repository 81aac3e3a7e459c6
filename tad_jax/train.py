"""Distillation training: the teacher and student, the sharded train step, the loop.

Public API:
- `build_teacher(config, mesh=None) -> (teacher_model, teacher_params)`
- `build_student(config, teacher_model, teacher_params, mesh=None) -> (model, params, mask)`
- `make_optimizer(config, total_steps) -> (optax transform, lr schedule)`
- `make_train_step(...)`, `make_eval_step(...)`: pure step functions (jit them with shardings)
- `train_and_evaluate(config, workdir)`: the loop, resumable from `workdir`
- `restore_student(config, workdir, step=None) -> (student_model, student_params, step)`
- `dry_run(config) -> dict`: abstract compile on the configured mesh; parameter counts,
  per-device memory, FLOPs per token, TAD vs vanilla-KD FLOPs (the paper's Table 3 measure)
- `read_metrics(workdir)`: the records of `WORKDIR/metrics.jsonl`

Workdir layout: `checkpoints/<step>/` (orbax: state + meta JSON with the config),
`data_state/<step>/process_<i>.json`, `metrics.jsonl`, `tb/` (TensorBoard).

Shapes: `_bt` = [batch, T], `_abt` = [micro-batches, batch / micro-batches, T], `_btv` = [B, T, V].

The train state is a dict `{"step", "params", "opt_state"}`: `params` holds every student
parameter (frozen ones included, so a checkpoint is a complete student), `opt_state` only covers
the trainable ones (frozen leaves are `None` in the tree the optimizer sees, so Adam stores no
moments for them and no gradient is computed for them).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from tad_jax import losses, sharding
from tad_jax.checkpoint import (
    Checkpointer,
    check_same_config,
    load_data_state,
    prune_data_states,
    save_data_state,
)
from tad_jax.config import config_to_dict, num_steps, validate_config
from tad_jax.models import Decoder, ModelConfig

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
METRIC_KEYS = ("loss", "clm_loss", "div_loss", "cosine_loss", "grad_norm", "lr", "valid_tokens")


# ---------------------------------------------------------------------------------------------
# Models


def teacher_model_config(config: ml_collections.ConfigDict, *, full: bool = False) -> ModelConfig:
    """The teacher's architecture: from `teacher.path`'s config.json, a preset, or `teacher.model`.

    Args:
      config: the run config.
      full: ignore `dry_run.num_layers` (the configured size, not the reduced one).
    """
    t = config.teacher
    if t.path:
        with open(os.path.join(t.path, "config.json")) as f:
            cfg = ModelConfig.from_hf(json.load(f))
    elif t.preset:
        cfg = _preset(t.preset, "teacher.preset")
    else:
        cfg = ModelConfig(**dict(t.model))
    cfg = cfg.replace(remat=bool(t.remat))
    return cfg if full else _reduce_layers(cfg, config.dry_run.num_layers)


def _preset(name: str, field: str) -> ModelConfig:
    from tad_jax.models import PRESETS

    if name not in PRESETS:
        raise ValueError(f"{field}={name!r} is not a preset; choose one of {sorted(PRESETS)}.")
    return PRESETS[name]


def _reduce_layers(cfg: ModelConfig, num_layers: int) -> ModelConfig:
    """The same architecture with `num_layers` layers (dry runs of big models on small hosts)."""
    if num_layers <= 0 or num_layers >= cfg.num_layers:
        return cfg
    types = cfg.layer_types[:num_layers] if cfg.layer_types else None
    return cfg.replace(num_layers=num_layers, layer_types=types)


def _student_overrides(config: ml_collections.ConfigDict) -> dict:
    """student.overrides; num_layers shrinks in proportion when the dry run cuts the teacher's."""
    over = dict(config.student.overrides)
    if config.dry_run.num_layers > 0 and "num_layers" in over:
        full = teacher_model_config(config, full=True).num_layers
        reduced = teacher_model_config(config).num_layers
        over["num_layers"] = max(1, round(over["num_layers"] * reduced / full))
    over.update(remat=bool(config.student.remat), scan_layers=bool(config.student.scan_layers))
    return over


def _init_sharded(model: nn.Module, rng: jax.Array, mesh, seq_len: int = 8):
    """Random params of `model`, created directly in their shardings (never a full host copy)."""
    ids = jnp.zeros((1, seq_len), jnp.int32)
    init = lambda r: model.init(r, ids)["params"]
    boxed = jax.eval_shape(init, rng)
    shardings = sharding.param_shardings(boxed, mesh) if mesh is not None else None
    params = jax.jit(lambda r: sharding.unbox(init(r)), out_shardings=shardings)(rng)
    return params


def build_teacher(config: ml_collections.ConfigDict, mesh=None) -> tuple[Decoder, Any]:
    """The teacher model and its params (sharded over `mesh` when given).

    Loads `teacher.path` with `models.from_pretrained` into the param shardings, or initialises
    `teacher.preset` / `teacher.model` randomly (dry runs and tests).

    Returns:
      (teacher_model, teacher_params); params are plain arrays in `teacher.dtype`.
    """
    cfg = teacher_model_config(config)
    dtype = _DTYPES[config.teacher.dtype]
    model = Decoder(cfg, dtype=dtype, param_dtype=dtype)
    if config.teacher.path:
        from tad_jax.models import from_pretrained

        shardings = None
        if mesh is not None:
            shardings = sharding.param_shardings(_abstract_boxed(model), mesh)
        _, params = from_pretrained(config.teacher.path, dtype=dtype, shardings=shardings,
                                    remat=cfg.remat)
        return model, params
    rng = jax.random.fold_in(jax.random.key(config.seed), 1)
    return model, _init_sharded(model, rng, mesh)


def _abstract_boxed(model: nn.Module):
    ids = jnp.zeros((1, 8), jnp.int32)
    return jax.eval_shape(lambda r: model.init(r, ids)["params"], jax.random.key(0))


def build_student(config, teacher_model, teacher_params, mesh=None):
    """The student model, its params (sharded) and its trainable mask.

    `student.path` set: a pretrained student (every parameter trained). Otherwise
    `models.init_student` builds it from the teacher with `student.overrides`.

    Returns:
      (student_model, student_params, trainable_mask): the mask is a pytree of Python bools.
    """
    pdtype = _DTYPES[config.student.param_dtype]
    dtype = _DTYPES[config.student.dtype]
    if config.student.path:
        from tad_jax.models import from_pretrained

        with open(os.path.join(config.student.path, "config.json")) as f:
            scfg = ModelConfig.from_hf(json.load(f)).replace(
                remat=bool(config.student.remat), scan_layers=bool(config.student.scan_layers))
        model = Decoder(scfg, dtype=dtype, param_dtype=pdtype)
        shardings = sharding.param_shardings(_abstract_boxed(model), mesh) if mesh else None
        _, params = from_pretrained(config.student.path, dtype=pdtype, shardings=shardings,
                                    remat=scfg.remat, scan_layers=scfg.scan_layers)
        return model, params, jax.tree.map(lambda _: True, params)
    scfg, init_fn, mask = _student_init_fn(config, teacher_model.config)
    model = Decoder(scfg, dtype=dtype, param_dtype=pdtype)
    shardings = sharding.param_shardings(_abstract_boxed(model), mesh) if mesh else None
    rng = jax.random.fold_in(jax.random.key(config.seed), 2)
    params = jax.jit(init_fn, out_shardings=shardings)(teacher_params, rng)
    return model, params, mask


def _student_init_fn(config, teacher_cfg: ModelConfig):
    """(student ModelConfig, jittable init(teacher_params, rng) -> params, trainable mask).

    The mask is made of Python bools, known at trace time: one abstract trace of init_student
    yields both the config and the mask without computing anything.
    """
    from tad_jax.models import init_student

    overrides = _student_overrides(config)
    pdtype = _DTYPES[config.student.param_dtype]
    found = {}

    def init_fn(teacher_params, rng):
        scfg, params, mask = init_student(teacher_cfg, teacher_params, overrides, rng)
        found.update(config=scfg, mask=mask)
        return jax.tree.map(lambda p: p.astype(pdtype), sharding.unbox(params))

    teacher_abstract = sharding.unbox(_abstract_boxed(Decoder(teacher_cfg)))
    jax.eval_shape(init_fn, teacher_abstract, jax.random.key(0))
    return found["config"], init_fn, found["mask"]


def shared_vocab_size(config, teacher_cfg: ModelConfig, student_cfg: ModelConfig) -> int:
    """Vocabulary entries compared by the loss: `loss.vocab_size`, or the smaller model's."""
    v = config.loss.vocab_size or min(teacher_cfg.vocab_size, student_cfg.vocab_size)
    if v > min(teacher_cfg.vocab_size, student_cfg.vocab_size):
        raise ValueError(
            f"loss.vocab_size={v} exceeds a model's vocabulary (teacher "
            f"{teacher_cfg.vocab_size}, student {student_cfg.vocab_size}); lower it.")
    return v


def check_tokenizers(folders: dict[str, str], vocab_size: int) -> None:
    """Raises when two tokenizers disagree on any of the first `vocab_size` ids.

    Args:
      folders: role -> folder ("teacher", "student", "data"); folders without a tokenizer skipped.
      vocab_size: the shared vocabulary size the loss uses.

    Raises:
      ValueError: a token id maps to different strings in two tokenizers.
    """
    from transformers import AutoTokenizer

    has_tok = lambda d: d and any(os.path.exists(os.path.join(d, f))
                                  for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))
    found = {r: d for r, d in folders.items() if has_tok(d)}
    if len({os.path.realpath(d) for d in found.values()}) < 2:
        return  # nothing to compare (loading a tokenizer costs seconds)
    vocabs = {}
    for role, folder in found.items():
        tok = AutoTokenizer.from_pretrained(folder)
        vocabs[role] = {i: t for t, i in tok.get_vocab().items() if i < vocab_size}
    roles = list(vocabs)
    for other in roles[1:]:
        a, b = vocabs[roles[0]], vocabs[other]
        bad = [i for i in sorted(set(a) | set(b)) if a.get(i) != b.get(i)]
        if bad:
            i = bad[0]
            raise ValueError(
                f"The {roles[0]} and {other} tokenizers differ ({len(bad)} of the first "
                f"{vocab_size} ids, e.g. id {i}: {a.get(i)!r} vs {b.get(i)!r}). Distillation "
                "compares distributions over one shared vocabulary: use a teacher and student "
                "with the same tokenizer (and point data.tokenizer at it).")


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
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    tx = optax.chain(
        optax.clip_by_global_norm(o.clip_norm) if o.clip_norm > 0 else optax.identity(),
        optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                    mask=decay_mask),
    )
    return tx, schedule


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
    use_hidden = lo.cosine_weight > 0

    def micro_loss(train_p, frozen_p, mb, teacher_params):
        params = merge_trainable(train_p, frozen_p)
        fwd = dict(segment_ids=mb["segment_ids"], positions=mb["positions"],
                   return_logits=not lo.fused)
        t_out = teacher_model.apply({"params": teacher_params}, mb["input_ids"], **fwd)
        s_out = student_model.apply({"params": params}, mb["input_ids"], **fwd)
        t_hidden = jax.lax.stop_gradient(t_out.hidden_states)
        if lo.fused:
            total, parts = _fused_loss(lo, student_model.config, params, s_out.hidden_states,
                                       teacher_model.config, teacher_params, t_hidden, mb,
                                       vocab_size)
        else:
            t_logits = jax.lax.stop_gradient(t_out.logits[..., :vocab_size])
            total, parts = losses.distillation_loss(
                s_out.logits[..., :vocab_size], t_logits, mb["targets"], mb["loss_mask"],
                divergence=lo.divergence, top_k=lo.top_k, beta=lo.beta,
                temperature=lo.temperature, eps_alpha=lo.eps_alpha, jsd_weight=lo.jsd_weight,
                cosine_weight=lo.cosine_weight,
                student_hidden=s_out.hidden_states if use_hidden else None,
                teacher_hidden=t_hidden if use_hidden else None, reduction="sum")
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


def _fused_loss(lo, s_cfg, s_params, s_hidden, t_cfg, t_params, t_hidden, mb, vocab_size):
    """Eq. 4 from hidden states and output heads in token chunks (tad_jax.fused): no [B, T, V]
    logits are ever materialised. The cosine term is added here (the fused loss has none)."""
    from tad_jax import fused
    from tad_jax.models import lm_head

    w_s, b_s = lm_head(s_cfg, s_params)
    w_t, b_t = jax.tree.map(jax.lax.stop_gradient, lm_head(t_cfg, t_params))
    cut = lambda b: None if b is None else b[:vocab_size]
    total, parts = fused.fused_distillation_loss(
        s_hidden, w_s[:, :vocab_size], t_hidden, w_t[:, :vocab_size], mb["targets"],
        mb["loss_mask"], divergence=lo.divergence, top_k=lo.top_k, beta=lo.beta,
        temperature=lo.temperature, eps_alpha=lo.eps_alpha, chunk_size=lo.chunk_size,
        student_bias=cut(b_s), teacher_bias=cut(b_t),
        final_logit_softcap=s_cfg.final_logit_softcap, reduction="sum")
    cos = jnp.zeros((), jnp.float32)
    if lo.cosine_weight > 0:
        cos = losses.cosine_hidden_loss(s_hidden, t_hidden, mb["loss_mask"], reduction="sum")
        total = total + lo.cosine_weight * cos
    return total, {"clm": parts["clm"], "div": parts["div"], "cosine": jax.lax.stop_gradient(cos)}


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


def make_eval_step(student_model, teacher_model, vocab_size):
    """`eval_step(student_params, teacher_params, batch) -> dict of float32 sums`.

    The sums are `tad_jax.metrics.eval_sums` (held-out KL, CE, top-1 agreement, mismatch, tail
    mass, Full-ECE statistics); add them over batches, then `finalize_eval`.
    """
    from tad_jax import metrics

    def eval_step(student_params, teacher_params, batch):
        fwd = dict(segment_ids=batch["segment_ids"], positions=batch["positions"])
        t = teacher_model.apply({"params": teacher_params}, batch["input_ids"], **fwd).logits
        s = student_model.apply({"params": student_params}, batch["input_ids"], **fwd).logits
        return metrics.eval_sums(s[..., :vocab_size], t[..., :vocab_size], batch["targets"],
                                 batch["loss_mask"])

    return eval_step


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


# ---------------------------------------------------------------------------------------------
# Metrics


class MetricsWriter:
    """`WORKDIR/metrics.jsonl` (one JSON object per logged step) and TensorBoard scalars."""

    def __init__(self, workdir: str, *, resume_step: int, tensorboard: bool = True):
        """Opens the files; lines of steps after `resume_step` (a killed run's) are dropped."""
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._file = self._tb = None
        if jax.process_index() != 0:
            return  # one writer per run, even when the workdir is shared by several hosts
        kept = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if _step_of(line) <= resume_step]
        with open(self.path, "w") as f:
            f.writelines(kept)
        self._file = open(self.path, "a")  # noqa: SIM115 - held open for the whole run
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, record: dict[str, float]) -> None:
        """Appends one record (and its scalars to TensorBoard)."""
        if self._file is None:
            return
        self._file.write(json.dumps({"step": step, **record}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        """Flushes and closes both outputs."""
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a torn line (a process killed mid-write)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The records of `WORKDIR/metrics.jsonl`, in order."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------
# Setting a run up


class Run:
    """Everything the loop needs, built by `setup_run` (models, state, compiled steps, data)."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def _resolved(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy with derived defaults filled in (data.tokenizer: the student's or teacher's)."""
    config = ml_collections.ConfigDict(config.to_dict())
    if not config.data.tokenizer:
        config.data.tokenizer = config.student.path or config.teacher.path
    return config


def _check_batches(config, mesh) -> None:
    shards = sharding.batch_shards(mesh)
    sharding.check_batch_divisible(config.data.global_batch_size, mesh)
    sharding.check_batch_divisible(config.eval.batch_size, mesh, "eval.batch_size")
    accum = config.opt.grad_accum_steps
    if config.data.global_batch_size % (accum * shards):
        raise ValueError(
            f"data.global_batch_size={config.data.global_batch_size} must be divisible by "
            f"opt.grad_accum_steps x batch shards = {accum} x {shards}: each micro-batch is split "
            "over the devices. Change one of them.")


def build_models(config, mesh):
    """(teacher_model, teacher_params, student_model, student_params, mask, vocab_size)."""
    teacher_model, teacher_params = build_teacher(config, mesh)
    student_model, params, mask = build_student(config, teacher_model, teacher_params, mesh)
    vocab = shared_vocab_size(config, teacher_model.config, student_model.config)
    check_tokenizers({"teacher": config.teacher.path, "student": config.student.path,
                      "data": config.data.tokenizer}, vocab)
    _check_vocab_covers_tokenizer(config.data.tokenizer, vocab)
    if config.loss.cosine_weight > 0 and (
            teacher_model.config.hidden_size != student_model.config.hidden_size):
        raise ValueError(
            f"loss.cosine_weight={config.loss.cosine_weight} needs equal hidden sizes (teacher "
            f"{teacher_model.config.hidden_size}, student {student_model.config.hidden_size}); "
            "set --config.loss.cosine_weight=0.")
    if config.loss.fused and (teacher_model.config.final_logit_softcap
                              != student_model.config.final_logit_softcap):
        raise ValueError("loss.fused=True needs the same final_logit_softcap for teacher and "
                         "student; set --config.loss.fused=False.")
    return teacher_model, teacher_params, student_model, params, mask, vocab


def _check_vocab_covers_tokenizer(tokenizer_dir: str, vocab: int) -> None:
    """Every token id the data can produce must index the (sliced) logits."""
    from tad_jax.data.features import borrow_tokenizer

    with borrow_tokenizer(tokenizer_dir) as tok:
        n = len(tok)
    if n > vocab:
        raise ValueError(
            f"The tokenizer in {tokenizer_dir} has {n} tokens but the loss compares only {vocab} "
            "vocabulary entries (loss.vocab_size, or the smaller model's): targets would fall "
            f"outside. Set --config.loss.vocab_size={n} or use the models' own tokenizer.")


def _compile_steps(config, models, tx, schedule, state_sh, mesh):
    teacher_model, teacher_params, student_model, params, mask, vocab = models
    batch_sh = sharding.batch_sharding(mesh)
    teacher_sh = jax.tree.map(lambda x: x.sharding, teacher_params)
    step = make_train_step(config, student_model, teacher_model, mask, tx, schedule, vocab, mesh)
    step_fn = jax.jit(step, in_shardings=(state_sh, batch_sh, teacher_sh),
                      out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
    eval_fn = jax.jit(make_eval_step(student_model, teacher_model, vocab),
                      in_shardings=(state_sh["params"], teacher_sh, batch_sh),
                      out_shardings=sharding.replicated(mesh))
    return step_fn, eval_fn, batch_sh


def setup_run(config, workdir: str) -> Run:
    """Builds or resumes a run: mesh, models, state (restored when `workdir` has a checkpoint),
    compiled steps, the data iterator at the right position, the metrics writer.

    Raises:
      ValueError / FileNotFoundError: bad config, paths, mesh, or a checkpoint of another config.
    """
    validate_config(config)
    config = _resolved(config)
    sharding.maybe_initialize_distributed(config.mesh.distributed)
    mesh = sharding.make_mesh(config.mesh)
    _check_batches(config, mesh)
    ckpt = Checkpointer(workdir, keep=config.ckpt.keep, async_save=config.ckpt.async_save)
    latest = ckpt.latest_step()
    if latest is not None:
        check_same_config(ckpt.read_meta(latest)["config"], config_to_dict(config),
                          workdir=workdir, allow_change=config.ckpt.allow_config_change)
    from tad_jax.data import make_train_iterator, restore_iterator_state

    data_iter = make_train_iterator(config.data, seed=config.seed)  # fails early on bad data paths
    with _mesh_context(mesh):
        models = build_models(config, mesh)
        total = num_steps(config)
        tx, schedule = make_optimizer(config, total)
        params, mask = models[3], models[4]
        abstract = jax.eval_shape(lambda p: init_state(p, mask, tx), params)
        state_sh = state_shardings(abstract, jax.tree.map(lambda x: x.sharding, params), mesh)
        state = jax.jit(lambda p: init_state(p, mask, tx), out_shardings=state_sh)(params)
        if latest is not None:
            abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    abstract, state_sh)
            state, meta = ckpt.restore(latest, abstract)
            restore_iterator_state(data_iter, load_data_state(
                workdir, latest, jax.process_index(), meta.get("data_state")))
        step_fn, eval_fn, batch_sh = _compile_steps(config, models, tx, schedule, state_sh, mesh)
    return Run(config=config, workdir=workdir, mesh=mesh, models=models, state=state,
               step_fn=step_fn, eval_fn=eval_fn, batch_sh=batch_sh, ckpt=ckpt,
               data_iter=data_iter, start_step=latest or 0, total_steps=total)


def _mesh_context(mesh):
    """Mesh and logical-axis rules in scope, so the models' logical constraints resolve."""
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES))
    return stack


# ---------------------------------------------------------------------------------------------
# The loop


class _Stop:
    """Set by SIGTERM: the loop saves a checkpoint at the end of the current step and returns."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        self.requested = True


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (or resumes) the run of `config` in `workdir`.

    Rerunning the same command with the same `workdir` resumes from the newest checkpoint: state,
    data position and metrics.jsonl continue exactly where the checkpoint was taken.

    Args:
      config: the run config (`configs/*.py`).
      workdir: folder of checkpoints, metrics.jsonl and TensorBoard files.

    Returns:
      The last logged record (training metrics, plus eval metrics when the last step evaluated).

    Raises:
      FloatingPointError: a non-finite loss or gradient norm (the message names the step; the
        checkpoints written before it are kept).
      ValueError / FileNotFoundError: bad config or paths (see `setup_run`).
    """
    os.makedirs(workdir, exist_ok=True)
    run = setup_run(config, workdir)
    writer = MetricsWriter(workdir, resume_step=run.start_step,
                           tensorboard=run.config.log.tensorboard)
    stop = _Stop()
    previous = signal.signal(signal.SIGTERM, stop) if _main_thread() else None
    try:
        with _mesh_context(run.mesh):
            return _loop(run, writer, stop)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        run.ckpt.close()
        writer.close()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _loop(run: Run, writer: MetricsWriter, stop: _Stop) -> dict[str, float]:
    from tqdm.auto import tqdm

    from tad_jax.data import to_global_batch

    cfg, teacher_params = run.config, run.models[1]
    bar = tqdm(total=run.total_steps, initial=run.start_step, disable=not cfg.log.progress,
               desc="distilling", unit="step", dynamic_ncols=True)
    clock = _Throughput(cfg.data.global_batch_size * cfg.data.seq_len)
    pending, last = None, {}
    stop_at = run.total_steps
    if cfg.max_steps_per_run > 0:
        stop_at = min(stop_at, run.start_step + cfg.max_steps_per_run)
    for step in range(run.start_step + 1, stop_at + 1):
        local = next(run.data_iter, None)
        if local is None:  # a finite pipeline (data.num_epochs) ran out before `steps`
            if pending is not None:
                last = _finish_step(run, writer, clock, bar, *pending, force=True) or last
                _save(run, pending[0])
            bar.write(f"The training data ran out after step {step - 1}; stopping there.")
            break
        batch = to_global_batch(local, run.batch_sh)
        run.state, metrics = run.step_fn(run.state, batch, teacher_params)
        if pending is not None:  # the previous step's metrics: one step late, dispatch stays async
            last = _finish_step(run, writer, clock, bar, *pending) or last
        pending = (step, metrics)
        boundary = step == stop_at or stop.requested
        do_eval = step % cfg.eval.every_steps == 0 or step == run.total_steps
        do_save = step % cfg.ckpt.every_steps == 0 or boundary
        if do_eval or do_save:
            extra = _evaluate(run) if do_eval else {}
            last = _finish_step(run, writer, clock, bar, step, metrics, extra,
                                force=do_eval) or last
            pending = None
            if do_save:
                _save(run, step)
        if stop.requested:
            bar.write(f"SIGTERM: saved a checkpoint at step {step}; rerun the command to resume.")
            break
    bar.close()
    return last


def _finish_step(run, writer, clock, bar, step, metrics, extra=None, force=False):
    """Fetches a step's metrics, stops on non-finite values, logs every `log.every_steps`."""
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
        run.ckpt.wait()
        raise FloatingPointError(
            f"Non-finite loss at step {step} (loss={m['loss']}, grad_norm={m['grad_norm']}). "
            f"Stopped; the last good checkpoint (step {run.ckpt.latest_step()}) is kept in "
            f"{run.ckpt.directory}. Lower opt.lr or check the data.")
    clock.tick()
    bar.update(1)
    bar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)
    if not (force or step % run.config.log.every_steps == 0 or step == run.total_steps):
        return None
    record = {**m, "tokens_per_s": clock.rate(), **(extra or {})}
    writer.write(step, record)
    return record


class _Throughput:
    """Tokens per second between two logged steps."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self._t0, self._steps = time.perf_counter(), 0

    def tick(self) -> None:
        self._steps += 1

    def rate(self) -> float:
        now = time.perf_counter()
        r = self._steps * self.tokens_per_step / max(now - self._t0, 1e-9)
        self._t0, self._steps = now, 0
        return r


def _save(run: Run, step: int) -> None:
    """Checkpoints state + config (orbax) and every process's data position (its own file)."""
    from tad_jax.data import iterator_state_to_json

    data_state = iterator_state_to_json(run.data_iter)
    save_data_state(run.workdir, step, jax.process_index(), data_state)
    meta = {"step": step, "config": config_to_dict(run.config), "data_state": data_state}
    run.ckpt.save(step, run.state, meta)
    if jax.process_index() == 0:
        prune_data_states(run.workdir, run.ckpt.all_steps() + [step])


def _evaluate(run: Run) -> dict[str, float]:
    """Held-out metrics of the current student (sums on device, one fetch at the end)."""
    from tad_jax.data import make_eval_iterator, to_global_batch

    cfg = run.config
    n_proc = jax.process_count()
    it = make_eval_iterator(cfg.data, batch_size=cfg.eval.batch_size // n_proc,
                            max_batches=cfg.eval.max_batches or None,
                            process_index=jax.process_index(), process_count=n_proc)
    total = None
    for local in it:
        sums = run.eval_fn(run.state["params"], run.models[1], to_global_batch(local, run.batch_sh))
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    if total is None:
        raise ValueError(
            "The held-out split is empty: set data.val_files or raise data.val_fraction.")
    return finalize_eval(jax.device_get(total))


# ---------------------------------------------------------------------------------------------
# Restoring a trained student (for evaluation and export)


def restore_student(config, workdir: str, step: int | None = None):
    """The student of a run's checkpoint, without loading the teacher's weights.

    Args:
      config: the run's config (the one it was trained with).
      workdir: the run folder.
      step: the checkpoint step; None = the newest.

    Returns:
      (student_model, student_params, step): params are plain arrays on the default device.

    Raises:
      FileNotFoundError: no checkpoint in `workdir`.
    """
    config = _resolved(config)
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(
            f"No checkpoint in {workdir}/checkpoints: train first (scripts/train.py).")
    ckpt = Checkpointer(workdir, keep=config.ckpt.keep, async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(
            f"No checkpoint in {ckpt.directory}: train first (scripts/train.py).")
    teacher_model, teacher_abs, _ = _abstract_teacher(config, None)
    student_model, params_abs, mask = _abstract_student(config, teacher_model, teacher_abs, None)
    tx, _ = make_optimizer(config, num_steps(config))
    abstract = jax.eval_shape(lambda p: init_state(p, mask, tx), params_abs)
    state, _ = ckpt.restore(step, abstract)
    ckpt.close()
    return student_model, state["params"], step


def _with_shardings(abstract, shardings):
    if shardings is None:
        return abstract
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def _abstract_teacher(config, mesh):
    """(model, abstract params with shardings, param count): nothing is allocated."""
    cfg = teacher_model_config(config)
    dtype = _DTYPES[config.teacher.dtype]
    model = Decoder(cfg, dtype=dtype, param_dtype=dtype)
    boxed = _abstract_boxed(model)
    shardings = sharding.param_shardings(boxed, mesh) if mesh is not None else None
    return model, _with_shardings(sharding.unbox(boxed), shardings), cfg


def _abstract_student(config, teacher_model, teacher_abs, mesh):
    """(model, abstract params with shardings, trainable mask) of the configured student."""
    pdtype, dtype = _DTYPES[config.student.param_dtype], _DTYPES[config.student.dtype]
    if config.student.path or config.student.preset:
        if config.student.path:
            with open(os.path.join(config.student.path, "config.json")) as f:
                scfg = ModelConfig.from_hf(json.load(f))
        else:
            scfg = _preset(config.student.preset, "student.preset")
        scfg = scfg.replace(remat=bool(config.student.remat),
                            scan_layers=bool(config.student.scan_layers))
        model = Decoder(scfg, dtype=dtype, param_dtype=pdtype)
        boxed = _abstract_boxed(model)
        shardings = sharding.param_shardings(boxed, mesh) if mesh is not None else None
        params = _with_shardings(sharding.unbox(boxed), shardings)
        return model, params, jax.tree.map(lambda _: True, params)
    scfg, init_fn, mask = _student_init_fn(config, teacher_model.config)
    model = Decoder(scfg, dtype=dtype, param_dtype=pdtype)
    boxed = _abstract_boxed(model)
    shardings = sharding.param_shardings(boxed, mesh) if mesh is not None else None
    params = jax.eval_shape(init_fn, teacher_abs, jax.random.key(0))
    return model, _with_shardings(params, shardings), mask


# ---------------------------------------------------------------------------------------------
# Dry run


def dry_run(config, *, print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    """Compiles the configured step on abstract shapes and reports what it would cost.

    Nothing is loaded or allocated: the teacher's architecture comes from `teacher.path`'s
    config.json or `teacher.preset`. Reported: parameter counts, per-device memory of the step
    (XLA memory analysis), FLOPs per token (XLA cost analysis of one micro-batch) for the
    configured divergence and for vanilla KD, and both for `dry_run.flops_tokens` tokens (the
    paper's Table 3 measure). `dry_run.num_layers` shrinks the teacher (and the student in
    proportion) so big models compile on small hosts.

    Returns:
      The figures as a dict (also printed).
    """
    validate_config(config, check_paths=False)
    config = _resolved(config)
    mesh = sharding.make_mesh(config.mesh)
    _check_batches(config, mesh)
    with _mesh_context(mesh):
        teacher_model, teacher_abs, _ = _abstract_teacher(config, mesh)
        student_model, params_abs, mask = _abstract_student(config, teacher_model, teacher_abs,
                                                            mesh)
        vocab = shared_vocab_size(config, teacher_model.config, student_model.config)
        figures = _param_figures(teacher_abs, params_abs, mask)
        figures.update(mesh=dict(mesh.shape), devices=mesh.size,
                       teacher_layers=teacher_model.config.num_layers,
                       student_layers=student_model.config.num_layers)
        models = (teacher_model, teacher_abs, student_model, params_abs, mask, vocab)
        compiled = _compile_abstract(config, models, mesh)
        figures.update(_memory_figures(compiled))
        figures.update(_flop_figures(config, models, mesh, compiled))
    for line in _format_figures(figures):
        print_fn(line)
    return figures


def _param_figures(teacher_abs, params_abs, mask) -> dict[str, int]:
    size = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
    train, _ = split_trainable(params_abs, mask)
    return dict(teacher_params=size(teacher_abs), student_params=size(params_abs),
                student_trainable_params=size(train))


def _compile_abstract(config, models, mesh, divergence=None, micro_only=False):
    """The step compiled on abstract inputs (optionally: another divergence, one micro-batch)."""
    teacher_model, teacher_abs, student_model, params_abs, mask, vocab = models
    cfg = ml_collections.ConfigDict(config.to_dict())
    batch = cfg.data.global_batch_size
    if divergence:
        cfg.loss.divergence = divergence
    if micro_only:
        batch //= cfg.opt.grad_accum_steps
        cfg.opt.grad_accum_steps = 1
    tx, schedule = make_optimizer(cfg, num_steps(cfg))
    state_abs = jax.eval_shape(lambda p: init_state(p, mask, tx), params_abs)
    state_sh = state_shardings(state_abs, jax.tree.map(lambda x: x.sharding, params_abs), mesh)
    state_abs = _with_shardings(state_abs, state_sh)
    batch_sh = sharding.batch_sharding(mesh)
    batch_abs = {k: jax.ShapeDtypeStruct((batch, cfg.data.seq_len),
                                         jnp.float32 if k == "loss_mask" else jnp.int32,
                                         sharding=batch_sh) for k in _BATCH_KEYS}
    step = make_train_step(cfg, student_model, teacher_model, mask, tx, schedule, vocab, mesh)
    teacher_sh = jax.tree.map(lambda x: x.sharding, teacher_abs)
    jitted = jax.jit(step, in_shardings=(state_sh, batch_sh, teacher_sh),
                     out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
    return jitted.lower(state_abs, batch_abs, teacher_abs).compile()


_BATCH_KEYS = ("input_ids", "targets", "segment_ids", "positions", "loss_mask")


def _memory_figures(compiled) -> dict[str, float]:
    mem = compiled.memory_analysis()
    if mem is None:
        return {}
    gib = 2.0**30
    args, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
    temp, alias = mem.temp_size_in_bytes, mem.alias_size_in_bytes
    return dict(mem_arguments_gib=args / gib, mem_outputs_gib=out / gib, mem_temp_gib=temp / gib,
                mem_per_device_gib=(args + out - alias + temp) / gib)


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return float(cost.get("flops", float("nan")))


def _flop_figures(config, models, mesh, compiled) -> dict[str, float]:
    """FLOPs of one micro-batch (XLA counts a scan's body once, so the step is not measured
    with accumulation), per token and for `dry_run.flops_tokens` tokens, TAD vs vanilla KD.
    """
    accum = config.opt.grad_accum_steps
    tokens = config.data.global_batch_size // accum * config.data.seq_len
    main = compiled if accum == 1 else _compile_abstract(config, models, mesh, micro_only=True)
    kd = _compile_abstract(config, models, mesh, divergence="kl", micro_only=True)
    # cost_analysis reports the FLOPs of one device's program; the step runs on every device.
    per_tok = _flops(main) * mesh.size / tokens
    kd_per_tok = _flops(kd) * mesh.size / tokens
    n = config.dry_run.flops_tokens
    return dict(flops_per_token=per_tok, kd_flops_per_token=kd_per_tok,
                pflops_for_tokens=per_tok * n / 1e15, kd_pflops_for_tokens=kd_per_tok * n / 1e15,
                flops_ratio_vs_kd=per_tok / kd_per_tok, flops_tokens=n)


def _format_figures(f: dict[str, Any]) -> list[str]:
    lines = [
        f"mesh {f['mesh']} ({f['devices']} devices); teacher {f['teacher_layers']} layers, "
        f"student {f['student_layers']} layers",
        f"parameters: teacher {f['teacher_params']:,}  student {f['student_params']:,}  "
        f"(trainable {f['student_trainable_params']:,})",
    ]
    if "mem_per_device_gib" in f:
        lines.append(
            f"memory per device: {f['mem_per_device_gib']:.2f} GiB (arguments "
            f"{f['mem_arguments_gib']:.2f}, outputs {f['mem_outputs_gib']:.2f}, temporaries "
            f"{f['mem_temp_gib']:.2f})")
    lines += [
        f"FLOPs per token: {f['flops_per_token']:.4g} (vanilla KD {f['kd_flops_per_token']:.4g}, "
        f"ratio {f['flops_ratio_vs_kd']:.4f})",
        f"PFLOPs for {f['flops_tokens']:,} tokens: {f['pflops_for_tokens']:.3f} "
        f"(vanilla KD {f['kd_pflops_for_tokens']:.3f})",
    ]
    return lines
