"""Document sources: files on disk → lists of documents, and the held-out split.

A *document* is the unit that is shuffled, sharded and split into train / validation:
a string in pretraining mode, a dict in supervised mode (``{"prompt": str, "response": str}`` or
``{"messages": [{"role": str, "content": str}, ...]}``).

Formats: plain text (chunked into documents, see ``chunk_text``), JSONL and Parquet; text and
JSONL may be compressed with gzip (``.gz``) or Zstandard (``.zst``). Every document is read into
host memory once, when the pipeline is built: fine up to a few GB of text per host; larger corpora
should be split into per-host file lists.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

logger = logging.getLogger(__name__)

_COMPRESSION_SUFFIXES = (".gz", ".zst")
_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_FORMATS = ("auto", "text", "jsonl", "parquet")
_TEXT_CHUNKINGS = ("paragraphs", "file", "lines")
# At most this many malformed-line warnings per file; the total is always reported.
_MAX_WARNINGS_PER_FILE = 10

Document = str | dict[str, Any]


def expand_files(patterns: str | Sequence[str], *, what: str = "data.train_files") -> list[str]:
    """Expands one glob or a list of globs into a sorted, de-duplicated list of files.

    Raises:
        FileNotFoundError: a glob matches no file.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise ValueError(f"{what} is empty: give a glob or a list of globs of data files.")
    files: list[str] = []
    for pattern in patterns:
        matched = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                         if os.path.isfile(p))
        if not matched:
            raise FileNotFoundError(f"{what}: no file matches {pattern!r}; fix the path or glob.")
        files.extend(matched)
    return list(dict.fromkeys(files))


def detect_format(path: str, fmt: str = "auto") -> str:
    """Returns "text", "jsonl" or "parquet" for ``path`` (by extension when ``fmt`` is "auto")."""
    if fmt not in _FORMATS:
        raise ValueError(f"data.format={fmt!r}; use one of {_FORMATS}.")
    if fmt != "auto":
        return fmt
    name = path.lower()
    for suffix in _COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def open_text(path: str) -> io.TextIOBase:
    """Opens a plain, gzip or zstd file for reading text (UTF-8, undecodable bytes replaced)."""
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    if path.endswith(".zst"):
        import zstandard  # Imported here: only zstd inputs need it.

        # The decompressor owns (and closes) the file: no context manager can span the return.
        raw = zstandard.ZstdDecompressor().stream_reader(
            open(path, "rb"), closefd=True)  # noqa: SIM115
        return io.TextIOWrapper(raw, encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def chunk_text(text: str, chunking: str, chunk_chars: int) -> list[str]:
    """Cuts a plain-text file into documents.

    Args:
        text: the whole file.
        chunking: "paragraphs": blank-line separated paragraphs, consecutive ones merged until a
            document reaches ``chunk_chars`` characters (a paragraph is never cut, so a document
            keeps whole paragraphs of context); "file": the whole file is one document; "lines":
            each non-blank line is one document.
        chunk_chars: the target size of a "paragraphs" document, in characters.

    Returns:
        The non-blank documents, in file order.
    """
    if chunking not in _TEXT_CHUNKINGS:
        raise ValueError(f"data.text_chunking={chunking!r}; use one of {_TEXT_CHUNKINGS}.")
    if chunking == "file":
        return [text] if text.strip() else []
    if chunking == "lines":
        return [line for line in text.splitlines() if line.strip()]
    docs, current, size = [], [], 0
    for para in re.split(r"\n(?:[ \t\r\f\v]*\n)+", text):
        if not para.strip():
            continue
        current.append(para)
        size += len(para) + 2
        if size >= chunk_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
    if current:
        docs.append("\n\n".join(current))
    return docs


def _record_to_document(record: dict, cfg, where: str) -> Document:
    """Picks the configured fields out of one JSONL / Parquet record."""
    if cfg.mode == "pretrain":
        if cfg.text_field not in record:
            raise ValueError(f"{where}: no field {cfg.text_field!r} (fields: {sorted(record)}); "
                             "set data.text_field to the field that holds the text.")
        text = record[cfg.text_field]
        if not isinstance(text, str):
            raise ValueError(f"{where}: field {cfg.text_field!r} is {type(text).__name__}, "
                             "not a string; set data.text_field to a text field.")
        return text
    if cfg.messages_field and record.get(cfg.messages_field) is not None:
        messages = record[cfg.messages_field]
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise ValueError(f"{where}: {cfg.messages_field!r} must be a list of "
                             "{'role': ..., 'content': ...} dicts.")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    if cfg.prompt_field in record and cfg.response_field in record:
        return {"prompt": str(record[cfg.prompt_field]),
                "response": str(record[cfg.response_field])}
    raise ValueError(
        f"{where}: neither {cfg.messages_field!r} nor both {cfg.prompt_field!r} and "
        f"{cfg.response_field!r} (fields: {sorted(record)}); set data.messages_field or "
        "data.prompt_field / data.response_field.")


def _iter_jsonl(path: str, cfg) -> Iterator[Document]:
    """Yields the documents of one JSONL file; malformed lines are counted and skipped."""
    bad = 0
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(f"a JSON {type(record).__name__}, not an object")
            except ValueError as e:
                if cfg.strict_jsonl:
                    raise ValueError(f"{path}:{lineno}: malformed JSONL line ({e}); fix the "
                                     "line or set data.strict_jsonl=False to skip it.") from e
                bad += 1
                if bad <= _MAX_WARNINGS_PER_FILE:
                    logger.warning("%s:%d: skipping malformed JSONL line (%s)", path, lineno, e)
                continue
            yield _record_to_document(record, cfg, f"{path}:{lineno}")
    if bad:
        logger.warning("%s: skipped %d malformed JSONL line(s) in all", path, bad)


def _iter_parquet(path: str, cfg) -> Iterator[Document]:
    import pyarrow.parquet as pq  # Imported here: only Parquet inputs need it.

    table = pq.read_table(path)
    for row, record in enumerate(table.to_pylist()):
        yield _record_to_document(record, cfg, f"{path} row {row}")


def iter_documents(files: Sequence[str], cfg) -> Iterator[Document]:
    """Yields every document of ``files`` in order; blank documents are counted and skipped.

    Args:
        files: paths, e.g. from ``expand_files``.
        cfg: the data config (mode, format, fields, text chunking, strict_jsonl).

    Raises:
        ValueError: a record lacks the configured field(s), or (strict_jsonl) a malformed line.
    """
    blank = 0
    for path in files:
        fmt = detect_format(path, cfg.format)
        if fmt == "text":
            if cfg.mode != "pretrain":
                raise ValueError(f"{path}: plain text has no prompt/response; supervised mode "
                                 "(data.mode='sft') reads JSONL or Parquet.")
            with open_text(path) as f:
                yield from chunk_text(f.read(), cfg.text_chunking, cfg.text_chunk_chars)
            continue
        for doc in (_iter_jsonl if fmt == "jsonl" else _iter_parquet)(path, cfg):
            if isinstance(doc, str) and not doc.strip():
                blank += 1
            else:
                yield doc
    if blank:
        logger.warning("skipped %d blank document(s) (empty text field)", blank)


def document_key(doc: Document) -> str:
    """A canonical string of a document: what the held-out split hashes."""
    return doc if isinstance(doc, str) else json.dumps(doc, sort_keys=True, ensure_ascii=False)


def is_validation(doc: Document, val_fraction: float) -> bool:
    """Deterministic document-level split: a hash of the content below ``val_fraction``.

    Hashing the content (not the file or the index) keeps the split stable when files are
    reordered or added, and sends identical copies of a document to the same side, so the
    validation split never shares a document with training.
    """
    digest = hashlib.blake2b(document_key(doc).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < val_fraction


# Fields of the data config that decide which documents a split holds.
_SPLIT_FIELDS = ("mode", "train_files", "val_files", "val_fraction", "format", "text_field",
                 "prompt_field", "response_field", "messages_field", "text_chunking",
                 "text_chunk_chars", "strict_jsonl")
_CACHE: dict[tuple, list[Document]] = {}
_CACHE_SIZE = 4


def load_split(cfg, split: str) -> list[Document]:
    """``read_split``, cached in this process (the eval iterator is rebuilt at every evaluation).

    The cache key holds the split's config fields and the size and mtime of every file, so an
    edited file is read again.
    """
    globs = [cfg.train_files, cfg.val_files]
    stats = []
    for pattern in globs:
        for path in expand_files(pattern) if pattern else []:
            st = os.stat(path)
            stats.append((path, st.st_size, st.st_mtime_ns))
    key = (split, tuple(str(cfg[f]) for f in _SPLIT_FIELDS), tuple(stats))
    if key not in _CACHE:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = read_split(cfg, split)
    return _CACHE[key]


def iter_split(cfg, split: str) -> Iterator[Document]:
    """Streams the documents of ``split`` ("train" or "validation") as the config defines it.

    With ``cfg.val_files`` the validation split is those files and training is the files of
    ``cfg.train_files`` that are not among them (``train_files="data/*.jsonl"`` with
    ``val_files="data/val.jsonl"`` holds val.jsonl out); otherwise both come from
    ``cfg.train_files``, split by ``is_validation`` with ``cfg.val_fraction``.

    Raises:
        FileNotFoundError: a glob matches nothing.
        ValueError: the fraction is out of range, every training file is a validation file, or
          bad records (see ``iter_documents``).
    """
    if split not in ("train", "validation"):
        raise ValueError(f"split={split!r}; use 'train' or 'validation'.")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={cfg.val_fraction}; use a fraction in [0, 1).")
    if cfg.val_files:
        val = expand_files(cfg.val_files, what="data.val_files")
        yield from iter_documents(val if split == "validation" else _train_files(cfg, val), cfg)
        return
    want_val = split == "validation"
    for doc in iter_documents(expand_files(cfg.train_files), cfg):
        if is_validation(doc, cfg.val_fraction) == want_val:
            yield doc


def _train_files(cfg, val_files: list[str]) -> list[str]:
    """``cfg.train_files`` less the validation files (by real path), so that no held-out file
    is also trained on."""
    held_out = {os.path.realpath(p) for p in val_files}
    train = expand_files(cfg.train_files)
    kept = [p for p in train if os.path.realpath(p) not in held_out]
    if not kept:
        raise ValueError(f"every file of data.train_files={cfg.train_files!r} is also in "
                         f"data.val_files={cfg.val_files!r}: nothing is left to train on; give "
                         "training files apart from the validation files.")
    if len(kept) < len(train):
        logger.info("data.train_files: %d of %d files are data.val_files, held out of training",
                    len(train) - len(kept), len(train))
    return kept


def empty_split_error(cfg, split: str) -> ValueError:
    """The error for a split without documents, naming the fix."""
    fix = ("set data.val_fraction > 0 or data.val_files" if split == "validation"
           else "check data.format, data.text_field and that the files are not empty")
    files = cfg.val_files if split == "validation" and cfg.val_files else cfg.train_files
    return ValueError(f"the {split} split of {files!r} is empty; {fix}.")


def read_split(cfg, split: str) -> list[Document]:
    """All documents of ``split`` (see ``iter_split``) in a list.

    Raises:
        ValueError: the split is empty (and the errors of ``iter_split``).
    """
    docs = list(iter_split(cfg, split))
    if not docs:
        raise empty_split_error(cfg, split)
    return docs
