"""Evaluate a trained student: `python scripts/evaluate.py --config configs/X.py --workdir DIR`.

  --checkpoint STEP   the checkpoint to evaluate (default: the newest)
  --max_batches N     held-out batches (default: the config's eval.max_batches; 0 = whole split)
  --config.a.b=v      override config fields, as for scripts/train.py

Prints the metrics as JSON (held-out KL, Full-ECE, mismatch rate, teacher tail mass, student CE /
perplexity, top-1 agreement) and writes WORKDIR/eval.json and the plots under WORKDIR/plots/.
Thin on purpose: everything lives in tad_jax.evaluate.
"""

import json
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run folder (checkpoints, metrics.jsonl).")
_CHECKPOINT = flags.DEFINE_integer("checkpoint", None, "Checkpoint step (default: newest).")
_MAX_BATCHES = flags.DEFINE_integer("max_batches", None, "Held-out batches (0 = all).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from tad_jax import evaluate

    try:
        result = evaluate.evaluate(_CONFIG.value, _WORKDIR.value, step=_CHECKPOINT.value,
                                   max_batches=_MAX_BATCHES.value, progress=True)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        sys.exit(f"error: {e}")  # bad input: the message names the fix, no traceback needed
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    app.run(main)
