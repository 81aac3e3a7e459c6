"""grain pipelines: documents → tokenised pairs → packed or padded rows → per-host batches.

Shapes: ``_bt`` = [batch, T]. A batch is a dict of numpy arrays ``[B_local, seq_len]``:
``input_ids`` / ``targets`` / ``segment_ids`` / ``positions`` int32 and ``loss_mask`` float32.
``segment_ids`` number the documents of a row from 1 (0 = padding); ``positions`` restart at 0 at
each segment, including the continuation of a document split across rows.

Pipeline (``make_train_iterator``)::

    MapDataset.source(documents)[shard::num_shards]              # disjoint shards
      .shuffle(seed).repeat(num_epochs)                          # reshuffled every epoch
      .map(TokenizeDocument)                                     # in worker processes
      .to_iter_dataset() → pack (ConcatThenSplit / FirstFit) or pad → batch → mp_prefetch

Shards: the documents are split into ``data.num_shards`` strided shards (0 = one per process),
each packed and batched on its own into ``global_batch_size / num_shards`` rows. Process ``p`` of
``P`` reads the consecutive shards ``p·S/P … (p+1)·S/P − 1`` and concatenates their rows, so the
global batch (processes in order) is shard 0's rows, then shard 1's, ...: with ``num_shards``
fixed, the global batches are the same whatever the number of processes.
"""

from __future__ import annotations

import json
from typing import Any

import grain
import ml_collections
import numpy as np

from tad_jax.data.features import PadToRow, TokenizeDocument, check_tokenizer
from tad_jax.data.prepared import PreparedToPairs, prepared_source
from tad_jax.data.sources import load_split

BATCH_KEYS = ("input_ids", "targets", "segment_ids", "positions", "loss_mask")
_PAIR_KEYS = ("input_ids", "targets", "loss_mask")


def default_data_config() -> ml_collections.ConfigDict:
    """The ``data`` section of a run config, every field with its default; configs override."""
    c = ml_collections.ConfigDict()
    c.mode = "pretrain"  # "pretrain" (packed documents) or "sft" (prompt/response masked)
    c.train_files = ""  # glob or list of globs of training files
    # glob(s) of held-out files (left out of train_files if its glob matches them too); empty =
    # split train_files by val_fraction.
    c.val_files = ""
    c.val_fraction = 0.01  # fraction of documents held out (by content hash) without val_files
    c.format = "auto"  # "auto" (by extension) | "text" | "jsonl" | "parquet"; .gz/.zst read too
    c.text_field = "text"  # JSONL/Parquet field with the text (pretrain)
    c.prompt_field = "prompt"  # JSONL/Parquet field with the prompt (sft)
    c.response_field = "response"  # JSONL/Parquet field with the response (sft)
    c.messages_field = "messages"  # field with chat messages [{role, content}] (sft), if present
    c.use_chat_template = True  # sft: render with the tokenizer's chat template when it has one
    c.text_chunking = "paragraphs"  # plain text documents: "paragraphs" | "file" | "lines"
    c.text_chunk_chars = 4000  # "paragraphs": merge blank-line paragraphs up to this many chars
    c.strict_jsonl = False  # a malformed JSONL line raises instead of being counted and skipped
    c.tokenizer = ""  # local HF tokenizer folder (the student's)
    c.prepared_dir = ""  # folder of scripts/prepare_data.py; if set, read instead of the files
    c.teacher_cache = ""  # folder of scripts/cache_teacher.py: rows by index + cached teacher
    c.teacher_cache_online = False  # with teacher_cache: its rows, teacher online (the baseline)
    c.seq_len = 512  # tokens per row (input/target pairs)
    c.global_batch_size = 8  # rows per step over all processes
    # documents split into this many shards, each packed on its own; a process reads
    # num_shards / process_count of them. 0 = one per process; a fixed number (a multiple of the
    # process count) gives the same global batches whatever the number of processes.
    c.num_shards = 0
    c.pack = True  # sft: pack several examples per row (True) or one padded example per row
    c.packing_bins = 0  # sft packing: first-fit bins (0 = the per-host batch size)
    c.shuffle = True  # shuffle documents (from the seed given to make_train_iterator)
    c.num_epochs = ml_collections.config_dict.placeholder(int)  # None = repeat forever
    c.num_workers = 0  # grain worker processes for tokenising and packing (0 = in-process)
    c.worker_buffer_size = 4  # batches buffered per worker process
    c.read_threads = 2  # threads that tokenise within each process
    return c


def _check(cfg, process_index: int, process_count: int) -> None:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count}); pass "
                         "this host's jax.process_index() and jax.process_count().")
    if cfg.num_epochs is not None and cfg.num_epochs < 1:
        raise ValueError(f"data.num_epochs={cfg.num_epochs}; use None (repeat) or at least 1.")
    if cfg.seq_len < 2:
        raise ValueError(f"data.seq_len={cfg.seq_len}; use at least 2.")
    if cfg.mode not in ("pretrain", "sft"):
        raise ValueError(f"data.mode={cfg.mode!r}; use 'pretrain' or 'sft'.")
    shards = cfg.num_shards or process_count
    if cfg.num_shards < 0 or shards % process_count:
        raise ValueError(f"data.num_shards={cfg.num_shards} is not a multiple of the "
                         f"{process_count} processes; use 0 (one shard per process) or a multiple.")
    if cfg.global_batch_size % shards:
        raise ValueError(f"data.global_batch_size={cfg.global_batch_size} is not divisible by "
                         f"the {shards} data shards (one per process unless data.num_shards is "
                         "set); make it a multiple.")
    if not cfg.prepared_dir:
        check_tokenizer(cfg.tokenizer)


def _source(cfg, split: str):
    """(random-access documents, the transform to pairs) of a split: prepared or raw files."""
    if cfg.prepared_dir:
        return prepared_source(cfg, split), PreparedToPairs(cfg.mode, cfg.seq_len)
    return load_split(cfg, split), TokenizeDocument(cfg.tokenizer, cfg.mode, cfg.seq_len,
                                                    cfg.use_chat_template)


def _rows(ds: grain.IterDataset, cfg, batch_size: int, seed: int) -> grain.IterDataset:
    """Pairs → rows of seq_len: packed (pretrain: concat-then-split; sft: first-fit) or padded."""
    lengths = dict.fromkeys(_PAIR_KEYS, cfg.seq_len)
    if cfg.mode == "pretrain":
        # Concat-then-split never drops a token: a document longer than the rest of a row
        # continues at the start of the next one.
        ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct=lengths)
    elif cfg.pack:
        # First-fit keeps each example whole in one row (examples were truncated to seq_len).
        ds = grain.experimental.FirstFitPackIterDataset(
            ds, length_struct=lengths, num_packing_bins=cfg.packing_bins or batch_size,
            seed=seed, shuffle_bins=False)
    else:
        return ds.map(PadToRow(cfg.seq_len))
    return ds.map(_rename_packed)


def _rename_packed(row: dict) -> dict:
    return {**{k: row[k] for k in _PAIR_KEYS}, "segment_ids": row["input_ids_segment_ids"],
            "positions": row["input_ids_positions"]}


class _FinishBatch(grain.transforms.Map):
    """Fixes dtypes and pads a short final batch with empty rows, so every batch has one shape."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def map(self, batch: dict) -> dict:
        out = {}
        for key in BATCH_KEYS:
            x_bt = np.asarray(batch[key], np.float32 if key == "loss_mask" else np.int32)
            missing = self.batch_size - x_bt.shape[0]
            out[key] = np.pad(x_bt, ((0, missing), (0, 0))) if missing else x_bt
        return out


def _pipeline(split: str, cfg, *, batch_size: int, seed: int, shard: tuple[int, int],
              shuffle: bool, num_epochs, num_workers: int) -> grain.IterDataset:
    index, count = shard
    docs, to_pairs = _source(cfg, split)
    ds = grain.MapDataset.source(docs)[index::count]
    if len(ds) == 0:  # Repeating an empty shard would spin forever.
        raise ValueError(f"process {index} of {count} gets none of the {len(docs)} {split} "
                         "documents; use fewer processes or more (or smaller) documents.")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.map(to_pairs)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                              prefetch_buffer_size=4 * batch_size))
    ds = _rows(ds, cfg, batch_size, seed)
    ds = ds.batch(batch_size, drop_remainder=False).map(_FinishBatch(batch_size))
    if num_workers > 0:
        _allow_unparsed_absl_flags()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=cfg.worker_buffer_size))
    return ds


def _allow_unparsed_absl_flags() -> None:
    """grain's worker processes read absl flags; outside ``absl.app.run`` they are unparsed.

    Marking them parsed keeps every flag at its default (``app.run`` parses argv again anyway),
    so that notebooks, pytest and plain-argparse scripts can use worker processes too.
    """
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_train_iterator(data_cfg, *, seed: int, process_index: int | None = None,
                        process_count: int | None = None) -> grain.DatasetIterator:
    """A checkpointable iterator of this host's training batches.

    Args:
        data_cfg: the run config's ``data`` section (``default_data_config()`` fields).
        seed: shuffling seed; the same seed gives the same batches.
        process_index: this host's index (default ``jax.process_index()``).
        process_count: number of hosts (default ``jax.process_count()``); host i reads documents
            i, i + count, ... of the training split, disjoint from every other host's.

    Returns:
        A grain iterator (``get_state()`` / ``set_state()``) of dicts of numpy arrays
        ``[global_batch_size // process_count, seq_len]`` (see the module docstring). With
        ``num_epochs`` set it ends after that many passes, its last batch padded with empty rows.

    Raises:
        ValueError, FileNotFoundError: bad config, missing files or tokenizer, empty corpus.
    """
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    _check(data_cfg, process_index, process_count)
    shards = _process_shards(data_cfg, process_index, process_count)
    iters = [iter(_pipeline("train", data_cfg, batch_size=data_cfg.global_batch_size // count,
                            seed=seed, shard=(k, count), shuffle=data_cfg.shuffle,
                            num_epochs=data_cfg.num_epochs, num_workers=data_cfg.num_workers))
             for k, count in shards]
    return iters[0] if len(iters) == 1 else ShardsIterator(iters, pad=False)


def make_eval_iterator(data_cfg, *, batch_size: int, max_batches: int | None = None,
                       process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
    """A finite, deterministic iterator over the held-out split (one pass, unshuffled).

    Args:
        data_cfg: the run config's ``data`` section.
        batch_size: rows per batch (per host), split evenly over this host's data shards.
        max_batches: stop after this many batches (None = the whole split).
        process_index: this host's index (default: the only host).
        process_count: number of hosts.

    Returns:
        An iterator of the same dicts as ``make_train_iterator``; the last batch is padded. When
        a host reads several shards, one that ends first contributes fully masked rows
        (``loss_mask`` 0, ``segment_ids`` 0) until the last of them ends. Hosts may still hold
        different numbers of batches: a collective evaluation must agree on a count (see
        ``tad_jax.sharding.any_process``) and feed ``masked_like(batch)`` after its end.
    """
    _check(data_cfg, process_index, process_count)
    shards = _process_shards(data_cfg, process_index, process_count)
    if batch_size % len(shards):
        raise ValueError(f"eval.batch_size per process ({batch_size}) is not divisible by its "
                         f"{len(shards)} data shards (data.num_shards); make it a multiple.")
    iters = []
    for k, count in shards:
        # In-process: eval batches must not depend on the worker count, and the split is small.
        ds = _pipeline("validation", data_cfg, batch_size=batch_size // len(shards), seed=0,
                       shard=(k, count), shuffle=False, num_epochs=1, num_workers=0)
        if max_batches is not None:
            ds = grain.experimental.LimitIterDataset(ds, count=max_batches)
        iters.append(iter(ds))
    return iters[0] if len(iters) == 1 else ShardsIterator(iters, pad=True)


def _process_shards(cfg, process_index: int, process_count: int) -> list[tuple[int, int]]:
    """(shard, num_shards) of each shard this process reads, in global-batch order."""
    count = cfg.num_shards or process_count
    per = count // process_count
    return [(k, count) for k in range(process_index * per, (process_index + 1) * per)]


def masked_like(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A batch of the same shapes whose rows are all padding (nothing counts, nothing attends)."""
    return {k: np.zeros_like(v) for k, v in batch.items()}


class ShardsIterator:
    """The rows of several shards' iterators side by side, checkpointable like a grain iterator.

    Args:
        iterators: one grain iterator per shard, in global-batch order.
        pad: False (training): stop as soon as any shard ends. True (evaluation): go on until
            every shard ends, an ended shard giving masked rows.
    """

    def __init__(self, iterators: list, *, pad: bool):
        self._iters, self._pad = iterators, pad
        self._done = [False] * len(iterators)
        self._template = None

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = []
        for i, it in enumerate(self._iters):
            batch = None if self._done[i] else next(it, None)
            if batch is None:
                self._done[i] = True
                if not self._pad or all(self._done):
                    raise StopIteration
            elif self._template is None:
                self._template = masked_like(batch)
            parts.append(batch)
        parts = [self._template if b is None else b for b in parts]
        return {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}

    def get_state(self) -> dict[str, Any]:
        return {"shards": [it.get_state() for it in self._iters]}

    def set_state(self, state: dict[str, Any]) -> None:
        if len(state.get("shards", ())) != len(self._iters):
            raise ValueError(f"The saved data position holds {len(state.get('shards', ()))} "
                             f"shards but this process reads {len(self._iters)}: resume with the "
                             "same data.num_shards and number of processes.")
        for it, s in zip(self._iters, state["shards"], strict=True):
            it.set_state(s)


def to_global_batch(local_batch: dict[str, np.ndarray], sharding) -> dict[str, Any]:
    """Assembles this host's batch into global ``jax.Array``s laid out by ``sharding``.

    Args:
        local_batch: dict of per-host numpy arrays ``[B_local, T]``.
        sharding: a ``jax.sharding.Sharding`` for every array, or a dict of them per key.

    Returns:
        Dict of ``jax.Array`` ``[B_local * process_count, T]``.
    """
    import jax

    # global_shape: without it jax takes one process's rows for the whole array when a shard of
    # rows spans processes, instead of refusing (`sharding.check_batch_processes` says why).
    return {k: jax.make_array_from_process_local_data(
        sharding[k] if isinstance(sharding, dict) else sharding, v,
        (v.shape[0] * jax.process_count(),) + v.shape[1:])
        for k, v in local_batch.items()}


def iterator_state_to_json(iterator) -> str:
    """The iterator's position as a JSON string (save it with the training state)."""
    return json.dumps(iterator.get_state())


def restore_iterator_state(iterator, state_json: str) -> None:
    """Moves a freshly made iterator (same config and seed) to a saved position."""
    iterator.set_state(_lists_to_tuples(json.loads(state_json)))


def _lists_to_tuples(x):
    """JSON has no tuples, but grain's states hold some and compare them with tuples: concat-then-
    split's "no remainder" sentinel is `(-1, -1)`, and a restored `[-1, -1]` != `(-1, -1)` made it
    consume (and lose) one document at every resume that had no partial document pending."""
    if isinstance(x, dict):
        return {k: _lists_to_tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_lists_to_tuples(v) for v in x)
    return x
