"""Run the teacher once over the training rows and write a compact teacher cache.

    python scripts/cache_teacher.py --config configs/X.py --out DIR [--k_max 20 --samples 16]

Needs pre-tokenised data (`scripts/prepare_data.py`, then `--config.data.prepared_dir=PREP`).
Then train any number of students with `--config.data.teacher_cache=DIR`: the train step skips
the teacher's forward pass. Under `jax.distributed` every process writes its own shards; rerun
the same command after an interruption (finished shards are skipped). `--table` prints the
bytes per token over V, K and S and exits. Thin on purpose: the library is tad_jax.teacher_cache.
"""

import json

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py).")
_OUT = flags.DEFINE_string("out", None, "Cache folder to write (or resume).")
_K_MAX = flags.DEFINE_integer("k_max", None, "Head entries per token (default loss.top_k).")
_SAMPLES = flags.DEFINE_integer("samples", 16, "Tail draws per token (S).")
_ROWS = flags.DEFINE_integer("rows_per_shard", 256, "Rows per shard file.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the tail draws.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Rows per teacher forward.")
_MAX_ROWS = flags.DEFINE_integer("max_rows", None, "Cache only the first rows (default all).")
_TABLE = flags.DEFINE_bool("table", False, "Print the bytes/token table and exit.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from tad_jax.teacher_cache import format as fmt

    if _TABLE.value:
        print(fmt.bytes_table())
        return
    if _CONFIG.value is None or _OUT.value is None:
        raise app.UsageError("--config and --out are required.")
    from tad_jax.teacher_cache.writer import write_cache

    manifest = write_cache(_CONFIG.value, _OUT.value, k_max=_K_MAX.value,
                           num_samples=_SAMPLES.value, rows_per_shard=_ROWS.value,
                           seed=_SEED.value, batch_size=_BATCH.value,
                           max_rows=_MAX_ROWS.value)
    print(json.dumps({k: v for k, v in manifest.items() if k != "shards"}, indent=1))


if __name__ == "__main__":
    app.run(main)
