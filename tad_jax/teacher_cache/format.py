"""The on-disk teacher cache: compact fixed-size records, shards, and the manifest.

A cache folder holds::

    manifest.json          the cache's identity (teacher, tokenizer hash, data, V, K_max, S, τ,
                           seed, seq_len, rows, shards) and, once all shards are written, their
                           checksums
    shard_00000.bin ...    rows [i·rows_per_shard, (i+1)·rows_per_shard) of the training split,
                           one fixed-size record per row (numpy structured dtype, little-endian)
    shard_00000.json ...   per-shard completion marker: rows, bytes, sha256 (written after the
                           .bin is renamed into place, so its presence means the shard is whole)

One record = one row of `seq_len` positions; per position (B = `id_bytes(V)`, the fewest whole
bytes that hold V − 1):

    head_ids      K_max × B bytes   the teacher's top-K_max ids, decreasing p_T
    head_logp     K_max × 2 bytes   log p_T on them (float16; normalised over the whole V)
    log_alpha     4 bytes           log α_T of the K_max tail (float32: β(X), bucket exact)
    tail_entropy  4 bytes           H̃ of the renormalised K_max tail (float32)
    sample_ids    S × B bytes       S i.i.d. tail draws from p̃_T

so bytes per token = K_max·(B + 2) + 8 + S·B (`bytes_per_token`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile

import numpy as np

from tad_jax.teacher_cache.stats import TeacherStats

# 2: data_sha256 covers the sha256 of the prepared split's token ids, not only its document
# lengths.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
# Tokenizer files that define the id ↔ text map (hashed to refuse a cache of another tokenizer).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt",
                    "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


def id_bytes(vocab_size: int) -> int:
    """The fewest whole bytes that hold every id in [0, vocab_size)."""
    return max(1, math.ceil(max(vocab_size - 1, 1).bit_length() / 8))


def bytes_per_token(vocab_size: int, k_max: int, num_samples: int) -> int:
    """Cache bytes per token: K_max·(B + 2) + 8 + S·B, B = `id_bytes(vocab_size)`."""
    b = id_bytes(vocab_size)
    return k_max * (b + 2) + 8 + num_samples * b


def bytes_table(vocab_sizes=(32_000, 49_152, 151_936, 256_000), ks=(10, 20),
                samples=(4, 16, 64)) -> str:
    """A markdown table of bytes per token over V, K_max and S."""
    cols = [(k, s) for k in ks for s in samples]
    lines = ["| V (id bytes) | " + " | ".join(f"K={k}, S={s}" for k, s in cols) + " |",
             "| --- |" + " --- |" * len(cols)]
    for v in vocab_sizes:
        cells = " | ".join(str(bytes_per_token(v, k, s)) for k, s in cols)
        lines.append(f"| {v} ({id_bytes(v)}) | {cells} |")
    return "\n".join(lines)


def record_dtype(vocab_size: int, k_max: int, num_samples: int, seq_len: int) -> np.dtype:
    """The numpy structured dtype of one row's record (module docstring)."""
    b, t = id_bytes(vocab_size), seq_len
    return np.dtype([("head_ids", "u1", (t, k_max, b)), ("head_logp", "<f2", (t, k_max)),
                     ("log_alpha", "<f4", (t,)), ("tail_entropy", "<f4", (t,)),
                     ("sample_ids", "u1", (t, num_samples, b))])


def pack_ids(ids, nbytes: int) -> np.ndarray:
    """int ids `[...]` → uint8 `[..., nbytes]`, little-endian."""
    ids = np.asarray(ids).astype("<u4")
    return ids[..., None].view(np.uint8).reshape(ids.shape + (4,))[..., :nbytes]


def unpack_ids(u8, nbytes: int) -> np.ndarray:
    """uint8 `[..., nbytes]` → int32 ids `[...]` (inverse of `pack_ids`)."""
    u8 = np.asarray(u8)
    out = np.zeros(u8.shape[:-1], np.int64)
    for i in range(nbytes):
        out |= u8[..., i].astype(np.int64) << (8 * i)
    return out.astype(np.int32)


def encode(stats: TeacherStats, dtype: np.dtype) -> np.ndarray:
    """TeacherStats of `[rows, T, ...]` → a structured array `[rows]` of `dtype`."""
    b = dtype["head_ids"].shape[-1]
    rows = np.asarray(stats.log_alpha).shape[0]
    out = np.zeros(rows, dtype)
    out["head_ids"] = pack_ids(stats.head_ids, b)
    out["head_logp"] = np.asarray(stats.head_logp, np.float32).astype(np.float16)
    out["log_alpha"] = np.asarray(stats.log_alpha, np.float32)
    out["tail_entropy"] = np.asarray(stats.tail_entropy, np.float32)
    out["sample_ids"] = pack_ids(stats.sample_ids, b)
    return out


def decode(records: np.ndarray) -> TeacherStats:
    """A structured array `[rows]` → TeacherStats numpy arrays `[rows, T, ...]` (float32, int32)."""
    b = records.dtype["head_ids"].shape[-1]
    return TeacherStats(
        head_ids=unpack_ids(records["head_ids"], b),
        head_logp=records["head_logp"].astype(np.float32),
        log_alpha=records["log_alpha"].astype(np.float32),
        tail_entropy=records["tail_entropy"].astype(np.float32),
        sample_ids=unpack_ids(records["sample_ids"], b),
    )


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def shard_path(folder: str, index: int, suffix: str = ".bin") -> str:
    return os.path.join(folder, f"shard_{index:05d}{suffix}")


def atomic_write(path: str, data: bytes) -> None:
    """Writes `data` to a temporary file beside `path`, syncs it, then renames it into place: a
    reader (or a resumed writer) sees the whole file or none."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, obj: dict) -> None:
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def read_manifest(folder: str) -> dict:
    """The manifest of a cache folder.

    Raises:
      FileNotFoundError: no manifest (not a cache, or the writer has not started).
    """
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder!r} holds no {MANIFEST}: not a teacher cache; write one "
                                "with scripts/cache_teacher.py --config C --out DIR.")
    with open(path) as f:
        return json.load(f)


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tokenizer_hash(folder: str) -> str:
    """sha256 over the tokenizer files of an HF tokenizer folder (names and contents).

    Raises:
      FileNotFoundError: the folder has none of the tokenizer files.
    """
    h, found = hashlib.sha256(), False
    for name in _TOKENIZER_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            found = True
            h.update(name.encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read())
    if not found:
        raise FileNotFoundError(f"no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in "
                                f"{folder!r}; set data.tokenizer to an HF tokenizer folder.")
    return h.hexdigest()


def data_hash(rows) -> str:
    """sha256 of a prepared split (`rows.PackedRows`): its document offsets, token count and
    token ids. Equal for the same tokenised corpus; different when a document or a token
    changed."""
    h = hashlib.sha256(np.ascontiguousarray(rows.offsets).tobytes())
    h.update(str(rows.num_pairs).encode())
    h.update(rows.ids_sha256().encode())
    return h.hexdigest()


def check_fits(manifest: dict, *, tokenizer_sha: str, temperature: float, top_k: int,
               seq_len: int, vocab_size: int, data_sha: str, folder: str = "") -> None:
    """Raises unless a cache can serve a run with these settings.

    Raises:
      ValueError: naming each mismatch (tokenizer, τ, K > K_max, seq_len, vocabulary, data) and
        the fix.
    """
    m, where = manifest, f"teacher cache {folder!r}"
    problems = []
    if m["format_version"] != FORMAT_VERSION:
        problems.append(f"format version {m['format_version']} (this code reads "
                        f"{FORMAT_VERSION}): rewrite the cache")
    if m["tokenizer_sha256"] != tokenizer_sha:
        problems.append(f"tokenizer: the cache was written with {m['tokenizer']!r} (sha256 "
                        f"{m['tokenizer_sha256'][:12]}…), the run's data.tokenizer differs "
                        f"({tokenizer_sha[:12]}…)")
    if not math.isclose(m["temperature"], temperature, rel_tol=1e-9):
        problems.append(f"temperature: the cache holds τ={m['temperature']}, the run has "
                        f"loss.temperature={temperature} (probabilities are cached at one τ)")
    if top_k > m["k_max"]:
        problems.append(f"top_k: loss.top_k={top_k} > the cache's K_max={m['k_max']}; write a "
                        f"cache with --k_max={top_k} or more")
    if m["seq_len"] != seq_len:
        problems.append(f"seq_len: the cache's rows have {m['seq_len']} positions, the run's "
                        f"data.seq_len={seq_len}")
    if m["vocab_size"] != vocab_size:
        problems.append(f"vocabulary: the cache normalises over V={m['vocab_size']}, the run's "
                        f"loss compares {vocab_size} entries (set loss.vocab_size to match)")
    if m["data_sha256"] != data_sha:
        problems.append(f"data: the cache was written over other tokenised data (its "
                        f"prepared_dir was {m['prepared_dir']!r}); point data.prepared_dir at "
                        "that preparation or write a new cache")
    if problems:
        raise ValueError(f"{where} does not fit this run:\n- " + "\n- ".join(problems))
