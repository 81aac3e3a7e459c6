"""FLOPs per token of the cached train step against the online one (the teacher cache's gain).

    python scripts/bench_cache.py --config configs/gemma2_9b.py --layers 3,6 [--out FILE.json]

Compiles both steps on abstract shapes (nothing allocated); with --layers the teacher is cut to
n1 and n2 layers (the student in proportion) and the full model's FLOPs are extrapolated
linearly. Prints (and writes) JSON. Thin on purpose: tad_jax.teacher_cache.cost does the work.
"""

import json

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py).")
_LAYERS = flags.DEFINE_list("layers", None, "Two cut teacher sizes to extrapolate from.")
_SAMPLES = flags.DEFINE_integer("samples", 16, "Tail draws per token in the cache (S).")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON here.")
flags.mark_flag_as_required("config")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from tad_jax.teacher_cache.cost import flops_cached_vs_online

    layers = tuple(int(x) for x in _LAYERS.value) if _LAYERS.value else None
    figures = flops_cached_vs_online(_CONFIG.value, layers=layers, num_samples=_SAMPLES.value)
    text = json.dumps(figures, indent=1)
    print(text)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    app.run(main)
