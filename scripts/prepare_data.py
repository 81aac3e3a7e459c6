"""Tokenise a run config's data once.

    python scripts/prepare_data.py --config configs/X.py --out DIR

Then train with `--config.data.prepared_dir=DIR`: batches are the same as when tokenising on the
fly, read memory-mapped instead of holding the text on every host. `--config.data.a=b` overrides
the data section (e.g. `--config.data.tokenizer=PATH`; by default the student's, else the
teacher's folder). Thin on purpose: everything lives in tad_jax.data.prepared.
"""

import json

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py).")
_OUT = flags.DEFINE_string("out", None, "Folder to write the token files into.")
flags.mark_flags_as_required(["config", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from tad_jax import console

    console.setup()  # library logs: --verbosity=0
    from tad_jax.data.prepared import prepare

    config = _CONFIG.value
    data = config.data
    if not data.tokenizer:
        data.tokenizer = config.student.path or config.teacher.path
    print(json.dumps(prepare(data, _OUT.value), indent=1))


if __name__ == "__main__":
    app.run(main)
