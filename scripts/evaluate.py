"""Evaluate a trained student: `python scripts/evaluate.py --workdir DIR [--config configs/X.py]`.

  --config FILE       the run config (default: the one saved with the checkpoint); fields that
                      differ from the saved one are named in a warning
  --checkpoint STEP   the checkpoint to evaluate (default: the newest)
  --max_batches N     held-out batches (default: the config's eval.max_batches; 0 = whole split)
  --config.a.b=v      override config fields of --config, as for scripts/train.py
  --lm_eval_tasks T   also run lm-evaluation-harness on these tasks (comma-separated; "local" =
                      our two local tasks, "paper" = the paper's few-shot suite; needs the
                      lm_eval extra) on the student and the teacher; writes WORKDIR/lm_eval.json
  --lm_eval_student D the student's HF folder (default: export the checkpoint to a temp folder)
  --lm_eval_teacher   also evaluate the teacher (default; --nolm_eval_teacher: the student only)
  --lm_eval_limit N   at most N documents per task; --lm_eval_fewshot K: few-shot examples

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
_LM_EVAL_TASKS = flags.DEFINE_string("lm_eval_tasks", "", "Harness tasks (comma-separated).")
_LM_EVAL_STUDENT = flags.DEFINE_string("lm_eval_student", None, "The student's HF folder.")
_LM_EVAL_TEACHER = flags.DEFINE_bool("lm_eval_teacher", True, "Also evaluate the teacher.")
_LM_EVAL_LIMIT = flags.DEFINE_integer("lm_eval_limit", None, "Documents per task (None: all).")
_LM_EVAL_FEWSHOT = flags.DEFINE_integer("lm_eval_fewshot", None, "Few-shot examples per prompt.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from tad_jax import console

    console.setup()  # library logs: --verbosity=0
    from tad_jax import evaluate

    try:  # config None: the run's saved config
        result = evaluate.evaluate(_CONFIG.value, _WORKDIR.value, step=_CHECKPOINT.value,
                                   max_batches=_MAX_BATCHES.value, progress=True)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        sys.exit(f"error: {e}")  # bad input: the message names the fix, no traceback needed
    print(json.dumps(result, indent=2))
    if _LM_EVAL_TASKS.value:
        config = _CONFIG.value
        if config is None:
            config = evaluate.load_run_config(_WORKDIR.value, result["step"])
        _lm_eval(config)


def _lm_eval(config):
    from tad_jax import harness

    tasks = harness.expand_tasks(_LM_EVAL_TASKS.value)
    print(f"lm-evaluation-harness: {', '.join(tasks)}", flush=True)
    try:
        result = harness.evaluate_run(
            config, _WORKDIR.value, tasks, student_dir=_LM_EVAL_STUDENT.value,
            teacher=_LM_EVAL_TEACHER.value, step=_CHECKPOINT.value, limit=_LM_EVAL_LIMIT.value,
            num_fewshot=_LM_EVAL_FEWSHOT.value)
    except (ImportError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(harness.summary_table(result))


if __name__ == "__main__":
    app.run(main)
