"""Data pipelines (grain): sources → tokenise → pack / mask → per-host and global batches.

The contract (docs/ARCHITECTURE.md) lives here; the pieces are in ``sources`` (files → documents,
held-out split), ``features`` (tokenisation, masks), ``prepared`` (optional pre-tokenised folders)
and ``pipeline`` (grain datasets, batches).
"""

from tad_jax.data.pipeline import (
    BATCH_KEYS,
    default_data_config,
    iterator_state_to_json,
    make_eval_iterator,
    make_train_iterator,
    masked_like,
    restore_iterator_state,
    to_global_batch,
)
from tad_jax.data.prepared import prepare

__all__ = [
    "BATCH_KEYS",
    "default_data_config",
    "iterator_state_to_json",
    "make_eval_iterator",
    "make_train_iterator",
    "masked_like",
    "prepare",
    "restore_iterator_state",
    "to_global_batch",
]
