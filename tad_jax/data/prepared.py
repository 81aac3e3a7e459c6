"""Pre-tokenised corpora: tokenise once into flat token files, read them back memory-mapped.

For corpora too large to hold as text on every host, or to tokenise at every run. A prepared
folder (written by ``prepare``, i.e. ``scripts/prepare_data.py``) holds, per split::

    {split}.ids.bin       int32: the tokens of every document, concatenated (EOS included)
    {split}.flags.bin     uint8: 1 on response tokens (sft only), aligned with ids
    {split}.offsets.npy   int64 [documents + 1]: document d is ids[offsets[d]:offsets[d + 1]]
    meta.json             written last: mode, tokenizer, EOS id, documents and tokens per split

Token ids are exactly those of the online pipeline (``features.pretrain_ids`` / ``sft_ids``), so
a run reading the prepared folder yields the same batches as one tokenising on the fly.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os

import grain
import numpy as np

from tad_jax.data.features import (
    borrow_tokenizer,
    pairs_from_ids,
    sft_ids,
    truncate_example,
)
from tad_jax.data.sources import empty_split_error, iter_split
from tad_jax.teacher_cache.format import tokenizer_hash

logger = logging.getLogger(__name__)
FORMAT_VERSION = 1
SPLITS = ("train", "validation")
# Documents tokenised per call: batches let the fast tokenizer use all cores.
_DOCS_PER_CALL = 256


def _encode(tok, docs: list, cfg) -> list[tuple[np.ndarray, np.ndarray | None]]:
    if cfg.mode != "pretrain":
        return [sft_ids(tok, d, cfg.use_chat_template) for d in docs]
    encoded = tok(docs, add_special_tokens=True)["input_ids"]
    # The same ids as pretrain_ids document by document: the tokenizer's encoding, then EOS.
    return [(np.asarray(ids if ids and ids[-1] == tok.eos_token_id
                        else [*ids, tok.eos_token_id], np.int32), None) for ids in encoded]


def _write_split(cfg, split: str, out_dir: str, tok) -> dict:
    offsets, batch = [0], []
    ids_sha = hashlib.sha256()  # of the ids file as written: a teacher cache checks it
    with contextlib.ExitStack() as files:
        ids_f = files.enter_context(open(os.path.join(out_dir, f"{split}.ids.bin"), "wb"))
        flags_path = os.path.join(out_dir, f"{split}.flags.bin")
        if cfg.mode == "pretrain" and os.path.exists(flags_path):
            os.remove(flags_path)  # Left by an earlier sft preparation.
        flags_f = None if cfg.mode == "pretrain" else files.enter_context(open(flags_path, "wb"))

        def flush():
            if not batch:  # the tokenizer refuses an empty list (a split of 256 k documents)
                return
            for ids_n, flags_n in _encode(tok, batch, cfg):
                ids_n.tofile(ids_f)
                ids_sha.update(ids_n.tobytes())
                if flags_f is not None:
                    flags_n.astype(np.uint8).tofile(flags_f)
                offsets.append(offsets[-1] + len(ids_n))
            batch.clear()

        for doc in iter_split(cfg, split):
            batch.append(doc)
            if len(batch) == _DOCS_PER_CALL:
                flush()
        flush()
    np.save(os.path.join(out_dir, f"{split}.offsets.npy"), np.asarray(offsets, np.int64))
    return {"documents": len(offsets) - 1, "tokens": offsets[-1],
            "ids_sha256": ids_sha.hexdigest()}


def prepare(cfg, out_dir: str, *, splits=SPLITS) -> dict:
    """Tokenises the splits of the data config ``cfg`` into ``out_dir``.

    Args:
        cfg: the data config (sources, split, mode, tokenizer); ``seq_len`` is applied at read
            time, so one prepared folder serves any ``seq_len``.
        out_dir: the folder to write (created; existing split files are overwritten).
        splits: which of "train" and "validation" to write.

    Returns:
        The metadata written to ``out_dir/meta.json``.
    """
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)  # An interrupted rewrite must not look complete.
    with borrow_tokenizer(cfg.tokenizer) as tok:
        meta = {"format_version": FORMAT_VERSION, "mode": cfg.mode, "tokenizer": cfg.tokenizer,
                "tokenizer_hash": tokenizer_hash(cfg.tokenizer),
                "eos_token_id": tok.eos_token_id, "vocab_size": len(tok),
                "use_chat_template": cfg.use_chat_template,
                "splits": {s: _write_split(cfg, s, out_dir, tok) for s in splits}}
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def ids_sha256(folder: str, split: str) -> str:
    """sha256 of the split's token ids file: the one `prepare` recorded in meta.json as it wrote
    the file (a re-preparation records a new one), where the file has the size meta.json gives;
    else (a folder prepared before `prepare` recorded it) the file read once per process, ~1 s
    per GB."""
    with open(os.path.join(folder, "meta.json")) as f:
        info = json.load(f)["splits"].get(split, {})
    path = os.path.join(folder, f"{split}.ids.bin")
    st = os.stat(path)
    if info.get("ids_sha256") and st.st_size == 4 * info.get("tokens", -1):
        return info["ids_sha256"]
    logger.info("Hashing %s (%.1f GB): its meta.json gives no matching sha256", path,
                st.st_size / 1e9)
    return _file_sha256(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, cached by its size and mtime (a rewritten file is read again)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(64 << 20), b""):
            h.update(block)
    return h.hexdigest()


class PreparedSource:
    """grain random-access source over one split of a prepared folder, memory-mapped lazily.

    Element d is ``{"ids": int32 [n], "flags": uint8 [n] (sft only)}``. Pickles as its paths.
    """

    def __init__(self, folder: str, split: str, mode: str):
        self.folder, self.split, self.mode = folder, split, mode
        self._offsets = np.load(os.path.join(folder, f"{split}.offsets.npy"))
        self._maps: dict[str, np.memmap] = {}

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def _map(self, name: str, dtype) -> np.memmap:
        if name not in self._maps:
            path = os.path.join(self.folder, f"{self.split}.{name}.bin")
            self._maps[name] = np.memmap(path, dtype=dtype, mode="r")
        return self._maps[name]

    def __getitem__(self, index: int) -> dict:
        start, stop = self._offsets[index], self._offsets[index + 1]
        out = {"ids": np.array(self._map("ids", np.int32)[start:stop])}
        if self.mode == "sft":
            out["flags"] = np.array(self._map("flags", np.uint8)[start:stop]).astype(bool)
        return out

    def __getstate__(self):
        return {"folder": self.folder, "split": self.split, "mode": self.mode}

    def __setstate__(self, state):
        self.__init__(**state)


class PreparedToPairs(grain.transforms.Map):
    """grain transform: a prepared document → ``{"input_ids", "targets", "loss_mask"}``."""

    def __init__(self, mode: str, seq_len: int):
        self.mode, self.seq_len = mode, seq_len

    def map(self, doc: dict) -> dict:
        if self.mode == "pretrain":
            return pairs_from_ids(doc["ids"])
        return pairs_from_ids(*truncate_example(doc["ids"], doc["flags"], self.seq_len))


def prepared_source(cfg, split: str) -> PreparedSource:
    """The ``split`` of the prepared folder ``cfg.prepared_dir``, checked against ``cfg``.

    Raises:
        FileNotFoundError: the folder has no complete preparation.
        ValueError: it was written by another format version, or for another mode, or with a
            tokenizer whose files differ from ``cfg.tokenizer``'s (when set), or (sft) with
            another ``use_chat_template``, or the split is empty.
        FileNotFoundError: ``cfg.tokenizer`` is set but holds no tokenizer files.
    """
    meta_path = os.path.join(cfg.prepared_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"data.prepared_dir={cfg.prepared_dir!r} holds no meta.json; "
                                "run scripts/prepare_data.py to write it (or unset prepared_dir).")
    with open(meta_path) as f:
        meta = json.load(f)
    again = "run scripts/prepare_data.py again (into a new folder, or unset prepared_dir)"
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg.prepared_dir} holds prepared-data format version "
                         f"{meta.get('format_version')}; this code reads {FORMAT_VERSION}: "
                         f"{again}.")
    # Token ids of another tokenizer would train on the wrong tokens without any error. The
    # tokenizers' files are compared, not their paths (folders written before the hash: no check).
    if (cfg.get("tokenizer") and meta.get("tokenizer_hash")
            and tokenizer_hash(cfg.tokenizer) != meta["tokenizer_hash"]):
        raise ValueError(f"{cfg.prepared_dir} was tokenised with {meta['tokenizer']!r}, whose "
                         f"files differ from those of data.tokenizer={cfg.tokenizer!r}: {again}, "
                         "or set data.tokenizer to the tokenizer it was prepared with.")
    if meta["mode"] != cfg.mode:
        raise ValueError(f"{cfg.prepared_dir} was prepared for mode {meta['mode']!r}, not "
                         f"{cfg.mode!r}; prepare it again with data.mode={cfg.mode!r}.")
    # Supervised examples rendered with (or without) the chat template are other token ids.
    used = meta.get("use_chat_template")
    if cfg.mode == "sft" and used is not None and bool(used) != bool(cfg.use_chat_template):
        raise ValueError(f"{cfg.prepared_dir} was prepared with data.use_chat_template={used}, "
                         f"but data.use_chat_template={cfg.use_chat_template}: set it to {used}, "
                         f"or {again}.")
    if not meta["splits"].get(split, {}).get("documents"):
        raise empty_split_error(cfg, split)
    return PreparedSource(cfg.prepared_dir, split, cfg.mode)
