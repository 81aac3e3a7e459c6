"""Reads a teacher cache beside the training rows (`data.teacher_cache=DIR`).

A batch of a cached run is the usual dict (`input_ids`, `targets`, `segment_ids`, `positions`,
`loss_mask`, `[B, T]`) plus the row's cached statistics under `CACHE_KEYS` (`cache_head_ids`
int32 `[B, T, K_max]`, `cache_head_logp` float32 `[B, T, K_max]`, `cache_log_alpha` and
`cache_tail_entropy` float32 `[B, T]`, `cache_sample_ids` int32 `[B, T, S]`). Rows and their
statistics travel together through one grain `MapDataset` over row indices, so shuffling, host
sharding (`[process_index::process_count]`) and exact resume (`get_state` / `set_state`) act on
both at once.
"""

from __future__ import annotations

import os

import grain
import numpy as np

from tad_jax.teacher_cache import format as fmt
from tad_jax.teacher_cache.rows import PackedRows, packed_rows
from tad_jax.teacher_cache.stats import TeacherStats

CACHE_KEYS = tuple(f"cache_{f}" for f in TeacherStats._fields)


class CacheReader:
    """Random access to a cache's rows: `reader[r]` → `TeacherStats` of numpy `[T, ...]`.

    Shards are memory-mapped lazily; pickles as its folder (grain worker processes).
    """

    def __init__(self, folder: str):
        self.folder = folder
        self.manifest = m = fmt.read_manifest(folder)
        self.dtype = fmt.record_dtype(m["vocab_size"], m["k_max"], m["num_samples"], m["seq_len"])
        missing = [i for i in range(m["num_shards"])
                   if not _shard_complete(folder, i, m, self.dtype)]
        if missing:
            raise ValueError(f"teacher cache {folder!r} is incomplete: shards {missing[:5]}"
                             f"{'…' if len(missing) > 5 else ''} of {m['num_shards']} are missing "
                             "or short; rerun scripts/cache_teacher.py with the same --out (it "
                             "resumes).")
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return self.manifest["rows"]

    def records(self, index: int) -> np.ndarray:
        per = self.manifest["rows_per_shard"]
        shard, i = divmod(index, per)
        if shard not in self._maps:
            self._maps[shard] = np.memmap(fmt.shard_path(self.folder, shard), dtype=self.dtype,
                                          mode="r")
        return self._maps[shard][i:i + 1]

    def __getitem__(self, index: int) -> TeacherStats:
        return TeacherStats(*(x[0] for x in fmt.decode(self.records(index))))

    def verify(self) -> None:
        """Checks every shard's sha256 against the manifest (reads the whole cache).

        Raises:
          ValueError: a checksum differs, or the manifest has none (the write did not finish).
        """
        shards = self.manifest.get("shards")
        if not shards:
            raise ValueError(f"{self.folder!r}: the manifest lists no checksums; the write did "
                             "not finish (rerun scripts/cache_teacher.py with the same --out).")
        for name, info in sorted(shards.items()):
            if fmt.sha256_file(os.path.join(self.folder, name)) != info["sha256"]:
                raise ValueError(f"{self.folder}/{name} does not match its checksum: rewrite it "
                                 "(delete it and its .json marker, rerun the writer).")

    def __getstate__(self):
        return {"folder": self.folder}

    def __setstate__(self, state):
        self.__init__(**state)


def _shard_complete(folder, index, manifest, dtype) -> bool:
    path = fmt.shard_path(folder, index)
    rows = min(manifest["rows_per_shard"],
               manifest["rows"] - index * manifest["rows_per_shard"])
    return os.path.isfile(path) and os.path.getsize(path) == rows * dtype.itemsize


class CachedRows:
    """grain source: row r of the prepared split with the cache's statistics of row r."""

    def __init__(self, rows: PackedRows, cache: CacheReader):
        self.rows, self.cache = rows, cache

    def __len__(self) -> int:
        return len(self.cache)  # the cached rows: all of the split's, or its first max_rows

    def __getitem__(self, index: int) -> dict:
        stats = self.cache[index]
        return {**self.rows[index], **dict(zip(CACHE_KEYS, stats, strict=True))}


def open_cache(config, vocab_size: int | None = None) -> CacheReader:
    """The cache of `config.data.teacher_cache`, refused unless it fits the run.

    Args:
      config: the (resolved) run config.
      vocab_size: the loss's vocabulary size when known (checked against the cache's V).

    Raises:
      ValueError: the cache's tokenizer, τ, K_max, seq_len, vocabulary or rows do not fit (the
        message names each), or it is incomplete.
      FileNotFoundError: no manifest.
    """
    folder = config.data.teacher_cache
    reader = CacheReader(folder)
    m = reader.manifest
    rows = packed_rows(config.data, m.get("split", "train"))
    fmt.check_fits(m, tokenizer_sha=fmt.tokenizer_hash(config.data.tokenizer),
                   temperature=float(config.loss.temperature), top_k=int(config.loss.top_k),
                   seq_len=int(config.data.seq_len),
                   vocab_size=m["vocab_size"] if vocab_size is None else int(vocab_size),
                   data_sha=fmt.data_hash(rows), folder=folder)
    return reader


class _Batch(grain.transforms.Map):
    """Stacks a list of rows and pads a short final batch with empty rows (loss_mask 0)."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def map(self, batch: dict) -> dict:
        out = {}
        for key, x in batch.items():
            missing = self.batch_size - x.shape[0]
            out[key] = np.pad(x, [(0, missing)] + [(0, 0)] * (x.ndim - 1)) if missing else x
        return out


def make_cached_train_iterator(config, *, seed: int, process_index: int | None = None,
                               process_count: int | None = None) -> grain.DatasetIterator:
    """This host's training batches with the cached statistics (module docstring).

    Rows are shuffled by `seed` (when `data.shuffle`), sharded over hosts row by row and repeated
    for `data.num_epochs` (None = forever), each epoch in a new order.

    Raises:
      ValueError, FileNotFoundError: as `open_cache`, or a batch size that does not divide.
    """
    import jax

    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    data = config.data
    if data.global_batch_size % pc:
        raise ValueError(f"data.global_batch_size={data.global_batch_size} is not divisible by "
                         f"the {pc} processes.")
    from tad_jax.teacher_cache.loss import check_loss_config

    if not data.get("teacher_cache_online"):  # the online baseline needs no cached loss
        check_loss_config(config.loss)
    cache = open_cache(config)
    ds = grain.MapDataset.source(CachedRows(packed_rows(data, "train"), cache))[pi::pc]
    if data.shuffle:
        ds = ds.shuffle(seed=seed)
    if data.num_epochs != 1:
        ds = ds.repeat(data.num_epochs)
    batch_size = data.global_batch_size // pc
    ds = ds.batch(batch_size, drop_remainder=False).map(_Batch(batch_size))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=data.read_threads,
                                              prefetch_buffer_size=4))
    if data.num_workers > 0:  # decoding in worker processes (the sources pickle as paths)
        from tad_jax.data.pipeline import _allow_unparsed_absl_flags

        _allow_unparsed_absl_flags()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=data.num_workers, per_worker_buffer_size=data.worker_buffer_size))
    return iter(ds)


def cache_batch(batch: dict) -> TeacherStats:
    """The `TeacherStats` of a (global or local) batch dict's `CACHE_KEYS` entries."""
    return TeacherStats(*(batch[k] for k in CACHE_KEYS))
