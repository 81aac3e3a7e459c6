"""The paper's student initialisation (Sec. 3.2, 3.2.2, App. B), following DistilBERT.

The student keeps the teacher's family and (by default) its dimensions, with fewer layers and
optionally smaller hidden / intermediate / head sizes. Each student layer is seeded by one
teacher layer (default: evenly spaced, first and last included; the paper does not say which):
its attention weights are the teacher's, truncated per head to the student's sizes, and (our
choice, `copy_norms`) its norms; its MLP is random. The embeddings (and the head, tied or not)
are copied and, by default, frozen: the paper freezes them in Sec. 3.2.2 and is silent
elsewhere, so freezing every derived student's (and an untied head) is our choice
(`freeze_embeddings`, `freeze_lm_head`).

Truncation keeps RoPE's channel pairs: rotate_half pairs channel i with i + rot/2, so a head of
e_s channels keeps the first rot_s/2 channels of each rotated half (then the first pass-through
channels); v and o keep their first e_s channels. With unchanged head sizes this is the
identity, so the copied layers are exactly the teacher's.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tad_jax.models.config import ModelConfig
from tad_jax.models.decoder import Decoder, init_params
from tad_jax.models.hf_io import unscan_params

_SIZE_FIELDS = ("hidden_size", "num_heads", "num_kv_heads", "head_dim")
_STUDENT_ONLY = ("layer_indices", "freeze_embeddings", "freeze_lm_head", "copy_norms")


def default_layer_indices(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers, first and last included (rounded linspace)."""
    if student_layers == 1:
        return [teacher_layers - 1]
    return [int(round(x)) for x in np.linspace(0, teacher_layers - 1, student_layers)]


def _student_config(teacher: ModelConfig, fields: dict[str, Any], indices) -> ModelConfig:
    """The student's config: the teacher's with `fields` changed, head_dim kept consistent."""
    standard = teacher.head_dim * teacher.num_heads == teacher.hidden_size  # not Gemma's layout
    if standard and "head_dim" not in fields and ({"hidden_size", "num_heads"} & set(fields)):
        d = fields.get("hidden_size", teacher.hidden_size)
        h = fields.get("num_heads", teacher.num_heads)
        if d % h:
            raise ValueError(
                f"Student hidden_size={d} is not divisible by num_heads={h}: choose a head "
                "count that divides the hidden size, or give head_dim explicitly.")
        fields["head_dim"] = d // h
    if "num_heads" in fields and "num_kv_heads" not in fields:
        fields["num_kv_heads"] = min(teacher.num_kv_heads, fields["num_heads"])
    for name in _SIZE_FIELDS:
        if fields.get(name, 0) > getattr(teacher, name):
            raise ValueError(
                f"Student {name}={fields[name]} exceeds the teacher's {getattr(teacher, name)}: "
                "the attention weights are copied from the teacher, so it can only shrink.")
    if teacher.layer_types is not None:
        fields["layer_types"] = tuple(teacher.layer_types[i] for i in indices)
    try:
        return teacher.replace(**fields)
    except ValueError as e:
        raise ValueError(f"Invalid student overrides {fields}: {e}") from e


def _layer_indices(teacher: ModelConfig, overrides: dict[str, Any]) -> list[int]:
    n = overrides.get("num_layers", teacher.num_layers)
    if not 1 <= n <= teacher.num_layers:
        raise ValueError(
            f"Student num_layers={n} must be between 1 and the teacher's {teacher.num_layers}: "
            "each student layer is seeded by a distinct teacher layer.")
    indices = list(overrides.get("layer_indices") or default_layer_indices(teacher.num_layers, n))
    if len(indices) != n or not all(0 <= i < teacher.num_layers for i in indices):
        raise ValueError(
            f"layer_indices={indices} must list {n} teacher layers in [0, {teacher.num_layers}).")
    return indices


def _qk_channels(teacher: ModelConfig, student: ModelConfig) -> np.ndarray:
    """Teacher head channels that become the student's q/k head channels (RoPE pairs kept)."""
    rot_t, rot_s = teacher.rope_dim, student.rope_dim
    half_t, half_s = rot_t // 2, rot_s // 2
    rotated = np.concatenate([np.arange(half_s), half_t + np.arange(half_s)])
    passed = rot_t + np.arange(student.head_dim - rot_s)
    return np.concatenate([rotated, passed]).astype(np.int32)


def _query_heads(teacher: ModelConfig, s: ModelConfig) -> np.ndarray:
    """The teacher query heads that seed the student's, keeping each paired with its KV head.

    The decoder pairs query head j with KV head j // group. Student query head j (KV head
    j // g_s, slot j % g_s) takes teacher head (j // g_s) * g_t + j % g_s, which reads the same
    teacher KV head that the student copies to that slot. A student with larger groups than the
    teacher's (g_s > g_t) cannot keep every pair, and takes the first heads instead.
    """
    g_t = teacher.num_heads // teacher.num_kv_heads
    g_s = s.num_heads // s.num_kv_heads
    j = np.arange(s.num_heads)
    return (j // g_s) * g_t + j % g_s if g_s <= g_t else j


def _truncate_attn(t_attn: dict, teacher: ModelConfig, s: ModelConfig) -> dict:
    """The teacher layer's attention, cut to the student's d / heads / head_dim."""
    d, k, e = s.hidden_size, s.num_kv_heads, s.head_dim
    qk, q_heads = _qk_channels(teacher, s), _query_heads(teacher, s)
    out = {
        "q": {"kernel": t_attn["q"]["kernel"][:d, q_heads][:, :, qk]},
        "k": {"kernel": t_attn["k"]["kernel"][:d, :k][:, :, qk]},
        "v": {"kernel": t_attn["v"]["kernel"][:d, :k, :e]},
        "o": {"kernel": t_attn["o"]["kernel"][q_heads, :e, :d]},
    }
    if s.qkv_bias:
        out["q"]["bias"] = t_attn["q"]["bias"][q_heads][:, qk]
        out["k"]["bias"] = t_attn["k"]["bias"][:k][:, qk]
        out["v"]["bias"] = t_attn["v"]["bias"][:k, :e]
    if s.o_bias:
        out["o"]["bias"] = t_attn["o"]["bias"][:d]
    return out


def _truncate_vector(tree, d):
    return jax.tree_util.tree_map(lambda x: x[:d], tree)


def _copy_layer(s_layer: dict, t_layer: dict, teacher, student, copy_norms: bool) -> dict:
    layer = dict(s_layer)
    layer["attn"] = _truncate_attn(t_layer["attn"], teacher, student)
    if copy_norms:
        for name in ("attn_norm", "attn_post_norm", "mlp_norm", "mlp_post_norm"):
            if name in t_layer:
                layer[name] = _truncate_vector(t_layer[name], student.hidden_size)
    return layer


def student_config(teacher_config: ModelConfig, student_overrides: dict) -> ModelConfig:
    """The student's `ModelConfig` alone (what `init_student` would build), for sizing."""
    overrides = {k: v for k, v in student_overrides.items() if k not in _STUDENT_ONLY}
    indices = _layer_indices(teacher_config, student_overrides)
    return _student_config(teacher_config, overrides, indices)


def _mask(params: dict, freeze_embeddings: bool, freeze_lm_head: bool) -> dict:
    mask = jax.tree_util.tree_map(lambda _: True, params)
    mask["embed"] = jax.tree_util.tree_map(lambda _: not freeze_embeddings, params["embed"])
    if "lm_head" in params:
        mask["lm_head"] = jax.tree_util.tree_map(lambda _: not freeze_lm_head, params["lm_head"])
    return mask


def _stack(config: ModelConfig, params: dict) -> dict:
    layers = [params.pop(f"layer_{i}") for i in range(config.num_layers)]
    params["layers"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
    return params


def init_student(teacher_config: ModelConfig, teacher_params, student_overrides: dict, rng):
    """Builds the student the paper distils into, seeded from the teacher.

    Args:
      teacher_config: the teacher's `ModelConfig`.
      teacher_params: the teacher's params (plain or boxed, scanned or not).
      student_overrides: `ModelConfig` fields to change (`num_layers`, `hidden_size`,
        `intermediate_size`, `num_heads`, `num_kv_heads`, `head_dim`, `remat`, `scan_layers`, ...)
        plus `layer_indices` (teacher layers seeding the student's, default evenly spaced),
        `freeze_embeddings` (default True), `freeze_lm_head` (untied head; default: as
        `freeze_embeddings`) and `copy_norms` (copy the seeding layers' norms; default True).
      rng: PRNG key for the random parameters (the MLPs).

    Returns:
      (student_config, student_params, trainable_mask): plain float32 params; the mask is a pytree
      of bools shaped like the params, True = trained.

    Raises:
      ValueError: overrides that cannot be derived from the teacher (more layers, larger sizes,
        head sizes that do not divide, bad layer_indices).
    """
    freeze_emb = student_overrides.get("freeze_embeddings", True)
    freeze_head = student_overrides.get("freeze_lm_head", freeze_emb)
    copy_norms = student_overrides.get("copy_norms", True)
    unknown = set(student_overrides) - set(_STUDENT_ONLY) - set(ModelConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"Unknown student overrides {sorted(unknown)}: use ModelConfig fields or "
                         f"{list(_STUDENT_ONLY)}.")
    indices = _layer_indices(teacher_config, student_overrides)
    student = student_config(teacher_config, student_overrides)
    plain = student.replace(scan_layers=False, remat=False)
    s_params = init_params(Decoder(plain), rng)
    t_params = unscan_params(teacher_config, teacher_params)
    d = student.hidden_size
    s_params["embed"] = {"embedding": t_params["embed"]["embedding"][:, :d]}
    if "lm_head" in s_params:
        s_params["lm_head"] = {k: (v[:d] if k == "kernel" else v)
                               for k, v in t_params["lm_head"].items()}
    if copy_norms:
        s_params["final_norm"] = _truncate_vector(t_params["final_norm"], d)
    for i, t in enumerate(indices):
        s_params[f"layer_{i}"] = _copy_layer(
            s_params[f"layer_{i}"], t_params[f"layer_{t}"], teacher_config, student, copy_norms)
    # One dtype for the whole student (the trainer's float32 master weights).
    s_params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), s_params)
    if student.scan_layers:
        s_params = _stack(student, s_params)
    return student, s_params, _mask(s_params, freeze_emb, freeze_head)
