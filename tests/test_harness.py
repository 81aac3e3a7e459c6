"""tad_jax.harness: lm-evaluation-harness on local tasks, offline, against a hand computation.

The end-to-end test takes ~20 s of CPU (importing the harness, two models, 336 requests): slow.

Two tiny random Llamas (a locally trained byte-level tokenizer) are saved as HF folders; the
harness's accuracy and perplexities on our local tasks must equal the same quantities computed
here from transformers' logits: each choice's summed log-probability after the sentence start,
and each paragraph's log-likelihood after the tokenizer's EOS (the harness's rolling prefix).
"""

import json
import math
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

from tad_jax import harness  # noqa: E402

EOS = "<|endoftext|>"


def _docs(name):
    with open(harness.TASKS_DIR / name) as f:
        return [json.loads(line) for line in f]


def _save_tiny(path, seed):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [d["text"] for d in _docs("tad_text.jsonl")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)
    cfg = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=1024)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # spread-out logits, so the two models score differently
        for _, p in model.named_parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return model, fast


def _logprob(model, context_ids, continuation_ids):
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    n = len(context_ids)
    return sum(float(logp[n - 1 + i, t]) for i, t in enumerate(continuation_ids))


def _reference(model, tok):
    """acc, acc_norm, word perplexity and bits per byte, computed without the harness."""
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    right = right_norm = 0
    for d in _docs("tad_mc.jsonl"):
        context = enc(d["question"])
        lls = [_logprob(model, context, enc(d["question"] + " " + c)[len(context):])
               for c in d["choices"]]
        # The harness normalises by the characters of the choice itself (not the space).
        norm = [ll / len(c) for ll, c in zip(lls, d["choices"], strict=True)]
        right += int(np.argmax(lls) == d["answer"])
        right_norm += int(np.argmax(norm) == d["answer"])
    n = len(_docs("tad_mc.jsonl"))
    total_ll = words = nbytes = 0
    for d in _docs("tad_text.jsonl"):
        total_ll += _logprob(model, [tok.eos_token_id], enc(d["text"]))
        words += len(re.split(r"\s+", d["text"]))
        nbytes += len(d["text"].encode("utf-8"))
    return {"acc": right / n, "acc_norm": right_norm / n,
            "word_perplexity": math.exp(-total_ll / words),
            "bits_per_byte": -total_ll / nbytes / math.log(2)}


@pytest.mark.slow
def test_local_tasks_offline_match_a_hand_computation(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    student = _save_tiny(tmp_path / "student", seed=0)
    teacher = _save_tiny(tmp_path / "teacher", seed=1)
    result = harness.compare(tmp_path / "student", tmp_path / "teacher", list(harness.LOCAL_TASKS),
                             out_dir=tmp_path)
    assert json.loads((tmp_path / harness.RESULTS_FILE).read_text()) == result
    for who, (model, tok) in (("student", student), ("teacher", teacher)):
        want = _reference(model, tok)
        got = result[who]
        assert got["tad_mc"]["acc"] == pytest.approx(want["acc"], abs=1e-9)
        assert got["tad_mc"]["acc_norm"] == pytest.approx(want["acc_norm"], abs=1e-9)
        for m in ("word_perplexity", "bits_per_byte"):
            assert got["tad_text_ppl"][m] == pytest.approx(want[m], rel=1e-5)
    assert result["student"] != result["teacher"]
    table = harness.summary_table(result)
    assert table.splitlines()[0].split() == ["task", "metric", "student", "teacher"]
    assert len(table.splitlines()) == 5


def test_unknown_local_task_and_missing_folder_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="the local tasks are"):
        harness.local_task_config("tad_nope")
    with pytest.raises(FileNotFoundError, match="HF model folder"):
        harness.load_hf_model(tmp_path)
