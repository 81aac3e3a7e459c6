"""A markdown table of dry runs: `python scripts/dry_run_table.py NAME=FILE.json ...`.

Each FILE.json is `scripts/train.py --dry_run --dry_run_json=FILE.json` output. Per row: the
compiled target, its memory per device and verdict, then the roofline step time and days for the
run's tokens on each chip of `--chips` with the same device count (`tad_jax.dry_run.roofline`:
the FLOPs are the target's, platform independent; the bytes those of the compiled target).
"""

import json

from absl import app, flags

from tad_jax import targets
from tad_jax.dry_run import roofline

_CHIPS = flags.DEFINE_list("chips", ["h100", "v5p", "v6e"], "Chips of the roofline columns.")


def main(argv):
    head = "| setup | compiled for | GiB / device | " + " | ".join(
        f"{c} step s | {c} days" for c in _CHIPS.value) + " |"
    print(head)
    print("|" + "---|" * (3 + 2 * len(_CHIPS.value)))
    for arg in argv[1:]:
        name, path = arg.split("=", 1)
        with open(path) as fh:
            f = json.load(fh)
        if "bytes_per_device" not in f:  # a host dry run: no chip, so no roofline
            raise app.UsageError(f"{path} is a dry run for this host ({f.get('target')!r}), "
                                 "which has no roofline: compile for a topology "
                                 "(--config.dry_run.topology=h100:2, v5p:2x2x1, ...).")
        devices = f"{f['devices']} device{'s' if f['devices'] > 1 else ''}"
        cells = [name, f"{f['target']} ({devices}), {f['grad_accum_steps']} micro-batches",
                 f"{f['peak_gib']:.1f}"]
        for c in _CHIPS.value:
            r = roofline(targets.CHIPS[c], f["step_flops"], f["step_model_flops"],
                         f["bytes_per_device"], f["devices"], f["step_tokens"], f["run_steps"])
            cells += [f"{r['step_time_s']:.2f}", f"{r['run_days']:.2f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    app.run(main)
