"""Writes a teacher cache: the teacher over every training row, once (`scripts/cache_teacher.py`).

Rows are `rows.PackedRows` of the run's prepared training split. Shard i (rows
[i·rows_per_shard, (i+1)·rows_per_shard)) is written by process i mod process_count, so every
process of a `jax.distributed` job writes its own files into a shared folder. Resumable: a shard
whose completion marker (`shard_XXXXX.json`) exists is skipped; a shard is written to a temporary
file and renamed, then its marker is written, so a kill at any point leaves either a finished
shard or nothing that counts. The tail draws of row r use `fold_in(PRNGKey(seed), r)`, so a
resumed or re-sharded write gives the same bytes.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from tad_jax.teacher_cache import format as fmt
from tad_jax.teacher_cache.rows import packed_rows
from tad_jax.teacher_cache.stats import teacher_stats


def _manifest(config, rows, vocab, k_max, num_samples, rows_per_shard, seed, max_rows) -> dict:
    n = len(rows) if max_rows is None else min(len(rows), max_rows)
    return {
        "format_version": fmt.FORMAT_VERSION,
        "teacher": config.teacher.path or config.teacher.preset or dict(config.teacher.model),
        "tokenizer": config.data.tokenizer,
        "tokenizer_sha256": fmt.tokenizer_hash(config.data.tokenizer),
        "prepared_dir": os.path.abspath(config.data.prepared_dir),
        "split": rows.split, "data_rows": len(rows), "data_sha256": fmt.data_hash(rows),
        "vocab_size": vocab, "id_bytes": fmt.id_bytes(vocab), "k_max": k_max,
        "num_samples": num_samples, "temperature": float(config.loss.temperature),
        "seed": seed, "seq_len": rows.seq_len, "rows": n, "rows_per_shard": rows_per_shard,
        "num_shards": -(-n // rows_per_shard),
        "bytes_per_token": fmt.bytes_per_token(vocab, k_max, num_samples),
        "record_dtype": str(fmt.record_dtype(vocab, k_max, num_samples, rows.seq_len).descr),
    }


def _start(out_dir: str, manifest: dict) -> None:
    """Writes the manifest, or checks that an existing one (a resumed write) has equal settings."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, fmt.MANIFEST)
    if os.path.isfile(path):
        old = {k: v for k, v in fmt.read_manifest(out_dir).items() if k != "shards"}
        diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
        if diff:
            raise ValueError(f"{out_dir!r} holds a cache written with other settings ({diff}); "
                             "resume with the same settings or write to a new --out folder.")
        return
    fmt.write_json(path, manifest)


def _stats_fn(teacher_model, vocab, k_max, num_samples, temperature, seed):
    base = jax.random.key(seed)

    @jax.jit
    def fn(params, batch, row_ids_b):
        out = teacher_model.apply({"params": params}, batch["input_ids"],
                                  segment_ids=batch["segment_ids"], positions=batch["positions"])
        keys = jax.vmap(lambda r: jax.random.fold_in(base, r))(row_ids_b)
        one = lambda logits_tv, key: teacher_stats(logits_tv, key, k_max=k_max,
                                                   num_samples=num_samples,
                                                   temperature=temperature)
        return jax.vmap(one)(out.logits[..., :vocab], keys)

    return fn


def _write_shard(out_dir, index, rows, manifest, fn, params, batch_size) -> None:
    per = manifest["rows_per_shard"]
    ids = np.arange(index * per, min((index + 1) * per, manifest["rows"]))
    dtype = fmt.record_dtype(manifest["vocab_size"], manifest["k_max"],
                             manifest["num_samples"], manifest["seq_len"])
    parts = []
    for lo in range(0, len(ids), batch_size):
        chunk = ids[lo:lo + batch_size]
        padded = np.pad(chunk, (0, batch_size - len(chunk)), mode="edge")  # one compiled shape
        rows_b = [rows[int(r)] for r in padded]
        batch = {k: np.stack([r[k] for r in rows_b]) for k in ("input_ids", "segment_ids",
                                                                "positions")}
        stats = jax.device_get(fn(params, batch, padded.astype(np.uint32)))
        parts.append(fmt.encode(type(stats)(*(x[:len(chunk)] for x in stats)), dtype))
    data = np.concatenate(parts).tobytes()
    path = fmt.shard_path(out_dir, index)
    fmt.atomic_write(path, data)
    fmt.write_json(fmt.shard_path(out_dir, index, ".json"),
                   {"rows": len(ids), "bytes": len(data), "sha256": fmt.sha256_file(path)})


def shard_done(out_dir: str, index: int, manifest: dict) -> bool:
    """Whether shard `index` is complete: its marker exists and its file has the marked size."""
    marker, path = fmt.shard_path(out_dir, index, ".json"), fmt.shard_path(out_dir, index)
    if not (os.path.isfile(marker) and os.path.isfile(path)):
        return False
    with open(marker) as f:
        return json.load(f)["bytes"] == os.path.getsize(path)


def finalize(out_dir: str) -> bool:
    """Adds every shard's checksum to the manifest once all shards are done; True if complete."""
    manifest = fmt.read_manifest(out_dir)
    shards = {}
    for i in range(manifest["num_shards"]):
        if not shard_done(out_dir, i, manifest):
            return False
        with open(fmt.shard_path(out_dir, i, ".json")) as f:
            shards[os.path.basename(fmt.shard_path(out_dir, i))] = json.load(f)
    fmt.write_json(os.path.join(out_dir, fmt.MANIFEST), {**manifest, "shards": shards})
    return True


def write_cache(config, out_dir: str, *, k_max: int | None = None, num_samples: int = 16,
                rows_per_shard: int = 256, seed: int = 0, batch_size: int | None = None,
                max_rows: int | None = None, max_shards: int | None = None,
                process_index: int | None = None,
                process_count: int | None = None, log=print) -> dict:
    """Runs the teacher over the prepared training rows and writes this process's shards.

    Args:
      config: the run config (teacher, `data.prepared_dir`, `data.seq_len`, `data.tokenizer`,
        `loss.temperature`, `loss.vocab_size`).
      out_dir: the cache folder (created; a partial cache of equal settings is resumed).
      k_max: head entries kept (default `loss.top_k`); serves every K <= k_max.
      num_samples: S tail draws per position.
      rows_per_shard: rows per shard file (the unit of resumption).
      seed: seed of the tail draws.
      batch_size: rows per teacher forward (default `data.global_batch_size`).
      max_rows: cache only the first rows (a run of steps × global_batch_size rows with
        `data.teacher_cache` then reads only those, shuffled); None = every row.
      max_shards: stop after writing this many shards (tests; time-limited jobs).
      process_index, process_count: this writer's share (default jax's).
      log: a print-like callable for progress lines.

    Returns:
      The manifest (with per-shard checksums once every shard is written).

    Raises:
      ValueError, FileNotFoundError: bad data or config, or a cache of other settings in out_dir.
    """
    from tad_jax.builders import build_teacher
    from tad_jax.run_setup import resolved_config

    config = resolved_config(config)
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    rows = packed_rows(config.data, "train")
    teacher_model, params = build_teacher(config)
    vocab = int(config.loss.vocab_size or teacher_model.config.vocab_size)
    k_max = int(config.loss.top_k if k_max is None else k_max)
    manifest = _manifest(config, rows, vocab, k_max, num_samples, rows_per_shard, seed,
                         max_rows)
    _start(out_dir, manifest)
    fn = _stats_fn(teacher_model, vocab, k_max, num_samples, float(config.loss.temperature), seed)
    batch_size = int(batch_size or config.data.global_batch_size)
    written, t0 = 0, time.perf_counter()
    for i in range(pi, manifest["num_shards"], pc):
        if max_shards is not None and written >= max_shards:
            break
        if shard_done(out_dir, i, manifest):
            continue
        _write_shard(out_dir, i, rows, manifest, fn, params, batch_size)
        written += 1
        tokens = written * rows_per_shard * rows.seq_len
        log(f"shard {i + 1}/{manifest['num_shards']} written "
            f"({tokens / (time.perf_counter() - t0):.0f} tokens/s)")
    finalize(out_dir)
    return fmt.read_manifest(out_dir)
