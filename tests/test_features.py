"""Supervised tokens (tad_jax.data.features.sft_ids) against the tokenizer's own chat machinery.

For every template style the ids must equal ``tokenizer.apply_chat_template(messages,
tokenize=True)`` and the response flags must equal transformers' ``return_assistant_tokens_mask``
of the same template with ``{% generation %}`` markers around each assistant turn's content and
end-of-turn marker. Tokenizers are trained here: a SentencePiece-style BPE in the Llama-2 /
TinyLlama ``tokenizer.json`` layout (normalizer Prepend("▁") + Replace(" ", "▁"), byte fallback;
Gemma's without the Prepend) and a byte-level BPE for ChatML.
"""

import json
import re

import numpy as np
import pytest

from tad_jax.data.features import sft_ids

SENTENCES = [
    "What is the capital of France?", "Paris is the capital of France.",
    "The cat sat on the mat.", "Hello, how are you today?", "I am fine, thank you.",
    "[INST] Tell me a story. [/INST] Once upon a time.", "Be brief and kind.",
    "Name a colour of the sky. Blue, on a clear day.",
]

# Each style: the template with generation markers (what the mask must cover), the special tokens
# its tokenizer holds, and the tokenizer's layout.
_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>"
    "{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# The issue's example template, as written there.
_LLAMA2_ISSUE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} "
    "[/INST]{% else %}{% generation %} {{ m['content'] }} {{ eos_token }}{% endgeneration %}"
    "{% endif %}{% endfor %}")
# Llama-2-chat's own template: the system prompt inside the first [INST], BOS before each turn.
_LLAMA2_SYSTEM = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set turns = messages[1:] %}{% else %}{% set system = '' %}{% set turns = messages %}"
    "{% endif %}{% for m in turns %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] "
    "{% if loop.first and system %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n{% endif %}"
    "{{ m['content'] }} [/INST]{% else %}{% generation %} {{ m['content'] }} {{ eos_token }}"
    "{% endgeneration %}{% endif %}{% endfor %}")
# Phi-3-mini's: the final EOS is written after the last turn only, never generated. (Jinja eats a
# "\n" right after a block tag, hence {{ '\n' }}.)
_PHI3 = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>\n{% generation %}"
    "{{ m['content'] }}<|end|>{% endgeneration %}{{ '\\n' }}{% else %}<|{{ m['role'] }}|>\n"
    "{{ m['content'] }}<|end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}")
_GEMMA = (
    "{{ bos_token }}{% for m in messages %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n{% if role == 'model' %}{% generation %}{{ m['content'] | trim }}"
    "<end_of_turn>{% endgeneration %}{% else %}{{ m['content'] | trim }}<end_of_turn>{% endif %}"
    "\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")

STYLES = {
    "chatml": (_CHATML, "byte_level", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
    "llama2": (_LLAMA2_ISSUE, "llama", ["<unk>", "<s>", "</s>"]),
    "llama2_system": (_LLAMA2_SYSTEM, "llama", ["<unk>", "<s>", "</s>"]),
    "phi3": (_PHI3, "llama", ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>",
                              "<|system|>"]),
    "gemma": (_GEMMA, "gemma", ["<unk>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]),
}
_MARKERS = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")

QA = [{"role": "user", "content": "What is the capital of France?"},
      {"role": "assistant", "content": "Paris."}]
MULTI = [{"role": "user", "content": "Hello, how are you today?"},
         {"role": "assistant", "content": "I am fine, thank you."},
         {"role": "user", "content": "Name a colour of the sky."},
         {"role": "assistant", "content": "Blue, on a clear day."}]
SYSTEM = [{"role": "system", "content": "Be brief and kind."}, *MULTI]
# A conversation that opens with the assistant: what the template writes before that turn (a
# header, a default system prompt) is no response (a reviewer found it marked).
OPENING = [{"role": "assistant", "content": "Hello, how are you today?"},
           {"role": "user", "content": "I am fine, thank you."},
           {"role": "assistant", "content": "Paris is the capital of France."}]
# Non-ASCII text exercises the byte fallback.
UNSEEN = [{"role": "user", "content": "Où est la tour Eiffel ?"},
          {"role": "assistant", "content": "À Paris — près de la Seine."}]


def _tokenizer(layout: str, specials: list[str], template: str):
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=specials[0] if layout != "byte_level" else None))
    if layout == "byte_level":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(SENTENCES, trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=specials[0])
    else:
        steps = [normalizers.Replace(" ", "▁")]
        if layout == "llama":
            steps.insert(0, normalizers.Prepend("▁"))
        tok.normalizer = normalizers.Sequence(steps)
        # Trained on whole words, as SentencePiece does; the saved layout has no pre-tokenizer.
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
        tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=160,
                                                               special_tokens=specials))
        spec = json.loads(tok.to_str())
        spec["pre_tokenizer"] = None
        spec["model"].update(byte_fallback=True, fuse_unk=True)
        vocab = spec["model"]["vocab"]
        for byte in range(256):
            vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
        tok = Tokenizer.from_str(json.dumps(spec))
        # As Llama-2's and Gemma's: the tokenizer itself adds BOS (chat templates write it).
        bos = specials[1]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse()])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=specials[0],
                                       bos_token=specials[1], eos_token=specials[2])
    fast.add_special_tokens({"additional_special_tokens": specials[3:]})
    fast.chat_template = template
    return fast


@pytest.fixture(scope="module")
def tokenizers():
    """style -> (tokenizer with the plain template, the same with generation markers)."""
    out = {}
    for name, (marked, layout, specials) in STYLES.items():
        out[name] = (_tokenizer(layout, specials, _MARKERS.sub("", marked)),
                     _tokenizer(layout, specials, marked))
    return out


def _reference(marked_tok, messages):
    out = marked_tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)
    return np.asarray(out["input_ids"]), np.asarray(out["assistant_masks"], bool)


@pytest.mark.parametrize("conversation", ["qa", "multi", "system", "unseen", "opening"])
@pytest.mark.parametrize("style", list(STYLES))
def test_ids_and_mask_equal_the_tokenizers_own(tokenizers, style, conversation):
    messages = {"qa": QA, "multi": MULTI, "system": SYSTEM, "unseen": UNSEEN,
                "opening": OPENING}[conversation]
    if conversation == "system" and style == "llama2":
        pytest.skip("the issue's [INST] template has no system turn (llama2_system has)")
    plain, marked = tokenizers[style]
    want_ids, want_mask = _reference(marked, messages)
    # The plain template renders the same text: the markers only annotate it.
    assert plain.apply_chat_template(messages, tokenize=False) == marked.apply_chat_template(
        messages, tokenize=False)
    np.testing.assert_array_equal(
        plain.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"],
        want_ids)
    assert want_mask.sum() > 0
    for tok in (plain, marked):  # character offsets, and the generation markers
        ids, flags = sft_ids(tok, {"messages": messages}, use_chat_template=True)
        assert ids.dtype == np.int32 and flags.dtype == bool
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(flags, want_mask)


def test_prompt_response_record_is_a_two_turn_conversation(tokenizers):
    plain, marked = tokenizers["phi3"]
    ids, flags = sft_ids(plain, {"prompt": QA[0]["content"], "response": QA[1]["content"]}, True)
    want_ids, want_mask = _reference(marked, QA)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(flags, want_mask)


def test_the_issues_inst_example_has_no_doubled_word_start(tokenizers):
    """The issue's case: piecewise tokenisation gave " Paris." its own leading "▁" ("▁▁Par...")."""
    tok, _ = tokenizers["llama2"]
    ids, flags = sft_ids(tok, {"messages": QA}, use_chat_template=True)
    pieces = tok.convert_ids_to_tokens(ids.tolist())
    # Written out by hand from the trained vocabulary (words are whole pieces).
    assert pieces == ["<s>", "▁[INST]", "▁What", "▁is", "▁the", "▁capital", "▁of", "▁France?",
                      "▁[/INST]", "▁Paris", ".", "▁", "</s>"]
    assert [p for p, f in zip(pieces, flags, strict=True) if f] == ["▁Paris", ".", "▁", "</s>"]
    # What tokenising the answer on its own gives: one piece more, a doubled word start.
    alone = tok.convert_ids_to_tokens(tok(" Paris. </s>", add_special_tokens=False)["input_ids"])
    assert alone == ["▁", "▁Paris", ".", "▁", "</s>"]


def test_without_a_template_the_text_is_tokenised_once(tokenizers):
    tok, _ = tokenizers["llama2"]
    doc = {"prompt": "What is the capital of France?", "response": " Paris."}
    ids, flags = sft_ids(tok, doc, use_chat_template=False)
    want = tok("What is the capital of France? Paris.</s>")["input_ids"]
    np.testing.assert_array_equal(ids, want)
    assert tok.convert_ids_to_tokens([int(i) for i in ids[flags]]) == ["▁Paris", ".", "</s>"]
    assert ids[0] == tok.bos_token_id and not flags[0]


def test_template_that_rewrites_earlier_turns_is_an_error_naming_the_fix(tokenizers):
    tok = _tokenizer("byte_level", STYLES["chatml"][2], _MARKERS.sub("", _CHATML).replace(
        "messages %}", "messages | reverse %}", 1))
    with pytest.raises(ValueError, match="generation"):
        sft_ids(tok, {"messages": MULTI}, use_chat_template=True)


def test_template_that_refuses_a_trailing_user_turn_still_masks_the_turns(tokenizers):
    """Locating a turn's end renders one more user turn; a template may refuse that."""
    refuse = ("{% if messages[-1]['role'] == 'user' and not add_generation_prompt %}"
              "{{ raise_exception('a conversation must end with the assistant') }}{% endif %}")
    plain = _tokenizer("byte_level", STYLES["chatml"][2], refuse + _MARKERS.sub("", _CHATML))
    marked = _tokenizer("byte_level", STYLES["chatml"][2], refuse + _CHATML)
    want_ids, want_mask = _reference(marked, MULTI)
    ids, flags = sft_ids(plain, {"messages": MULTI}, use_chat_template=True)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(flags, want_mask)
