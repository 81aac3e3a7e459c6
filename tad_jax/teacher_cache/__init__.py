"""An offline teacher cache for TAD: exact head statistics and unbiased tail samples.

Modules: ``stats`` (the per-position statistics from teacher logits), ``loss``
(``tad_divergence_cached``, ``kl_divergence_cached``), ``format`` (the compact on-disk layout and
manifest), ``rows`` (index-addressable rows of a prepared folder), ``writer`` and ``reader``.
"""

from tad_jax.teacher_cache.loss import kl_divergence_cached, read_top_k, tad_divergence_cached
from tad_jax.teacher_cache.stats import TeacherStats, teacher_stats

__all__ = [
    "TeacherStats",
    "kl_divergence_cached",
    "read_top_k",
    "tad_divergence_cached",
    "teacher_stats",
]
