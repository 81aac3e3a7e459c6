"""tad_jax: Tail-Aware Distillation (TAD) for language models in JAX/Flax.

The loss functions are importable from the top level; models, data, training and evaluation
live in their own modules (`tad_jax.models`, `tad_jax.data`, `tad_jax.train`, `tad_jax.evaluate`)
so that importing the loss pulls in nothing heavier than jax.
"""

from tad_jax.fused import (
    fused_causal_lm_loss,
    fused_distillation_loss,
    fused_kl_loss,
    fused_tad_loss,
)
from tad_jax.losses import (
    causal_lm_loss,
    cosine_hidden_loss,
    distillation_loss,
    js_divergence,
    kl_divergence,
    reverse_kl_divergence,
    tad_components,
    tad_divergence,
)
from tad_jax.tad_core import TADConfig
from tad_jax.teacher_cache import kl_divergence_cached, tad_divergence_cached

__all__ = [
    "TADConfig",
    "causal_lm_loss",
    "cosine_hidden_loss",
    "distillation_loss",
    "fused_causal_lm_loss",
    "fused_distillation_loss",
    "fused_kl_loss",
    "fused_tad_loss",
    "js_divergence",
    "kl_divergence",
    "kl_divergence_cached",
    "reverse_kl_divergence",
    "tad_components",
    "tad_divergence",
    "tad_divergence_cached",
]
