"""Tests of tad_jax.data: every number is checked against the tokenizer applied directly.

Tokenizers are trained here (a byte-level BPE of 512 tokens) and saved with save_pretrained; the
real-corpus tests read a slice of Debian's Python manual and skip when it is not installed.
"""

import collections
import gzip
import hashlib
import json
import logging
import os
import shutil

import numpy as np
import pytest

from tad_jax.data import (
    BATCH_KEYS,
    default_data_config,
    iterator_state_to_json,
    make_eval_iterator,
    make_train_iterator,
    restore_iterator_state,
    to_global_batch,
)
from tad_jax.data.sources import chunk_text

CORPUS = "/usr/share/info/python3.11.info.gz"
needs_corpus = pytest.mark.skipif(
    not os.path.exists(CORPUS),
    reason=f"{CORPUS} absent: install Debian's python3.11-doc (`make corpus` does it as root)")
EOS = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_WORD_TEXT = (
    "the of and to a in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there one all we their been has when who will more no if "
    "out so said what up its about into than them can only other new some time python function "
    "return value list dict string module class object import")
WORDS = tuple(_WORD_TEXT.split())


def _train_tokenizer(path, chat_template=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = np.random.default_rng(0)
    text = " ".join(rng.choice(WORDS, 20000)) + "\n\n" + " ".join(WORDS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512,
                                  special_tokens=[EOS, "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(path)
    return fast


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok"))
    return path, _train_tokenizer(path)


@pytest.fixture(scope="session")
def chat_tok_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("chat_tok"))
    return path, _train_tokenizer(path, CHAT_TEMPLATE)


def _random_text(rng, n_words):
    return " ".join(rng.choice(WORDS, n_words))


@pytest.fixture(scope="session")
def jsonl_docs(tmp_path_factory):
    """30 distinct documents in two JSONL files (one gzip), one far longer than a row."""
    rng = np.random.default_rng(1)
    docs = [f"doc {i}: " + _random_text(rng, int(rng.integers(3, 60))) for i in range(30)]
    docs[7] += " " + _random_text(rng, 400)  # Several rows long: must be split, never dropped.
    folder = tmp_path_factory.mktemp("jsonl")
    with open(folder / "a.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs[:12]))
    with gzip.open(folder / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[12:])
    return str(folder / "*.jsonl*"), docs


def _cfg(files, tok, **overrides):
    cfg = default_data_config()
    cfg.train_files, cfg.tokenizer = files, tok
    cfg.seq_len, cfg.global_batch_size, cfg.val_fraction, cfg.num_epochs = 32, 4, 0.0, 1
    cfg.update(overrides)
    return cfg


def _all(iterator):
    return list(iterator)


def _pair_stream(batches):
    """(row, t) of every target that counts, in the order the pipeline emitted them."""
    return [(b, r, t) for b, batch in enumerate(batches) for r in range(batch["input_ids"].shape[0])
            for t in np.flatnonzero(batch["loss_mask"][r])]


def _reconstruct(batches, eos_id):
    """Documents (token tuples) rebuilt from the valid pairs; doc index of every valid position."""
    docs, doc_of, current = [], {}, None
    for b, r, t in _pair_stream(batches):
        inp, tgt = int(batches[b]["input_ids"][r, t]), int(batches[b]["targets"][r, t])
        if current is None:
            current = [inp]
        assert current[-1] == inp, "an input is not the previous target of its document"
        current.append(tgt)
        doc_of[(b, r, t)] = len(docs)
        if tgt == eos_id:
            docs.append(tuple(current))
            current = None
    assert current is None, "the stream ends inside a document"
    return docs, doc_of


def _expected_docs(tok, texts):
    return collections.Counter(tuple(tok(t)["input_ids"] + [tok.eos_token_id]) for t in texts)


def _check_rows(batch):
    """Segment ids count 1, 2, ... then 0; positions restart at each segment; padding masked."""
    for r in range(batch["input_ids"].shape[0]):
        seg, pos = batch["segment_ids"][r], batch["positions"][r]
        n = np.count_nonzero(seg)
        assert np.all(seg[n:] == 0) and np.all(batch["loss_mask"][r][n:] == 0)
        assert np.all(np.diff(seg[:n]) >= 0) and np.all(np.diff(seg[:n]) <= 1)
        if n:
            assert seg[0] == 1
        for s in np.unique(seg[:n]):
            np.testing.assert_array_equal(pos[seg == s], np.arange(np.count_nonzero(seg == s)))


def test_pretrain_epoch_loses_and_duplicates_nothing(tok_dir, jsonl_docs):
    path, tok = tok_dir
    files, texts = jsonl_docs
    cfg = _cfg(files, path)
    batches = _all(make_train_iterator(cfg, seed=3, process_index=0, process_count=1))
    for batch in batches:
        assert set(batch) == set(BATCH_KEYS)
        for key in BATCH_KEYS:
            assert batch[key].shape == (4, 32)
            assert batch[key].dtype == (np.float32 if key == "loss_mask" else np.int32)
        np.testing.assert_array_equal(batch["loss_mask"], batch["segment_ids"] > 0)
        _check_rows(batch)
    docs, doc_of = _reconstruct(batches, tok.eos_token_id)
    assert collections.Counter(docs) == _expected_docs(tok, texts)
    # Shuffled: the documents do not come in file order.
    assert docs != [tuple(tok(t)["input_ids"] + [tok.eos_token_id]) for t in texts]
    # No attention pair (same non-zero segment, causal) joins two documents.
    for b, batch in enumerate(batches):
        for r in range(4):
            seg = batch["segment_ids"][r]
            for q in np.flatnonzero(seg):
                for k in np.flatnonzero(seg[: q + 1] == seg[q]):
                    assert doc_of[(b, r, q)] == doc_of[(b, r, k)]


def test_same_seed_same_batches_other_seed_other_order(tok_dir, jsonl_docs):
    cfg = _cfg(jsonl_docs[0], tok_dir[0])
    a, b, c = (_all(make_train_iterator(cfg, seed=s, process_index=0, process_count=1))
               for s in (5, 5, 6))
    assert all(np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x["input_ids"], y["input_ids"])
                   for x, y in zip(a, c, strict=True))


def test_two_processes_read_disjoint_shards_whose_union_is_the_corpus(tok_dir, jsonl_docs):
    path, tok = tok_dir
    cfg = _cfg(jsonl_docs[0], path)
    shards = []
    for index in range(2):
        batches = _all(make_train_iterator(cfg, seed=0, process_index=index, process_count=2))
        assert all(b["input_ids"].shape == (2, 32) for b in batches)
        shards.append(collections.Counter(_reconstruct(batches, tok.eos_token_id)[0]))
    assert not set(shards[0]) & set(shards[1])
    assert shards[0] + shards[1] == _expected_docs(tok, jsonl_docs[1])


def test_restore_through_json_at_every_position_of_the_first_batches(tok_dir, jsonl_docs):
    # Regression: JSON turned grain's "no partial document" sentinel (-1, -1) into [-1, -1], and
    # a resume at such a position (e.g. step 0) silently dropped a document.
    cfg = _cfg(jsonl_docs[0], tok_dir[0], num_epochs=None, global_batch_size=2)
    reference = make_train_iterator(cfg, seed=1, process_index=0, process_count=1)
    states, batches = [], []
    for _ in range(8):
        states.append(iterator_state_to_json(reference))
        batches.append(next(reference))
    for n in range(7):
        fresh = make_train_iterator(cfg, seed=1, process_index=0, process_count=1)
        restore_iterator_state(fresh, states[n])
        for want in batches[n:n + 2]:
            np.testing.assert_array_equal(next(fresh)["input_ids"], want["input_ids"])


def test_fixed_num_shards_give_the_same_global_batches_for_any_process_count(tok_dir,
                                                                          jsonl_docs):
    # data.num_shards=4: one process reads all four shards side by side; two processes read
    # two each; together (process 0's rows, then process 1's) they are the one process's batches.
    cfg = _cfg(jsonl_docs[0], tok_dir[0], num_epochs=None, num_shards=4, global_batch_size=8)
    one = make_train_iterator(cfg, seed=2, process_index=0, process_count=1)
    two = [make_train_iterator(cfg, seed=2, process_index=p, process_count=2) for p in range(2)]
    for _ in range(6):
        whole, halves = next(one), [next(it) for it in two]
        for key in BATCH_KEYS:
            assert halves[0][key].shape == (4, 32)
            np.testing.assert_array_equal(whole[key], np.concatenate([h[key] for h in halves]))
    # Each shard is its own stream: process 1's rows are those of shards 2 and 3 alone.
    solo = make_train_iterator(cfg, seed=2, process_index=1, process_count=2)
    restore_iterator_state(solo, iterator_state_to_json(two[1]))
    for want, got in zip((next(two[1]) for _ in range(3)), (next(solo) for _ in range(3)),
                         strict=True):
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    with pytest.raises(ValueError, match="num_shards=3 is not a multiple of the 2 processes"):
        make_train_iterator(_cfg(jsonl_docs[0], tok_dir[0], num_shards=3), seed=0,
                            process_index=0, process_count=2)


def test_eval_shards_pad_an_ended_shard_with_masked_rows(tok_dir, jsonl_docs):
    # Uneven shards: the shard that ends first gives fully masked rows until the other ends, and
    # every held-out document is read exactly once.
    path, tok = tok_dir
    cfg = _cfg(jsonl_docs[0], path, num_shards=2, val_fraction=0.3)
    batches = _all(make_eval_iterator(cfg, batch_size=2))
    parts = [_all(make_eval_iterator(cfg, batch_size=1, process_index=p, process_count=2))
             for p in range(2)]
    assert len(batches) == max(len(p) for p in parts) and len(parts[0]) != len(parts[1])
    for i, batch in enumerate(batches):
        for r, part in enumerate(parts):
            want = part[i] if i < len(part) else {k: np.zeros_like(v) for k, v in part[0].items()}
            for key in BATCH_KEYS:
                np.testing.assert_array_equal(batch[key][r:r + 1], want[key])


def test_restore_mid_epoch_gives_the_same_next_10_batches(tok_dir, jsonl_docs):
    cfg = _cfg(jsonl_docs[0], tok_dir[0], num_epochs=None)
    it = make_train_iterator(cfg, seed=1, process_index=0, process_count=1)
    for _ in range(7):
        next(it)
    state = iterator_state_to_json(it)
    expected = [next(it) for _ in range(10)]
    fresh = make_train_iterator(cfg, seed=1, process_index=0, process_count=1)
    restore_iterator_state(fresh, state)
    for want, got in zip(expected, (next(fresh) for _ in range(10)), strict=True):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(got[key], want[key])


# ---------------------------------------------------------------- supervised (SFT)


def _sft_examples(rng, n):
    # The response starts with a space, as a prompt/response record should: without a template
    # the text is prompt + response + EOS, tokenised once.
    return [{"prompt": f"q{i}: " + _random_text(rng, int(rng.integers(2, 12))),
             "response": " " + _random_text(rng, int(rng.integers(1, 10)))} for i in range(n)]


def _segments(batches):
    """(inputs, targets, loss_mask) of every non-padding segment of every row."""
    out = []
    for batch in batches:
        for r in range(batch["input_ids"].shape[0]):
            seg = batch["segment_ids"][r]
            for s in np.unique(seg[seg > 0]):
                sel = seg == s
                out.append((batch["input_ids"][r][sel], batch["targets"][r][sel],
                            batch["loss_mask"][r][sel]))
    return out


def _example_view(inputs, targets, mask):
    """(all tokens, the targets that count) of one segment."""
    return (int(inputs[0]), *map(int, targets)), tuple(int(t) for t in targets[mask > 0])


@pytest.mark.parametrize("pack", [True, False])
def test_sft_prompt_response_masks_exactly_the_response(tmp_path, tok_dir, pack):
    path, tok = tok_dir
    examples = _sft_examples(np.random.default_rng(2), 20)
    with open(tmp_path / "sft.jsonl", "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in examples)
    cfg = _cfg(str(tmp_path / "sft.jsonl"), path, mode="sft", pack=pack, seq_len=48)
    batches = _all(make_train_iterator(cfg, seed=0, process_index=0, process_count=1))
    for batch in batches:
        _check_rows(batch)
    got = collections.Counter(_example_view(*seg) for seg in _segments(batches))
    want = collections.Counter()
    for e in examples:
        # The byte-level pre-tokenizer cuts before " word": the pieces tokenise as the whole text.
        response = tok(e["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        want[(tuple(tok(e["prompt"])["input_ids"] + response), tuple(response))] += 1
    assert got == want
    rows = sum(b["input_ids"].shape[0] for b in batches)
    assert (rows < len(examples)) if pack else (rows >= len(examples))


def test_sft_chat_template_masks_exactly_the_assistant_turns(tmp_path, chat_tok_dir):
    path, tok = chat_tok_dir
    rng = np.random.default_rng(3)
    convs = [[{"role": "system", "content": "be brief"},
              {"role": "user", "content": _random_text(rng, 5)},
              {"role": "assistant", "content": _random_text(rng, 4)},
              {"role": "user", "content": _random_text(rng, 3)},
              {"role": "assistant", "content": _random_text(rng, 6)}] for _ in range(8)]
    pairs = _sft_examples(rng, 4)  # prompt/response records get the template too
    with open(tmp_path / "chat.jsonl", "w") as f:
        f.writelines(json.dumps({"messages": c}) + "\n" for c in convs)
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    cfg = _cfg(str(tmp_path / "chat.jsonl"), path, mode="sft", seq_len=96)
    batches = _all(make_train_iterator(cfg, seed=0, process_index=0, process_count=1))
    got = collections.Counter(_example_view(*seg) for seg in _segments(batches))
    convs += [[{"role": "user", "content": p["prompt"]},
               {"role": "assistant", "content": p["response"]}] for p in pairs]
    want = collections.Counter()
    for conv in convs:
        # The template written out by hand: the reference does not call apply_chat_template.
        # The answer is the content and <|im_end|>; the "\n" after it is never generated.
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in conv)
        answers = [t for m in conv if m["role"] == "assistant"
                   for t in tok(m["content"] + "<|im_end|>",
                                add_special_tokens=False)["input_ids"]]
        want[(tuple(tok(text, add_special_tokens=False)["input_ids"]), tuple(answers))] += 1
    assert got == want


def test_sft_messages_without_a_chat_template(tmp_path, tok_dir):
    path, tok = tok_dir
    conv = [{"role": "user", "content": "list the value"},
            {"role": "assistant", "content": "a list value"},
            {"role": "user", "content": "and the dict"},
            {"role": "assistant", "content": "one dict"}]
    with open(tmp_path / "m.jsonl", "w") as f:
        f.write(json.dumps({"messages": conv}) + "\n")
    cfg = _cfg(str(tmp_path / "m.jsonl"), path, mode="sft", seq_len=64, global_batch_size=1)
    (seg,) = _segments(_all(make_train_iterator(cfg, seed=0, process_index=0, process_count=1)))
    enc = lambda text, special=False: tok(text, add_special_tokens=special)["input_ids"]
    eos = [tok.eos_token_id]
    # The whole text tokenised once; " a" and " one" are single tokens that straddle the start of
    # the answers (their space belongs to "assistant: "), so they count, as in transformers.
    answers = enc(" a list value") + eos + enc(" one dict") + eos
    tokens = enc(f"user: list the value\nassistant: a list value{EOS}\nuser: and the dict\n"
                 f"assistant: one dict{EOS}\n", True)
    assert _example_view(*seg) == (tuple(tokens), tuple(answers))


def test_sft_example_longer_than_a_row_is_truncated_with_a_warning(tmp_path, tok_dir, caplog):
    path, tok = tok_dir
    with open(tmp_path / "long.jsonl", "w") as f:
        f.write(json.dumps({"prompt": "q", "response": " ".join(["value"] * 200)}) + "\n")
    cfg = _cfg(str(tmp_path / "long.jsonl"), path, mode="sft", seq_len=16, global_batch_size=1)
    with caplog.at_level(logging.WARNING):
        (batch,) = _all(make_train_iterator(cfg, seed=0, process_index=0, process_count=1))
    assert "truncating a supervised example" in caplog.text
    assert np.all(batch["segment_ids"] == 1)


# ---------------------------------------------------------------- held-out split, eval


def test_validation_never_overlaps_training(tok_dir, jsonl_docs):
    path, tok = tok_dir
    cfg = _cfg(jsonl_docs[0], path, val_fraction=0.3)
    train = _reconstruct(_all(make_train_iterator(cfg, seed=0, process_index=0,
                                                  process_count=1)), tok.eos_token_id)[0]
    val_batches = _all(make_eval_iterator(cfg, batch_size=2))
    val = _reconstruct(val_batches, tok.eos_token_id)[0]
    assert train and val and not set(train) & set(val)
    assert collections.Counter(train + val) == _expected_docs(tok, jsonl_docs[1])
    # Deterministic and finite; max_batches caps it.
    again = _all(make_eval_iterator(cfg, batch_size=2))
    assert all(np.array_equal(a["input_ids"], b["input_ids"])
               for a, b in zip(val_batches, again, strict=True))
    assert len(_all(make_eval_iterator(cfg, batch_size=2, max_batches=1))) == 1


def test_val_files_are_the_validation_split(tmp_path, tok_dir, jsonl_docs):
    path, tok = tok_dir
    (tmp_path / "val.txt").write_text("held out paragraph one\n\nheld out paragraph two\n")
    cfg = _cfg(jsonl_docs[0], path, val_files=str(tmp_path / "val.txt"),
               text_chunking="lines")
    val = _reconstruct(_all(make_eval_iterator(cfg, batch_size=2)), tok.eos_token_id)[0]
    assert collections.Counter(val) == _expected_docs(
        tok, ["held out paragraph one", "held out paragraph two"])


def test_val_files_inside_the_train_glob_are_held_out(tmp_path, tok_dir):
    # train_files="d/*.jsonl" with val_files="d/val.jsonl" trained on the held-out documents too
    # (a reviewer's finding): the validation files are now taken out of the training split.
    path, tok = tok_dir
    texts = {"a": ["train doc one", "train doc two"], "val": ["held out doc"]}
    for name, docs in texts.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                        for t in docs))
    cfg = _cfg(str(tmp_path / "*.jsonl"), path, val_files=str(tmp_path / "val.jsonl"))
    train = _reconstruct(_all(make_train_iterator(cfg, seed=0, process_index=0,
                                                  process_count=1)), tok.eos_token_id)[0]
    val = _reconstruct(_all(make_eval_iterator(cfg, batch_size=2)), tok.eos_token_id)[0]
    assert collections.Counter(train) == _expected_docs(tok, texts["a"])
    assert collections.Counter(val) == _expected_docs(tok, texts["val"])
    cfg = _cfg(str(tmp_path / "val.jsonl"), path, val_files=str(tmp_path / "*.jsonl"))
    with pytest.raises(ValueError, match="nothing is left to train on"):
        make_train_iterator(cfg, seed=0, process_index=0, process_count=1)


def test_edited_file_is_read_again(tmp_path, tok_dir):
    path, tok = tok_dir
    data = tmp_path / "d.jsonl"
    for texts in (["first version"], ["second, longer version", "and a new document"]):
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        docs = _reconstruct(_all(make_train_iterator(_cfg(str(data), path), seed=0,
                                                     process_index=0, process_count=1)),
                            tok.eos_token_id)[0]
        assert collections.Counter(docs) == _expected_docs(tok, texts)


def test_chunk_text_paragraphs_merge_to_the_target_size():
    text = "aaaa\nbbbb\n\n  \n\ncccc\n\ndddddddddd\n\n\nee\n"
    assert chunk_text(text, "paragraphs", 12) == ["aaaa\nbbbb\n\ncccc", "dddddddddd", "ee\n"]
    assert chunk_text(text, "paragraphs", 1000) == ["aaaa\nbbbb\n\ncccc\n\ndddddddddd\n\nee\n"]
    assert chunk_text(text, "lines", 0) == ["aaaa", "bbbb", "cccc", "dddddddddd", "ee"]
    assert chunk_text(text, "file", 0) == [text]


@needs_corpus
def test_real_corpus_plain_gzip_zstd_split_and_packed(tmp_path, tok_dir):
    import zstandard

    path, tok = tok_dir
    with gzip.open(CORPUS, "rt") as f:
        text = f.read(90_000)
    parts = [text[:30_000], text[30_000:60_000], text[60_000:]]
    (tmp_path / "a.txt").write_text(parts[0])
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write(parts[1])
    (tmp_path / "c.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(parts[2].encode()))
    cfg = _cfg(str(tmp_path / "*.txt*"), path, seq_len=128, global_batch_size=8,
               text_chunking="paragraphs", text_chunk_chars=1500, val_fraction=0.2)
    train_batches = _all(make_train_iterator(cfg, seed=0, process_index=0, process_count=1))
    train = _reconstruct(train_batches, tok.eos_token_id)[0]
    val = _reconstruct(_all(make_eval_iterator(cfg, batch_size=8)), tok.eos_token_id)[0]
    docs = [d for p in parts for d in chunk_text(p, "paragraphs", 1500)]
    assert collections.Counter(train + val) == _expected_docs(tok, docs)
    assert not set(train) & set(val) and 0.05 < len(val) / len(docs) < 0.4
    assert max(map(len, train)) > 2 * 128  # documents longer than a row were split, not dropped


# ---------------------------------------------------------------- formats, bad input


def test_parquet_source(tmp_path, tok_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path, tok = tok_dir
    texts = [f"parquet row {i} " + _random_text(np.random.default_rng(i), 9) for i in range(10)]
    pq.write_table(pa.table({"body": texts, "n": list(range(10))}), tmp_path / "t.parquet")
    cfg = _cfg(str(tmp_path / "t.parquet"), path, text_field="body")
    docs = _reconstruct(_all(make_train_iterator(cfg, seed=0, process_index=0, process_count=1)),
                        tok.eos_token_id)[0]
    assert collections.Counter(docs) == _expected_docs(tok, texts)


def test_malformed_jsonl_line_is_counted_and_skipped_or_raises(tmp_path, tok_dir, caplog):
    path, tok = tok_dir
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "good one"}\n{"text": broken\n[1, 2]\n{"text": "good two"}\n')
    cfg = _cfg(str(bad), path)
    with caplog.at_level(logging.WARNING):
        docs = _reconstruct(_all(make_train_iterator(cfg, seed=0, process_index=0,
                                                     process_count=1)), tok.eos_token_id)[0]
    assert collections.Counter(docs) == _expected_docs(tok, ["good one", "good two"])
    assert f"{bad}:2" in caplog.text and f"{bad}:3" in caplog.text
    assert "skipped 2 malformed" in caplog.text
    with pytest.raises(ValueError, match=r"bad.jsonl:2.*strict_jsonl"):
        make_train_iterator(_cfg(str(bad), path, strict_jsonl=True), seed=0,
                            process_index=0, process_count=1)


@pytest.mark.parametrize("change, error, match", [
    ({"train_files": "/nonexistent/*.jsonl"}, FileNotFoundError, "no file matches"),
    ({"tokenizer": "/nonexistent/tok"}, FileNotFoundError, "tokenizer"),
    ({"tokenizer": ""}, ValueError, "data.tokenizer is not set"),
    ({"text_field": "body"}, ValueError, "set data.text_field"),
    ({"seq_len": 1}, ValueError, "at least 2"),
    ({"global_batch_size": 3}, ValueError, "multiple"),
    ({"mode": "chat"}, ValueError, "data.mode"),
    ({"mode": "sft"}, ValueError, "data.prompt_field"),
    ({"format": "csv"}, ValueError, "data.format"),
    ({"val_fraction": 1.0}, ValueError, "val_fraction"),
    ({"process_index": 2}, ValueError, "process_index=2"),
    ({"num_epochs": 0}, ValueError, "num_epochs=0"),
    ({"process_index": 31, "process_count": 32, "global_batch_size": 64}, ValueError,
     "gets none of the 30"),
])
def test_bad_input_errors_name_the_fix(tok_dir, jsonl_docs, change, error, match):
    shard = {"process_index": change.pop("process_index", 0),
             "process_count": change.pop("process_count", 2)}
    cfg = _cfg(jsonl_docs[0], tok_dir[0])
    cfg.update(change)
    with pytest.raises(error, match=match):
        make_train_iterator(cfg, seed=0, **shard)


def test_empty_corpus_is_an_error(tmp_path, tok_dir):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match=r"train split of .*empty.txt.* is empty"):
        make_train_iterator(_cfg(str(tmp_path / "empty.txt"), tok_dir[0]), seed=0,
                            process_index=0, process_count=1)


# ---------------------------------------------------------------- pre-tokenised folders


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(x[key], y[key])


def test_prepared_folder_gives_the_same_batches_as_tokenising_on_the_fly(
        tmp_path, tok_dir, jsonl_docs):
    from tad_jax.data.prepared import prepare

    cfg = _cfg(jsonl_docs[0], tok_dir[0], val_fraction=0.3)
    meta = prepare(cfg, str(tmp_path / "prep"))
    assert meta["splits"]["train"]["documents"] + meta["splits"]["validation"]["documents"] == 30
    prepared = _cfg("/nonexistent/ignored", "", val_fraction=0.3,
                    prepared_dir=str(tmp_path / "prep"))
    for process_index in (0, 1):
        _assert_same_batches(
            _all(make_train_iterator(cfg, seed=4, process_index=process_index, process_count=2)),
            _all(make_train_iterator(prepared, seed=4, process_index=process_index,
                                     process_count=2)))
    _assert_same_batches(_all(make_eval_iterator(cfg, batch_size=2)),
                         _all(make_eval_iterator(prepared, batch_size=2)))


def test_prepare_writes_an_empty_split(tmp_path, tok_dir, jsonl_docs):
    # A split of 0 (or a multiple of 256) documents ended by tokenising an empty list, which
    # the tokenizer refuses: prepare crashed after all the work, with no meta.json (a reviewer's
    # finding).
    from tad_jax.data.prepared import prepare

    meta = prepare(_cfg(jsonl_docs[0], tok_dir[0], val_fraction=0.0), str(tmp_path / "prep"))
    assert meta["splits"]["validation"] == {"documents": 0, "tokens": 0, "ids_sha256":
                                            hashlib.sha256(b"").hexdigest()}
    assert meta["splits"]["train"]["documents"] == 30


def test_prepared_sft_chat_and_bad_folders(tmp_path, chat_tok_dir):
    from tad_jax.data.prepared import prepare

    rng = np.random.default_rng(5)
    with open(tmp_path / "sft.jsonl", "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in _sft_examples(rng, 12))
    cfg = _cfg(str(tmp_path / "sft.jsonl"), chat_tok_dir[0], mode="sft", seq_len=24)
    prepare(cfg, str(tmp_path / "prep"), splits=("train",))
    prepared = _cfg("", "", mode="sft", seq_len=24, prepared_dir=str(tmp_path / "prep"))
    _assert_same_batches(_all(make_train_iterator(cfg, seed=0, process_index=0, process_count=1)),
                         _all(make_train_iterator(prepared, seed=0, process_index=0,
                                                  process_count=1)))
    prepared.mode = "pretrain"
    with pytest.raises(ValueError, match="prepared for mode 'sft'"):
        make_train_iterator(prepared, seed=0, process_index=0, process_count=1)
    prepared.mode = "sft"
    prepared.use_chat_template = False  # prepared with the template: other token ids
    with pytest.raises(ValueError, match="use_chat_template=True, but .*=False: set it to True"):
        make_train_iterator(prepared, seed=0, process_index=0, process_count=1)
    prepared.use_chat_template = True
    other = tmp_path / "other_tokenizer"
    shutil.copytree(chat_tok_dir[0], other)
    prepared.tokenizer = str(other) + "/"  # the same files at another path: accepted
    make_train_iterator(prepared, seed=0, process_index=0, process_count=1)
    config_path = other / "tokenizer_config.json"
    config_path.write_text(config_path.read_text().replace("}", ', "extra_field": 1}', 1))
    with pytest.raises(ValueError, match="files differ .* set data.tokenizer to"):
        make_train_iterator(prepared, seed=0, process_index=0, process_count=1)
    meta_path = tmp_path / "prep" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format_version": 0}))
    with pytest.raises(ValueError, match="format version 0; this code reads 1: run scripts/prep"):
        make_train_iterator(prepared, seed=0, process_index=0, process_count=1)
    prepared.prepared_dir = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="prepare_data.py"):
        make_train_iterator(prepared, seed=0, process_index=0, process_count=1)


# ---------------------------------------------------------------- workers, checkpoints, jax


@pytest.mark.slow
def test_workers_restore_mid_epoch(tok_dir, jsonl_docs):
    cfg = _cfg(jsonl_docs[0], tok_dir[0], num_epochs=None, num_workers=2)
    it = make_train_iterator(cfg, seed=1, process_index=0, process_count=1)
    for _ in range(5):
        next(it)
    state = iterator_state_to_json(it)
    expected = [next(it) for _ in range(10)]
    it.close()
    fresh = make_train_iterator(cfg, seed=1, process_index=0, process_count=1)
    restore_iterator_state(fresh, state)
    got = [next(fresh) for _ in range(10)]
    fresh.close()
    for want, have in zip(expected, got, strict=True):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(have[key], want[key])


def test_orbax_saves_and_restores_the_iterator(tmp_path, tok_dir, jsonl_docs):
    import grain
    import orbax.checkpoint as ocp

    cfg = _cfg(jsonl_docs[0], tok_dir[0], num_epochs=None)
    it = make_train_iterator(cfg, seed=2, process_index=0, process_count=1)
    for _ in range(3):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt",
                               item_handlers={"data": grain.checkpoint.CheckpointHandler()}) as m:
        m.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        m.wait_until_finished()
    expected = [next(it) for _ in range(4)]
    fresh = make_train_iterator(cfg, seed=2, process_index=0, process_count=1)
    with ocp.CheckpointManager(tmp_path / "ckpt",
                               item_handlers={"data": grain.checkpoint.CheckpointHandler()}) as m:
        m.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    for want in expected:
        np.testing.assert_array_equal(next(fresh)["input_ids"], want["input_ids"])


def test_to_global_batch_lays_the_batch_over_the_mesh(tok_dir, jsonl_docs):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    cfg = _cfg(jsonl_docs[0], tok_dir[0], global_batch_size=8)
    batch = next(make_train_iterator(cfg, seed=0))  # defaults: this single process
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
    global_batch = to_global_batch(batch, sharding)
    for key in BATCH_KEYS:
        assert global_batch[key].sharding == sharding
        assert global_batch[key].dtype == batch[key].dtype
        np.testing.assert_array_equal(np.asarray(global_batch[key]), batch[key])
