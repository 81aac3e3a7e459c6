"""Full-size architectures the paper uses (values of their public config.json files).

`PRESETS` are teachers and pretrained students; `STUDENT_OVERRIDES` are the `init_student`
overrides for the students the paper derives from its teachers (Sec. 3.2.1, 3.2.2, App. B).

The paper's Table 7 sizes are not reproduced here. The derived students follow its text: the
teacher's dimensions, fewer layers (half for Phi-2 and Qwen2.5-3B, a third for Gemma2-9B) and a
smaller intermediate size chosen so that the non-embedding ("active") parameters are ~1B
(~1.1B for Gemma2-9B). For Qwen1.5-1.8B the paper reuses MiniPLM's 1.2B and 0.5B students; we
did not have their exact sizes, so we CHOSE sizes with ~1.0B and ~475M non-embedding
parameters (see the comments); `tests/test_models_presets.py` checks these counts.
"""

from __future__ import annotations

from tad_jax.models.config import ModelConfig

_GEMMA2 = dict(model_type="gemma2", vocab_size=256000, head_dim=256, max_position_embeddings=8192,
               norm_eps=1e-6, rope_theta=10000.0, hidden_act="gelu_pytorch_tanh",
               tie_word_embeddings=True, final_logit_softcap=30.0, attn_logit_softcap=50.0,
               query_pre_attn_scalar=256, sliding_window=4096, bos_token_id=2, eos_token_id=1,
               pad_token_id=0)
_QWEN = dict(model_type="qwen2", vocab_size=151936, max_position_embeddings=32768, norm_eps=1e-6,
             rope_theta=1000000.0, qkv_bias=True, bos_token_id=151643, eos_token_id=151643)
_PHI3 = dict(model_type="phi3", vocab_size=32064, max_position_embeddings=4096,
             original_max_position_embeddings=4096, norm_eps=1e-5, rope_theta=10000.0,
             sliding_window=2047, bos_token_id=1, eos_token_id=32000, pad_token_id=32000)
_LLAMA = dict(model_type="llama", vocab_size=32000, norm_eps=1e-5, rope_theta=10000.0,
              bos_token_id=1, eos_token_id=2)


def _alternating(n: int) -> tuple[str, ...]:
    """Gemma2: even layers slide, odd layers are global (HF's default layer_types)."""
    return tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n))


def _all_sliding(n: int) -> tuple[str, ...]:
    return ("sliding_attention",) * n


PRESETS: dict[str, ModelConfig] = {
    "gemma2-9b": ModelConfig(**_GEMMA2, hidden_size=3584, intermediate_size=14336, num_layers=42,
                             num_heads=16, num_kv_heads=8, layer_types=_alternating(42)),
    "gemma2-2b": ModelConfig(**_GEMMA2, hidden_size=2304, intermediate_size=9216, num_layers=26,
                             num_heads=8, num_kv_heads=4, layer_types=_alternating(26)),
    "qwen1.5-1.8b": ModelConfig(**_QWEN, hidden_size=2048, intermediate_size=5504, num_layers=24,
                                num_heads=16, num_kv_heads=16, head_dim=128),
    "qwen2.5-3b": ModelConfig(**_QWEN, hidden_size=2048, intermediate_size=11008, num_layers=36,
                              num_heads=16, num_kv_heads=2, head_dim=128, tie_word_embeddings=True),
    "phi-2": ModelConfig(model_type="phi", vocab_size=51200, hidden_size=2560,
                         intermediate_size=10240, num_layers=32, num_heads=32, num_kv_heads=32,
                         head_dim=80, max_position_embeddings=2048, norm_eps=1e-5,
                         partial_rotary_factor=0.4, hidden_act="gelu_new", qkv_bias=True,
                         o_bias=True, mlp_bias=True, lm_head_bias=True, bos_token_id=50256,
                         eos_token_id=50256),
    "phi-3-mini": ModelConfig(**_PHI3, hidden_size=3072, intermediate_size=8192, num_layers=32,
                              num_heads=32, num_kv_heads=32, head_dim=96,
                              layer_types=_all_sliding(32)),
    "phi-3-medium": ModelConfig(**_PHI3, hidden_size=5120, intermediate_size=17920,
                                num_layers=40, num_heads=40, num_kv_heads=10, head_dim=128,
                                layer_types=_all_sliding(40)),
    "tinyllama-1.1b": ModelConfig(**_LLAMA, hidden_size=2048, intermediate_size=5632,
                                  num_layers=22, num_heads=32, num_kv_heads=4, head_dim=64,
                                  max_position_embeddings=2048),
    "llama2-7b": ModelConfig(**_LLAMA, hidden_size=4096, intermediate_size=11008, num_layers=32,
                             num_heads=32, num_kv_heads=32, head_dim=128,
                             max_position_embeddings=4096),
    "smollm2-135m": ModelConfig(model_type="llama", vocab_size=49152, hidden_size=576,
                                intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
                                head_dim=64, max_position_embeddings=8192, norm_eps=1e-5,
                                rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=0,
                                eos_token_id=0),
}

# teacher preset -> init_student overrides.
STUDENT_OVERRIDES: dict[str, tuple[str, dict]] = {
    # MiniPLM-style 1.2B student (chosen: 20 of 24 layers, teacher dims): ~1.01B non-embedding.
    "qwen1.5-1.8b-student-1.2b": ("qwen1.5-1.8b", dict(num_layers=20)),
    # MiniPLM-style 0.5B student (chosen: 12 layers, F = 3712): ~475M non-embedding.
    "qwen1.5-1.8b-student-0.5b": ("qwen1.5-1.8b", dict(num_layers=12, intermediate_size=3712)),
    # Half the layers, smaller MLP: ~1.0B non-embedding each.
    "phi-2-student": ("phi-2", dict(num_layers=16, intermediate_size=7168)),
    "qwen2.5-3b-student": ("qwen2.5-3b", dict(num_layers=18, intermediate_size=7552)),
    # A third of the layers: ~1.1B non-embedding (the paper's "2B student, 1.1B active").
    "gemma2-9b-student": ("gemma2-9b", dict(num_layers=14, intermediate_size=3200)),
}


def non_embedding_params(config: ModelConfig) -> int:
    """Parameters outside the embedding table and the LM head (the paper's "active" count)."""
    head = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    head += config.vocab_size * config.lm_head_bias
    return config.num_params() - config.vocab_size * config.hidden_size - head


def student_preset(name: str) -> ModelConfig:
    """The config of a `STUDENT_OVERRIDES` student (no params: for sizing and eval_shape)."""
    from tad_jax.models.student import student_config

    teacher_name, overrides = STUDENT_OVERRIDES[name]
    return student_config(PRESETS[teacher_name], overrides)
