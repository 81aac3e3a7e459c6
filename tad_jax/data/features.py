"""Tokenisation: documents → per-document training pairs, run inside grain (worker) processes.

Every document becomes three aligned 1-D arrays of length n - 1 for its n tokens ``ids_n``:
``input_ids = ids_n[:-1]``, ``targets = ids_n[1:]`` and ``loss_mask`` (float32, 1 where the target
counts). Shifting per document, before packing, means a target never belongs to the next
document, and a document split across two rows keeps every (input, target) pair exactly once.

Pretraining: ``ids_n`` = the tokenizer's own encoding (its BOS, if it adds one) + EOS; every target
counts. Supervised: the whole conversation is rendered once (with the tokenizer's chat template
when it has one) and tokenised once, so the ids are those the model sees at inference; only
targets inside the assistant turns count (see ``sft_ids``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import threading

import grain
import numpy as np

logger = logging.getLogger(__name__)

# A pool of loaded tokenizers per folder: an HF fast tokenizer used by two threads at once raises
# "Already borrowed", so each thread borrows its own; the pool grows to the number of threads
# that map at the same time and is reused by later iterators. Transforms pickle only the path.
_POOLS: dict[str, queue.SimpleQueue] = {}
# Loading imports transformers; two threads importing it at once break its lazy modules.
_LOAD_LOCK = threading.Lock()
_MAX_TRUNCATION_WARNINGS = 10
_truncations = 0


@contextlib.contextmanager
def borrow_tokenizer(path: str):
    """Lends this thread, for the ``with`` block, an HF tokenizer of the local folder ``path``.

    Raises:
        ValueError: ``path`` is unset, or the tokenizer has no EOS token.
        FileNotFoundError: ``path`` is not a folder.
    """
    if not path:
        raise ValueError("data.tokenizer is not set: give a local tokenizer folder "
                         "(one written by tokenizer.save_pretrained).")
    with _LOAD_LOCK:
        pool = _POOLS.setdefault(path, queue.SimpleQueue())
    try:
        tok = pool.get_nowait()
    except queue.Empty:
        with _LOAD_LOCK:
            tok = _load(path)
    try:
        yield tok
    finally:
        pool.put(tok)


def check_tokenizer(path: str) -> None:
    """Raises the errors of ``borrow_tokenizer`` now (in the main process, not in a worker)."""
    with borrow_tokenizer(path):
        pass


def _load(path: str):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"data.tokenizer={path!r} is not a folder; give a local "
                                "tokenizer folder (tokenizer.save_pretrained(path)).")
    from transformers import AutoTokenizer  # Heavy import, only where tokenising.

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.eos_token_id is None:
        raise ValueError(f"the tokenizer in {path} has no EOS token; set eos_token in its "
                         "tokenizer_config.json (documents are separated by EOS).")
    return tok


def pairs_from_ids(ids_n: np.ndarray, response_n: np.ndarray | None = None) -> dict:
    """Shifted (input, target) pairs of one token sequence; mask from per-token response flags."""
    ids_n = np.asarray(ids_n, dtype=np.int32)
    mask_n = np.ones(len(ids_n), np.float32) if response_n is None else response_n.astype(
        np.float32)
    return {"input_ids": ids_n[:-1], "targets": ids_n[1:], "loss_mask": mask_n[1:]}


def pretrain_ids(tok, text: str) -> np.ndarray:
    """The token ids of one pretraining document: the tokenizer's encoding, then EOS."""
    ids = tok(text, add_special_tokens=True)["input_ids"]
    if not ids or ids[-1] != tok.eos_token_id:
        ids = [*ids, tok.eos_token_id]
    return np.asarray(ids, np.int32)


# Jinja's generation block, as transformers detects it: the template marks what the model writes.
_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _has_generation_block(template: str) -> bool:
    return bool(_GENERATION_BLOCK.search(template))


# A user turn appended after an assistant turn to see where the template ends that turn.
_NEXT_TURN = {"role": "user", "content": "next"}


def _assistant_spans(tok, messages: list[dict], text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the assistant turns in ``text``, the rendered conversation.

    A turn starts where the rendering of the conversation before it, with the generation prompt,
    ends. It ends where two renderings that share it part: the one ending with the turn and the
    one that continues with another user turn (compared token by token, so a special token is
    never cut), which leaves out what a template writes after the last turn only (Phi-3's EOS).
    The whitespace after the end-of-turn marker is left out too: generation stops at the marker,
    so the model never writes it. So a span is the content and the end-of-turn marker.

    Raises:
        ValueError: the template does not render a conversation as a prefix of its continuation.
    """
    def render(msgs, gen):
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    def opening(after):
        """What the template writes before an opening assistant turn (a BOS, a default system
        prompt, the turn's header): what two one-turn conversations that differ only in their
        content share (transformers renders no empty conversation), up to the end of the
        generation prompt, as for later turns (a template whose prompt is empty writes the
        space before the content as part of the turn: Llama-2's " {{ content }}")."""
        user = [{"role": "user", "content": "x"}]
        try:
            one, two = (render([{"role": "assistant", "content": c}], False) for c in "xy")
            asked, said = render(user, True), render(user, False)
        except Exception:  # noqa: BLE001 (a template that refuses such turns: jinja's errors)
            return ""
        head = os.path.commonprefix([one, two])
        prompt = asked[len(os.path.commonprefix([asked, said])):]  # (Phi-3 ends `said` by EOS)
        if not (prompt and head.endswith(prompt)):
            head = head.rstrip()
        return head if after.startswith(head) else ""

    def encode(s):
        return tok(s, add_special_tokens=False, return_offsets_mapping=True)

    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        after = render(messages[: k + 1], False)
        before = render(messages[:k], True) if k else opening(after)
        this = encode(after)
        try:
            nxt = encode(render([*messages[: k + 1], _NEXT_TURN], False))["input_ids"]
        except Exception:  # noqa: BLE001 (a template that refuses the extra turn: jinja's errors)
            nxt = this["input_ids"]  # then the turn runs to the end of its rendering
        shared = 0
        for a, b in zip(this["input_ids"], nxt, strict=False):
            if a != b:
                break
            shared += 1
        end = this["offset_mapping"][shared - 1][1] if shared else 0
        end = max(len(after[:end].rstrip()), len(before))
        if not (after.startswith(before) and text.startswith(after[:end])):
            raise ValueError(
                "the tokenizer's chat template does not render a conversation as a prefix of its "
                "continuation, so the assistant turns cannot be located; mark them in the template "
                "with {% generation %}...{% endgeneration %}, or set data.use_chat_template=False.")
        spans.append((len(before), end))
    return spans


def _plain_render(tok, doc: dict) -> tuple[str, list[tuple[int, int]]]:
    """The text of an example without a chat template, and the character spans of its responses.

    A prompt/response pair is ``prompt + response + EOS`` (no separator is added: the data decides
    the spacing); messages are "role: content" lines, each assistant content ended by EOS.
    """
    eos = tok.eos_token
    if "prompt" in doc:
        start = len(doc["prompt"])
        text = doc["prompt"] + doc["response"] + eos
        return text, [(start, len(text))]
    text, spans = "", []
    for m in doc["messages"]:
        if m["role"] == "assistant":
            text += "assistant: "
            spans.append((len(text), len(text) + len(m["content"]) + len(eos)))
            text += m["content"] + eos + "\n"
        else:
            text += f"{m['role']}: {m['content']}\n"
    return text, spans


def _tokens_in_spans(offsets, spans: list[tuple[int, int]]) -> np.ndarray:
    """Per-token flags: True where a token's characters overlap a span.

    The same rule as transformers' ``return_assistant_tokens_mask``: a token that straddles a
    span's edge counts, and a token without characters (an added BOS) never does.
    """
    flags = np.zeros(len(offsets), bool)
    for start, end in spans:
        for i, (a, b) in enumerate(offsets):
            if a < end and b > start:
                flags[i] = True
    return flags


def sft_ids(tok, doc: dict, use_chat_template: bool) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and per-token response flags of one supervised example.

    The ids are the tokenizer's own tokenisation of the whole rendered conversation, exactly
    ``tok.apply_chat_template(messages, tokenize=True)`` with a chat template (the text is
    tokenised once: pieces tokenised apart would each get their own word-start marker, e.g. a
    doubled "▁" with SentencePiece-style tokenizers). The flags mark the assistant turns (content
    and end-of-turn marker): transformers' ``return_assistant_tokens_mask`` when the template
    marks them with ``{% generation %}``, else the characters of each turn (``_assistant_spans``)
    mapped to tokens through the offsets of the one tokenisation.

    Without a chat template (or ``use_chat_template=False``) the text is ``_plain_render``'s,
    tokenised with the tokenizer's special tokens (its BOS, if it adds one).

    Returns:
        ``(ids_n, flags_n)``: int32 and bool arrays of the same length.

    Raises:
        ValueError: the EOS token is not a special token of the tokenizer (plain rendering writes it
            as text), or the chat template cannot locate the assistant turns.
    """
    if use_chat_template and tok.chat_template:
        messages = doc.get("messages") or [
            {"role": "user", "content": doc["prompt"]},
            {"role": "assistant", "content": doc["response"]}]
        if _has_generation_block(tok.chat_template):
            out = tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=True)
            return (np.asarray(out["input_ids"], np.int32),
                    np.asarray(out["assistant_masks"], bool))
        text = tok.apply_chat_template(messages, tokenize=False)
        spans = _assistant_spans(tok, messages, text)
        special = False  # As apply_chat_template: the template writes BOS itself.
    else:
        if tok.eos_token not in tok.all_special_tokens:
            raise ValueError(f"the EOS token {tok.eos_token!r} is not a special token of the "
                             "tokenizer; register it as one (eos_token in tokenizer_config.json).")
        text, spans = _plain_render(tok, doc)
        special = True
    enc = tok(text, add_special_tokens=special, return_offsets_mapping=True)
    return (np.asarray(enc["input_ids"], np.int32),
            _tokens_in_spans(enc["offset_mapping"], spans))


def truncate_example(ids_n: np.ndarray, flags_n: np.ndarray, seq_len: int):
    """Cuts an example to seq_len + 1 tokens (seq_len pairs), with a warning: never silent."""
    global _truncations
    if len(ids_n) <= seq_len + 1:
        return ids_n, flags_n
    _truncations += 1
    if _truncations <= _MAX_TRUNCATION_WARNINGS:
        logger.warning("truncating a supervised example of %d tokens to seq_len + 1 = %d "
                       "(%d so far in this process); raise data.seq_len to keep it whole",
                       len(ids_n), seq_len + 1, _truncations)
    return ids_n[: seq_len + 1], flags_n[: seq_len + 1]


class TokenizeDocument(grain.transforms.Map):
    """grain transform: a document → ``{"input_ids", "targets", "loss_mask"}`` 1-D arrays.

    Pickles as its settings only; the tokenizer is borrowed in whichever process and thread maps.
    """

    def __init__(self, tokenizer: str, mode: str, seq_len: int, use_chat_template: bool = True):
        self.tokenizer, self.mode = tokenizer, mode
        self.seq_len, self.use_chat_template = seq_len, use_chat_template

    def map(self, doc):
        with borrow_tokenizer(self.tokenizer) as tok:
            if self.mode == "pretrain":
                return pairs_from_ids(pretrain_ids(tok, doc))
            ids_n, flags_n = sft_ids(tok, doc, self.use_chat_template)
        return pairs_from_ids(*truncate_example(ids_n, flags_n, self.seq_len))


class PadToRow(grain.transforms.Map):
    """grain transform: one example's pairs → one padded row (segment 1, positions from 0)."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def map(self, pairs: dict) -> dict:
        n = len(pairs["input_ids"])
        row = {k: np.zeros(self.seq_len, v.dtype) for k, v in pairs.items()}
        for k, v in pairs.items():
            row[k][:n] = v
        row["segment_ids"] = (np.arange(self.seq_len) < n).astype(np.int32)
        row["positions"] = np.where(row["segment_ids"] > 0, np.arange(self.seq_len), 0).astype(
            np.int32)
        return row
