"""The paper's figures as PNG files (matplotlib, Agg backend: no display needed).

- `plot_heldout_kl`: held-out KL(p_T‖p_S) against training tokens, one line per run (Fig. 1).
- `plot_tail_and_mismatch`: the teacher's tail mass α_T(K) against K, and the mismatch rate
  (argmax p_T ≠ next token), one entry per evaluated model (Fig. 2a and 2b).

Runs are read from `WORKDIR/metrics.jsonl` (written by `tad_jax.train`): rows with an ``eval_kl``
field and a ``step``; the x axis is the row's ``tokens`` field when present, else
``step × tokens_per_step``, else the step.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping

import matplotlib

matplotlib.use("Agg")  # Files only: the demo and CI have no display.
import matplotlib.pyplot as plt  # noqa: E402

from tad_jax.metrics_log import read_metrics  # noqa: E402


def read_kl_curve(workdir: str | os.PathLike, tokens_per_step: int | None = None
                  ) -> tuple[list[float], list[float], str]:
    """Reads the held-out KL rows of one run.

    Args:
      workdir: the run folder holding metrics.jsonl.
      tokens_per_step: global batch size × sequence length, to turn steps into tokens.

    Returns:
      (x, kl, x_label): x is tokens (or steps when neither a ``tokens`` field nor
      ``tokens_per_step`` is known), in the order of the file, one entry per evaluation.

    Raises:
      FileNotFoundError: no metrics.jsonl in `workdir`.
      ValueError: the file holds no ``eval_kl`` row.
    """
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: train a run into {workdir} first "
                                "(scripts/train.py --workdir ...).")
    rows = [r for r in read_metrics(str(workdir)) if r.get("eval_kl") is not None]
    if not rows:
        raise ValueError(f"{path} has no row with eval_kl: the run never evaluated; lower "
                         "eval.every_steps or let the run finish (it evaluates at the end).")
    if all("tokens" in r for r in rows):
        return [float(r["tokens"]) for r in rows], [float(r["eval_kl"]) for r in rows], "tokens"
    if tokens_per_step:
        x = [float(r["step"]) * tokens_per_step for r in rows]
        return x, [float(r["eval_kl"]) for r in rows], "training tokens"
    return [float(r["step"]) for r in rows], [float(r["eval_kl"]) for r in rows], "step"


def plot_heldout_kl(runs: Mapping[str, str | os.PathLike], out_path: str | os.PathLike, *,
                    tokens_per_step: int | None = None, title: str = "Held-out KL(p_T || p_S)"
                    ) -> pathlib.Path:
    """Draws held-out KL against training tokens, one line per run (the paper's Fig. 1).

    Args:
      runs: label → workdir (e.g. {"KD": "runs/kd", "TAD": "runs/tad"}).
      out_path: the PNG to write (its folder is created).
      tokens_per_step: see `read_kl_curve`.
      title: the figure title.

    Returns:
      The path written.
    """
    if not runs:
        raise ValueError("plot_heldout_kl needs at least one run: {label: workdir}.")
    fig, ax = plt.subplots(figsize=(6, 4))
    x_label = "step"
    for label, workdir in runs.items():
        x, kl, x_label = read_kl_curve(workdir, tokens_per_step)
        ax.plot(x, kl, marker="o", markersize=3, label=label)
    ax.set_xlabel(x_label)
    ax.set_ylabel("held-out KL (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out_path)


def plot_tail_and_mismatch(results: Mapping[str, Mapping], out_path: str | os.PathLike
                           ) -> pathlib.Path:
    """Draws the teacher tail mass α_T(K) against K and the mismatch rate (Fig. 2a and 2b).

    Args:
      results: label → metrics as returned by `tad_jax.metrics.finalize` (``tail_mass`` {K: α},
        JSON's string keys accepted, and ``mismatch_rate``).
      out_path: the PNG to write.

    Returns:
      The path written.
    """
    if not results:
        raise ValueError("plot_tail_and_mismatch needs at least one result: {label: metrics}.")
    fig, (ax_tail, ax_mis) = plt.subplots(1, 2, figsize=(9, 3.8))
    for label, res in results.items():
        ks = sorted(int(k) for k in res["tail_mass"])
        tail = {int(k): float(v) for k, v in res["tail_mass"].items()}
        ax_tail.plot(ks, [tail[k] for k in ks], marker="o", label=label)
    ax_tail.set_xscale("log")
    ax_tail.set_xlabel("K (teacher top-K tokens)")
    ax_tail.set_ylabel("mean tail mass α_T(K)")
    ax_tail.set_title("(a) teacher tail mass")
    ax_tail.grid(alpha=0.3)
    ax_tail.legend()
    labels = list(results)
    rates = [100.0 * float(results[k]["mismatch_rate"]) for k in labels]
    bars = ax_mis.bar(labels, rates, color="tab:orange")
    ax_mis.bar_label(bars, fmt="%.1f%%")
    ax_mis.set_ylim(0, 100)
    ax_mis.set_ylabel("argmax p_T ≠ next token (%)")
    ax_mis.set_title("(b) teacher mismatch rate")
    return _save(fig, out_path)


def _save(fig, out_path) -> pathlib.Path:
    out = pathlib.Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
