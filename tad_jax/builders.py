"""The teacher and the student: architectures, params in their shardings, vocabulary checks.

Public API:
- `teacher_model_config(config, full=False) -> ModelConfig`
- `build_teacher(config, mesh=None) -> (teacher_model, teacher_params)`
- `build_student(config, teacher_model, teacher_params, mesh=None) -> (model, params, mask)`
- `build_models(config, mesh) -> (teacher_model, teacher_params, student_model, student_params,
  mask, vocab_size)`: both models plus the checks that they can be distilled into each other
- `shared_vocab_size(config, teacher_cfg, student_cfg) -> int`, `check_tokenizers(folders, vocab)`
- `abstract_teacher(config, mesh)`, `abstract_student(config, teacher_model, teacher_abs, mesh)`:
  the same models with abstract params (`jax.ShapeDtypeStruct`), nothing allocated (dry runs,
  restoring a checkpoint)

Params are plain arrays (unboxed from flax's logical partitioning); the trainable mask is a
pytree of Python bools shaped like the params (True = trained).
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from tad_jax import sharding
from tad_jax.models import Decoder, ModelConfig

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


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
    cfg = cfg.replace(remat=bool(t.remat), scan_layers=bool(t.get("scan_layers", False)),
                      attention=str(t.attention))
    return cfg if full else _reduce_layers(cfg, config.dry_run.num_layers)


def check_remat_policy(config: ml_collections.ConfigDict) -> None:
    """Raises a ValueError naming `--config.student.remat_policy`'s choices for a bad name."""
    from tad_jax.models.config import REMAT_POLICIES

    name = config.student.get("remat_policy", "nothing_saveable")
    if name not in REMAT_POLICIES:
        raise ValueError(f"student.remat_policy={name!r} is not a remat policy; set "
                         f"--config.student.remat_policy to one of {list(REMAT_POLICIES)}.")


def _student_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The ModelConfig fields the run config sets on the student: how it is compiled."""
    check_remat_policy(config)
    s = config.student
    return dict(remat=bool(s.remat), remat_policy=str(s.get("remat_policy", "nothing_saveable")),
                scan_layers=bool(s.scan_layers), attention=str(s.attention))


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
    over.update(_student_fields(config))
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
        # num_layers: only the layers `cfg` keeps (dry_run.num_layers), not the whole checkpoint.
        _, params = from_pretrained(config.teacher.path, dtype=dtype, shardings=shardings,
                                    remat=cfg.remat, scan_layers=cfg.scan_layers,
                                    num_layers=cfg.num_layers)
        return model, params
    rng = jax.random.fold_in(jax.random.key(config.seed), 1)
    return model, _init_sharded(model, rng, mesh)


def _abstract_key():
    """An abstract PRNG key: nothing may run eagerly under a mesh of devices that are not
    attached (ahead-of-time compiles for a TPU topology or a GPU target)."""
    return jax.eval_shape(lambda: jax.random.key(0))


def _abstract_boxed(model: nn.Module):
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    return jax.eval_shape(lambda r, i: model.init(r, i)["params"], _abstract_key(), ids)


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
            scfg = ModelConfig.from_hf(json.load(f)).replace(**_student_fields(config))
        model = Decoder(scfg, dtype=dtype, param_dtype=pdtype)
        shardings = sharding.param_shardings(_abstract_boxed(model), mesh) if mesh else None
        _, params = from_pretrained(config.student.path, dtype=pdtype, shardings=shardings,
                                    **_student_fields(config))
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
    jax.eval_shape(init_fn, teacher_abstract, _abstract_key())
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


def with_shardings(abstract, shardings):
    """`abstract` (a tree of `jax.ShapeDtypeStruct`) carrying `shardings`; as is when None."""
    if shardings is None:
        return abstract
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def abstract_teacher(config, mesh):
    """(model, abstract params with shardings, its ModelConfig): nothing is allocated."""
    cfg = teacher_model_config(config)
    dtype = _DTYPES[config.teacher.dtype]
    model = Decoder(cfg, dtype=dtype, param_dtype=dtype)
    boxed = _abstract_boxed(model)
    shardings = sharding.param_shardings(boxed, mesh) if mesh is not None else None
    return model, with_shardings(sharding.unbox(boxed), shardings), cfg


def abstract_student(config, teacher_model, teacher_abs, mesh):
    """(model, abstract params with shardings, trainable mask) of the configured student."""
    pdtype, dtype = _DTYPES[config.student.param_dtype], _DTYPES[config.student.dtype]
    if config.student.path or config.student.preset:
        if config.student.path:
            with open(os.path.join(config.student.path, "config.json")) as f:
                scfg = ModelConfig.from_hf(json.load(f))
        else:
            scfg = _preset(config.student.preset, "student.preset")
        scfg = scfg.replace(**_student_fields(config))
        model = Decoder(scfg, dtype=dtype, param_dtype=pdtype)
        boxed = _abstract_boxed(model)
        shardings = sharding.param_shardings(boxed, mesh) if mesh is not None else None
        params = with_shardings(sharding.unbox(boxed), shardings)
        return model, params, jax.tree.map(lambda _: True, params)
    scfg, init_fn, mask = _student_init_fn(config, teacher_model.config)
    model = Decoder(scfg, dtype=dtype, param_dtype=pdtype)
    boxed = _abstract_boxed(model)
    shardings = sharding.param_shardings(boxed, mesh) if mesh is not None else None
    params = jax.eval_shape(init_fn, teacher_abs, _abstract_key())
    return model, with_shardings(params, shardings), mask
