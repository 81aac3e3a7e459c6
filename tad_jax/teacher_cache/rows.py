"""Index-addressable training rows of a prepared (pre-tokenised) folder, for the teacher cache.

The online pretraining pipeline shuffles documents and then packs them, so which tokens share a
row (and so what the teacher sees as context) changes with the seed. A cache must know each row's
tokens before training, so cached runs form rows deterministically and shuffle *rows* instead:

    pairs = for each document (in file order): (ids[:-1], ids[1:])   # as features.pairs_from_ids
    row r = pairs[r·T : (r+1)·T] of that concatenation (the last row padded)

which is the pipeline's concat-then-split packing of unshuffled documents: ``segment_ids`` number
the documents of a row from 1 (0 = padding) and ``positions`` restart at 0 at each document and at
the start of a row (a document continued from the previous row), as in ``tad_jax.data.pipeline``.
Pretraining mode only (supervised rows are packed first-fit, which is not addressable by index).
"""

from __future__ import annotations

import os

import numpy as np

from tad_jax.data.prepared import ids_sha256, prepared_source


class PackedRows:
    """Random-access rows `{input_ids, targets, segment_ids, positions, loss_mask}` `[T]` of one
    split of a prepared folder (module docstring). Pickles as its arguments (grain workers)."""

    def __init__(self, prepared_dir: str, split: str, seq_len: int):
        self.prepared_dir, self.split, self.seq_len = prepared_dir, split, seq_len
        self.offsets = offsets = np.load(os.path.join(prepared_dir, f"{split}.offsets.npy"))
        docs = len(offsets) - 1
        # Document d contributes len_d − 1 pairs: pair p of document d reads token p + d.
        self._pair_starts = offsets[:-1] - np.arange(docs)
        self.num_pairs = int(offsets[-1] - docs)
        self._ids = None

    def __len__(self) -> int:
        return -(-self.num_pairs // self.seq_len)

    def ids_sha256(self) -> str:
        """sha256 of the split's token ids (`data.prepared.ids_sha256`)."""
        return ids_sha256(self.prepared_dir, self.split)

    def _tokens(self) -> np.memmap:
        if self._ids is None:
            path = os.path.join(self.prepared_dir, f"{self.split}.ids.bin")
            self._ids = np.memmap(path, dtype=np.int32, mode="r")
        return self._ids

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} is outside [0, {len(self)}).")
        t = self.seq_len
        p = np.arange(index * t, min((index + 1) * t, self.num_pairs))
        doc = np.searchsorted(self._pair_starts, p, side="right") - 1
        ids = self._tokens()
        first = np.concatenate([[True], doc[1:] != doc[:-1]])
        seg = np.cumsum(first)
        start = np.maximum(self._pair_starts[doc], index * t)
        n, pad = len(p), t - len(p)
        row = {"input_ids": ids[p + doc], "targets": ids[p + doc + 1], "segment_ids": seg,
               "positions": p - start, "loss_mask": np.ones(n, np.float32)}
        return {k: np.pad(v.astype(np.float32 if k == "loss_mask" else np.int32), (0, pad))
                for k, v in row.items()}

    def __getstate__(self):
        return {"prepared_dir": self.prepared_dir, "split": self.split, "seq_len": self.seq_len}

    def __setstate__(self, state):
        self.__init__(**state)


def packed_rows(data_cfg, split: str = "train") -> PackedRows:
    """The rows of `data_cfg.prepared_dir`'s split at `data_cfg.seq_len`, checked.

    Raises:
      ValueError: no prepared folder, supervised mode, or an empty split.
      FileNotFoundError: the folder has no complete preparation.
    """
    if not data_cfg.prepared_dir:
        raise ValueError("a teacher cache reads rows by index from pre-tokenised data: run "
                         "scripts/prepare_data.py and set --config.data.prepared_dir=DIR.")
    if data_cfg.mode != "pretrain":
        raise ValueError(f"a teacher cache needs data.mode='pretrain' (got {data_cfg.mode!r}): "
                         "supervised rows are packed first-fit, not addressable by index.")
    prepared_source(data_cfg, split)  # checks meta.json, the mode and a non-empty split
    return PackedRows(data_cfg.prepared_dir, split, data_cfg.seq_len)
