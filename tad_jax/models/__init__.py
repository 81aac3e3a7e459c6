"""Flax decoders for the paper's families, HF checkpoints in and out, the student initialisation.

Public API (docs/ARCHITECTURE.md): `ModelConfig`, `Decoder`, `DecoderOutput`, `lm_head`,
`from_pretrained`, `save_pretrained`, `init_student`, `PRESETS`, `resolve_attention` (which
attention implementation a config runs with on a platform).
"""

from tad_jax.models.attention import resolve_attention
from tad_jax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from tad_jax.models.decoder import Decoder, DecoderOutput, head_logits, init_params, lm_head, unbox
from tad_jax.models.hf_io import from_pretrained, save_pretrained, unscan_params
from tad_jax.models.presets import PRESETS, STUDENT_OVERRIDES, student_preset
from tad_jax.models.student import init_student

__all__ = [
    "PRESETS",
    "STUDENT_OVERRIDES",
    "SUPPORTED_MODEL_TYPES",
    "Decoder",
    "DecoderOutput",
    "ModelConfig",
    "from_pretrained",
    "head_logits",
    "init_params",
    "init_student",
    "lm_head",
    "resolve_attention",
    "save_pretrained",
    "student_preset",
    "unbox",
    "unscan_params",
]
