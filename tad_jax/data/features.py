"""Tokenisation: documents → per-document training pairs, run inside grain (worker) processes.

Every document becomes three aligned 1-D arrays of length n - 1 for its n tokens ``ids_n``:
``input_ids = ids_n[:-1]``, ``targets = ids_n[1:]`` and ``loss_mask`` (float32, 1 where the target
counts). Shifting per document, before packing, means a target never belongs to the next
document, and a document split across two rows keeps every (input, target) pair exactly once.

Pretraining: ``ids_n`` = the tokenizer's own encoding (its BOS, if it adds one) + EOS; every target
counts. Supervised: the conversation is rendered into pieces (with the tokenizer's chat template
when it has one), each piece tokenised on its own, and only targets inside response pieces count.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
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


def _template_pieces(tok, messages: list[dict]) -> list[tuple[str, bool]]:
    """(text, is_response) pieces of a conversation rendered by the tokenizer's chat template.

    Each assistant turn is the difference between the rendering that ends with that turn and the
    one that ends with the generation prompt just before it, so the mask covers exactly what the
    model must generate (content and end-of-turn marker).
    """
    def render(msgs, gen):
        if not msgs:
            return ""
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    pieces, done = [], ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, after = render(messages[:k], True), render(messages[: k + 1], False)
        if not (before.startswith(done) and after.startswith(before)):
            raise ValueError("the tokenizer's chat template does not render a conversation as a "
                             "prefix of its continuation; set data.use_chat_template=False.")
        pieces += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    full = render(messages, False)
    if not full.startswith(done):
        raise ValueError("the chat template renders the whole conversation differently from its "
                         "turns; set data.use_chat_template=False.")
    return [*pieces, (full[len(done):], False)]


def _plain_pieces(tok, doc: dict) -> list[tuple[str | int, bool]]:
    """Pieces without a chat template: "role: content" lines, responses ended by EOS."""
    if "prompt" in doc:
        return [(doc["prompt"], False), (doc["response"], True), (tok.eos_token_id, True)]
    pieces: list[tuple[str | int, bool]] = []
    for m in doc["messages"]:
        if m["role"] == "assistant":
            pieces += [("assistant: ", False), (m["content"], True), (tok.eos_token_id, True),
                       ("\n", False)]
        else:
            pieces.append((f"{m['role']}: {m['content']}\n", False))
    return pieces


def sft_ids(tok, doc: dict, use_chat_template: bool) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and per-token response flags of one supervised example."""
    if use_chat_template and tok.chat_template:
        messages = doc.get("messages") or [
            {"role": "user", "content": doc["prompt"]},
            {"role": "assistant", "content": doc["response"]}]
        pieces = _template_pieces(tok, messages)
        first_special = False  # The template writes BOS itself when the model wants one.
    else:
        pieces = _plain_pieces(tok, doc)
        first_special = True
    ids, flags = [], []
    for i, (piece, is_response) in enumerate(pieces):
        if isinstance(piece, int):
            piece_ids = [piece]
        else:
            piece_ids = tok(piece, add_special_tokens=first_special and i == 0)["input_ids"]
        ids += piece_ids
        flags += [is_response] * len(piece_ids)
    return np.asarray(ids, np.int32), np.asarray(flags, bool)


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
