"""Argument checks of the losses, the fused losses, the metrics and `TADConfig`: one place.

They run at trace time on static Python values and on shapes and dtypes, so a bad call costs
nothing at run time. Each raises ValueError with a message that names the fix.
"""

import math

import jax
import jax.numpy as jnp

REDUCTIONS = ("none", "sum", "mean")


def static_number(name, value) -> float:
    """`value` as a Python float; a traced or array value is refused (it configures the loss)."""
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError) as e:
        raise ValueError(
            f"{name} must be a static Python number (it configures the loss at trace time); "
            f"got {type(value).__name__}. Pass a float, not a traced jax value."
        ) from e


def positive(name, value) -> float:
    """`value` as a float > 0 and finite (inf made the losses NaN or 0; nan fails too)."""
    value = static_number(name, value)
    if not 0 < value < math.inf:
        raise ValueError(f"{name} must be > 0 and finite, got {value}.")
    return value


def reduction(value) -> None:
    if value not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {value!r}.")


def floating(name, x) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(
            f"{name} must be floating point (got {jnp.result_type(x)}); cast them with "
            f".astype(jnp.float32) — integers here are almost always token ids passed by mistake."
        )


def ids(name, x, what) -> None:
    """x must hold integer ids (`what`: "token ids", "document ids"), not floats to truncate."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
        raise ValueError(f"{name} must be integer {what}, got {jnp.result_type(x)}; cast them "
                         "with .astype(jnp.int32).")


def per_position(name, x, positions, what="") -> None:
    """x (optional: None passes) must have the positions' shape [..., T]."""
    if x is not None and tuple(jnp.shape(x)) != tuple(positions):
        raise ValueError(f"{name} shape {jnp.shape(x)} must be [..., T] = {tuple(positions)}: "
                         f"one entry per position{what}.")


def logits_pair(student_btv, teacher_btv) -> None:
    """Student and teacher logits: float `[..., T, V]` arrays of equal shape."""
    floating("student_logits", student_btv)
    floating("teacher_logits", teacher_btv)
    s_shape, t_shape = jnp.shape(student_btv), jnp.shape(teacher_btv)
    if len(s_shape) < 2:
        raise ValueError(f"logits must be [..., T, V] (at least 2-D), got shape {s_shape}.")
    if len(s_shape) != len(t_shape):
        raise ValueError(
            f"student logits {s_shape} and teacher logits {t_shape} have different ranks; "
            "both must be [..., T, V] with the same leading dims."
        )
    if s_shape[-1] != t_shape[-1]:
        raise ValueError(
            f"vocabulary axis (-1) differs: student V={s_shape[-1]}, teacher V={t_shape[-1]}. "
            "Slice the teacher's (padded) vocabulary to the shared tokenizer's: "
            "teacher_logits[..., :student_vocab_size]."
        )
    for axis, (a, b) in enumerate(zip(s_shape, t_shape, strict=True)):
        if a != b:
            what = "time" if axis == len(s_shape) - 2 else "batch"
            raise ValueError(
                f"{what} axis {axis} differs: student {s_shape} vs teacher {t_shape}; "
                "student and teacher logits must cover the same positions."
            )


def segments(segment_ids, positions) -> None:
    """beta_scope "segment": int segment_ids [..., T], the document of each position."""
    if segment_ids is None or tuple(jnp.shape(segment_ids)) != tuple(positions):
        raise ValueError(f'beta_scope="segment" needs segment_ids of shape {tuple(positions)} '
                         f"([..., T]: the document of each position), got "
                         f"{None if segment_ids is None else jnp.shape(segment_ids)}.")
    ids("segment_ids", segment_ids, "document ids")


def head(who: str, hidden, head_dv, bias) -> int:
    """One (hidden [..., T, d], head [d, V], bias [V] or None) triple of a fused loss; returns V."""
    if hidden.ndim < 2:
        raise ValueError(f"{who}_hidden must be [..., T, d], got shape {hidden.shape}")
    floating(f"{who}_hidden", hidden)
    floating(f"{who}_head", head_dv)
    if head_dv.ndim != 2:
        raise ValueError(f"{who}_head must be a 2-D [d, V] matrix, got shape {head_dv.shape}")
    if head_dv.shape[0] != hidden.shape[-1]:
        transposed = head_dv.shape[1] == hidden.shape[-1]
        hint = " (transpose it: an embedding table is [V, d])" if transposed else ""
        raise ValueError(
            f"{who}_head is {head_dv.shape} but {who}_hidden has hidden size {hidden.shape[-1]}: "
            f"the head must be [d, V] = [{hidden.shape[-1]}, V]{hint}"
        )
    if bias is not None and bias.shape != (head_dv.shape[1],):
        raise ValueError(
            f"{who}_bias must have shape [V] = ({head_dv.shape[1]},), got {bias.shape}")
    return head_dv.shape[1]
