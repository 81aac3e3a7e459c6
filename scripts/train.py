"""Distil a teacher into a student: `python scripts/train.py --config configs/X.py --workdir DIR`.

  --config.a.b=v     override any config field (unknown fields are an error)
  --dry_run          compile the steps on abstract shapes for this host's devices or, with
                     --config.dry_run.topology=v5p:2x2x1 (h100:2, ...), for accelerators that are
                     not attached; print memory per device, a fit verdict, the micro-batching
                     opt.grad_accum_steps=0 would choose, FLOPs, a roofline step time and the
                     run's days (no weights are loaded)
  --dry_run_json=F   with --dry_run: also write the figures to F

Rerunning the same command with the same --workdir resumes from the newest checkpoint.
Thin on purpose: everything lives in tad_jax.train.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of checkpoints and metrics.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Compile on abstract shapes and print figures.")
_DRY_RUN_JSON = flags.DEFINE_string("dry_run_json", None, "With --dry_run: also write the figures "
                                    "to this JSON file.")
flags.mark_flag_as_required("config")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from tad_jax import console

    console.setup()  # library logs: --verbosity=0
    from tad_jax import train
    from tad_jax.sharding import PeerFailure

    if _DRY_RUN.value:
        train.dry_run(_CONFIG.value, json_path=_DRY_RUN_JSON.value)
        return
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required (or pass --dry_run).")
    try:
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except PeerFailure as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        os._exit(1)  # not sys.exit: jax's exit handler would wait for the dead process


def _check_overrides(argv):
    """Unknown --config.a.b fields: a clear error before absl's own (an AttributeError)."""
    paths = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    paths += [b for a, b in zip(argv, argv[1:], strict=False) if a == "--config"]
    if paths:
        import ml_collections
        from ml_collections.config_flags import config_flags as cf

        from tad_jax.config import check_overrides

        config = cf.ConfigFileFlagParser("config").parse(paths[-1])
        # A file that cannot be loaded parses to an error placeholder, not a config: absl then
        # reports the real cause (e.g. no such file), not "unknown field".
        if isinstance(config, ml_collections.ConfigDict):
            check_overrides(config, argv)


if __name__ == "__main__":
    _check_overrides(sys.argv)
    app.run(main)
