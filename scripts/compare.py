"""KD against TAD from one student initialisation (the paper's Fig. 1):
`python scripts/compare.py --config configs/demo.py [--workdir runs/compare] [--config.steps=N]`.

Trains the config twice for the same steps on the same data order and from the same student
initialisation (same seed), once with vanilla KD (loss.divergence="kl") and once with TAD, into
WORKDIR/kd and WORKDIR/tad, then draws held-out KL against training tokens for both into
WORKDIR/heldout_kl_kd_vs_tad.png and prints each run's final held-out metrics as JSON.
With `--teacher_cache DIR` (and `--config.data.prepared_dir` of that cache), the two runs are
TAD with the teacher online and TAD from the cache, on the same rows (WORKDIR/online,
WORKDIR/cached). Rerunning resumes (or skips) finished runs. Thin on purpose: the work is in
tad_jax.
"""

import json
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py).",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", "runs/compare", "Parent folder of the two runs.")
_EVALUATE = flags.DEFINE_bool("evaluate", True, "Also run the full evaluation (eval.json) of both.")
_CACHE = flags.DEFINE_string("teacher_cache", None, "Compare online against cached TAD instead: "
                             "both read this cache's rows (scripts/cache_teacher.py).")
flags.mark_flag_as_required("config")

RUNS = (("KD", "kd", "kl"), ("TAD", "tad", "tad"))  # label, sub-folder, loss.divergence
# With --teacher_cache: label, sub-folder, data.teacher_cache_online (same rows, same seed).
CACHE_RUNS = (("TAD online", "online", True), ("TAD cached", "cached", False))


def _runs(base):
    """(label, sub-folder, config) of the two runs."""
    for label, sub, value in (CACHE_RUNS if _CACHE.value else RUNS):
        config = base.copy_and_resolve_references()
        if _CACHE.value:
            config.data.teacher_cache, config.data.teacher_cache_online = _CACHE.value, value
        else:
            config.loss.divergence = value
        yield label, sub, config


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from tad_jax import console

    console.setup()  # library logs: --verbosity=0
    from tad_jax import evaluate, plots, train

    base = _CONFIG.value
    workdirs, summary = {}, {}
    for label, sub, config in _runs(base):
        workdir = os.path.join(_WORKDIR.value, sub)
        print(f"== {label}: loss.divergence={config.loss.divergence} -> {workdir}", flush=True)
        last = train.train_and_evaluate(config, workdir)
        workdirs[label] = workdir
        summary[label] = {k: v for k, v in last.items() if k.startswith("eval_")}
        if _EVALUATE.value:
            summary[label] = evaluate.evaluate(config, workdir)
    tokens_per_step = base.data.global_batch_size * base.data.seq_len
    name, title = (("heldout_kl_online_vs_cached.png", "Held-out KL: online vs cached TAD")
                   if _CACHE.value else
                   ("heldout_kl_kd_vs_tad.png", "Held-out KL(p_T || p_S): KD vs TAD"))
    png = plots.plot_heldout_kl(workdirs, os.path.join(_WORKDIR.value, name),
                                tokens_per_step=tokens_per_step, title=title)
    print(json.dumps(summary, indent=2))
    print(f"Fig. 1 plot: {png}")


if __name__ == "__main__":
    app.run(main)
