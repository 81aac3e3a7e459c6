"""Export a trained student as a Hugging Face folder: `python scripts/export_hf.py --workdir DIR
--out DIR [--overwrite] [--checkpoint STEP]`.

The folder (config.json, model.safetensors, tokenizer files) loads with
`transformers.AutoModelForCausalLM.from_pretrained(out)`. The run's config is read from the
checkpoint. A non-empty --out is refused unless it is an earlier export (an HF folder, with a
config.json) and --overwrite is given; an --out that is or holds the workdir or the current
directory is always refused.
Thin on purpose: everything lives in tad_jax.evaluate.
"""

import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "The run folder (checkpoints).")
_OUT = flags.DEFINE_string("out", None, "The HF folder to write.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Replace --out if it is an earlier export (an HF folder).")
_CHECKPOINT = flags.DEFINE_integer("checkpoint", None, "Checkpoint step (default: newest).")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from tad_jax import console

    console.setup()  # library logs: --verbosity=0
    from tad_jax import evaluate

    try:
        out = evaluate.export_hf(_WORKDIR.value, _OUT.value, step=_CHECKPOINT.value,
                                 overwrite=_OVERWRITE.value)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        sys.exit(f"error: {e}")  # bad input: the message names the fix, no traceback needed
    print(f"Exported the student to {out}: "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")


if __name__ == "__main__":
    app.run(main)
