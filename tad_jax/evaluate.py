"""Evaluation of a trained student: held-out metrics, eval.json, plots, and the HF export.

- `evaluate(config, workdir, step=None)`: restores the student checkpoint, streams the held-out
  split through teacher and student and `tad_jax.metrics.eval_sums` (one jitted call per batch,
  only the small sums come back to the host), writes `WORKDIR/eval.json` and the plots under
  `WORKDIR/plots/`.
- `export_hf(workdir, out, overwrite=False)`: the student as a Hugging Face folder (weights,
  config.json, tokenizer) that `transformers.AutoModelForCausalLM` loads.
- `load_run_config(workdir)`: the run config stored with the newest checkpoint.

Shapes: `_bt` = [batch, T], `_btv` = [batch, T, V].
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import time
from typing import Any

import jax
import ml_collections

from tad_jax import metrics, plots, sharding

EVAL_FILE = "eval.json"
logger = logging.getLogger(__name__)
PLOTS_DIR = "plots"


def _checkpointer(workdir):
    from tad_jax.checkpoint import Checkpointer

    return Checkpointer(workdir, async_save=False)


def require_checkpoint(workdir: str | os.PathLike, step: int | None = None) -> int:
    """The checkpoint step to use in `workdir` (the newest when `step` is None).

    Raises:
      FileNotFoundError: `workdir` holds no checkpoint, or not the requested step.
    """
    ckpt_dir = pathlib.Path(workdir) / "checkpoints"
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(
            f"No checkpoint in {workdir} (no {ckpt_dir}): train first with "
            f"`python scripts/train.py --config CONFIG --workdir {workdir}`, or pass the workdir "
            "of a finished run.")
    ckpt = _checkpointer(workdir)
    try:
        steps = ckpt.all_steps()
    finally:
        ckpt.close()
    if not steps:
        raise FileNotFoundError(
            f"No checkpoint in {ckpt_dir}: the run did not save one yet; train first with "
            f"`python scripts/train.py --config CONFIG --workdir {workdir}`.")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"No checkpoint of step {step} in {ckpt_dir}; saved steps: "
                                f"{steps}. Pass one of them, or omit --checkpoint for the newest.")
    return step


def load_run_config(workdir: str | os.PathLike, step: int | None = None
                    ) -> ml_collections.ConfigDict:
    """The run config saved with checkpoint `step` (default: the newest) of `workdir`."""
    step = require_checkpoint(workdir, step)
    ckpt = _checkpointer(workdir)
    try:
        saved = ckpt.read_meta(step)["config"]
    finally:
        ckpt.close()
    return ml_collections.ConfigDict(saved)


def heldout_metrics(config, student, teacher, *, max_batches: int | None = None,
                    tail_ks=metrics.DEFAULT_TAIL_KS, ece_bins: int = 10, progress: bool = False
                    ) -> dict[str, Any]:
    """Streams the held-out split through both models; returns `metrics.finalize`'s dict.

    Args:
      config: the (resolved) run config; its `data` section defines the held-out split.
      student: (model, params).
      teacher: (model, params).
      max_batches: evaluation batches (None = `eval.max_batches`, where 0 means the whole split).
      tail_ks: the K of the tail masses.
      ece_bins: Full-ECE bins.
      progress: print one line per batch.
    """
    from tad_jax.data import make_eval_iterator
    from tad_jax.run_setup import eval_chunk_size
    from tad_jax.step import make_eval_step
    from tad_jax.train import shared_vocab_size

    vocab = shared_vocab_size(config, teacher[0].config, student[0].config)
    # The same chunks as the training run's eval step: a fused-loss run never holds [B, T, V].
    step = jax.jit(make_eval_step(student[0], teacher[0], vocab, tail_ks=tail_ks,
                                  ece_bins=ece_bins, chunk_size=eval_chunk_size(config)))
    if max_batches is None:
        max_batches = config.eval.max_batches
    it = make_eval_iterator(config.data, batch_size=config.eval.batch_size,
                            max_batches=max_batches or None)
    total, start = None, time.perf_counter()
    for i, batch in enumerate(it):
        total = metrics.add_sums(total, jax.device_get(step(student[1], teacher[1], batch)))
        if progress:
            print(f"eval batch {i + 1}: {time.perf_counter() - start:.1f} s", flush=True)
    if total is None:
        raise ValueError("The held-out split is empty: set data.val_files or raise "
                         "data.val_fraction.")
    return metrics.finalize(total)


def evaluate(config: ml_collections.ConfigDict | None, workdir: str | os.PathLike, *,
             step: int | None = None, max_batches: int | None = None, write: bool = True,
             progress: bool = False) -> dict[str, Any]:
    """Evaluates the student checkpoint of `workdir` on the held-out split.

    Args:
      config: the run config the student was trained with; None: the one saved with the
        checkpoint. Fields that differ from the saved config are named in a warning.
      workdir: the run folder (checkpoints/, metrics.jsonl).
      step: checkpoint step (None = the newest).
      max_batches: evaluation batches (None = `eval.max_batches`; 0 = the whole split).
      write: write `WORKDIR/eval.json` and the plots under `WORKDIR/plots/`.
      progress: print one line per batch.

    Returns:
      The metrics (see `metrics.finalize`) plus ``step``, ``eval_seconds`` and ``plots``.

    Raises:
      FileNotFoundError: no checkpoint (or not `step`) in `workdir`.
      ValueError: the checkpoint does not fit the config's student (the differing fields named).
    """
    from tad_jax.run_setup import resolved_config
    from tad_jax.train import build_teacher

    _initialize_distributed(config)  # before any jax work, orbax's included
    step = require_checkpoint(workdir, step)
    saved = load_run_config(workdir, step)
    config = resolved_config(config if config is not None else saved)
    diffs = _differences_from_run(config, saved)
    start = time.perf_counter()
    logger.info("Loading the teacher (%s) and the student of step %d", config.teacher.path, step)
    if jax.process_count() > 1:
        with sharding.peer_failures("evaluation"):
            result = _heldout_metrics_sharded(config, workdir, step, max_batches, progress, diffs)
    else:
        teacher = build_teacher(config)
        student_model, student_params, step = _restore_student(config, workdir, step, diffs)
        result = heldout_metrics(config, (student_model, student_params), teacher,
                                 max_batches=max_batches, progress=progress)
    result = {"step": int(step), **result, "eval_seconds": time.perf_counter() - start}
    if write and jax.process_index() == 0:  # one writer; the figures are the same everywhere
        result["plots"] = draw_plots(workdir, result, config)
        path = pathlib.Path(workdir) / EVAL_FILE
        path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _quiet_fields() -> tuple[str, ...]:
    """Fields whose difference from the run's config changes no figure: those a run may resume
    with, less the teacher, student and data paths (another teacher or held-out file changes
    the figures); the evaluation's own settings and chunking; how long training ran."""
    from tad_jax.config import RESUMABLE_FIELDS

    paths = ("teacher.path", "student.path", "data.train_files", "data.val_files",
             "data.tokenizer")
    return tuple(f for f in RESUMABLE_FIELDS if f not in paths) + (
        "eval", "loss.fused", "loss.chunk_size", "steps", "train_tokens", "ckpt")


def _differences_from_run(config, saved) -> list[str]:
    """The fields of `config` that differ from `saved`, the config saved with the checkpoint,
    noted as a warning: the held-out figures are then those of another setup than the one
    trained."""
    from tad_jax.config import config_differences, config_to_dict

    diffs = config_differences(saved.to_dict(), config_to_dict(config), ignore=_quiet_fields())
    if diffs:
        logger.warning("Evaluating with a config that differs from the run's (saved with its "
                       "checkpoint) in: %s", _shown(diffs))
    return diffs


def _shown(fields: list[str]) -> str:
    return ", ".join(fields[:10]) + (" ..." if len(fields) > 10 else "")


def _restore_student(config, workdir, step, diffs, mesh=None):
    """`train.restore_student`; a checkpoint that does not fit the config's student is an error
    that names the config fields that differ from the run's, not orbax's tree dump."""
    from tad_jax.train import restore_student

    try:
        return restore_student(config, str(workdir), step, mesh)
    except ValueError as e:
        # Only the fields that shape the restored state (the models, the optimizer's state).
        shaping = [d for d in diffs if d.startswith(("student.", "teacher.", "opt."))]
        if not shaping:
            raise
        raise ValueError(f"The checkpoint of {workdir} does not fit the student of this config, "
                         f"which differs from the run's in: {_shown(shaping)}. Evaluate with the "
                         "run's own config (the --config and overrides it was trained with)."
                         ) from e


def _initialize_distributed(config=None) -> None:
    """`jax.distributed.initialize` when the run spans several processes (before any jax work)."""
    mesh_cfg = config.mesh if config is not None else {}
    sharding.maybe_initialize_distributed(
        mesh_cfg.get("distributed", "auto"), init_timeout_s=mesh_cfg.get("init_timeout_s", 300),
        heartbeat_timeout_s=mesh_cfg.get("heartbeat_timeout_s", 100))


def _heldout_metrics_sharded(config, workdir, step, max_batches, progress, diffs
                             ) -> dict[str, Any]:
    """`heldout_metrics` across processes: the models sharded over the config's mesh, each process
    feeding its shards of the split (`tad_jax.train.heldout_sums`)."""
    from tad_jax.run_setup import eval_chunk_size, mesh_context
    from tad_jax.step import make_eval_step
    from tad_jax.train import build_teacher, heldout_sums, shared_vocab_size

    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_divisible(config.eval.batch_size, mesh, "eval.batch_size")
    with mesh_context(mesh):
        teacher_model, teacher_params = build_teacher(config, mesh)
        student_model, student_params, _ = _restore_student(config, workdir, step, diffs, mesh)
        vocab = shared_vocab_size(config, teacher_model.config, student_model.config)
        shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
        batch_sh = sharding.batch_sharding(mesh)
        eval_fn = jax.jit(make_eval_step(student_model, teacher_model, vocab,
                                         chunk_size=eval_chunk_size(config)),
                          in_shardings=(shardings(student_params), shardings(teacher_params),
                                        batch_sh),
                          out_shardings=sharding.replicated(mesh))
        if max_batches is None:
            max_batches = config.eval.max_batches
        sums = heldout_sums(eval_fn, student_params, teacher_params, config.data,
                            batch_size=config.eval.batch_size, max_batches=max_batches,
                            batch_sharding=batch_sh, progress=progress)
    return metrics.finalize(sums)


def draw_plots(workdir, result: dict[str, Any], config) -> list[str]:
    """Fig. 2 from `result`, and Fig. 1 from metrics.jsonl when the run logged eval_kl."""
    out = pathlib.Path(workdir) / PLOTS_DIR
    teacher = pathlib.Path(config.teacher.path).name if config.teacher.path else "teacher"
    paths = [plots.plot_tail_and_mismatch({teacher: result}, out / "tail_mass_mismatch.png")]
    tokens_per_step = config.data.global_batch_size * config.data.seq_len
    try:
        paths.append(plots.plot_heldout_kl({pathlib.Path(workdir).name: workdir},
                                           out / "heldout_kl.png",
                                           tokens_per_step=tokens_per_step))
    except (FileNotFoundError, ValueError) as e:
        print(f"note: no held-out KL curve ({e})")
    return [str(p) for p in paths]


def export_hf(workdir: str | os.PathLike, out: str | os.PathLike, *, step: int | None = None,
              overwrite: bool = False, config: ml_collections.ConfigDict | None = None
              ) -> pathlib.Path:
    """Writes the student of `workdir` as an HF folder: weights, config.json, tokenizer.

    The folder is built in a temporary sibling and renamed into place, so a failed export never
    leaves a half folder (nor destroys the one being overwritten before the new one is complete).

    Args:
      workdir: the run folder.
      out: the folder to create.
      step: checkpoint step (None = the newest).
      overwrite: replace `out` when it exists and is not empty.
      config: the run config (default: the one saved with the checkpoint).

    Returns:
      `out`.

    Raises:
      FileExistsError: `out` exists and is not empty, and `overwrite` is False; or `out` is a
        file, or a non-empty folder that is not an HF folder (no config.json), which even
        `overwrite` does not replace.
      ValueError: `out` is `workdir`, or holds it or the current directory (replacing it would
        delete them).
      FileNotFoundError: no checkpoint in `workdir`.
    """
    from transformers import AutoTokenizer

    from tad_jax.models import save_pretrained
    from tad_jax.run_setup import resolved_config
    from tad_jax.train import restore_student

    _initialize_distributed(config)
    out = _export_target(workdir, out, overwrite)
    step = require_checkpoint(workdir, step)
    config = resolved_config(config if config is not None else load_run_config(workdir, step))
    _refuse_run_inputs(out, config)
    logger.info("Exporting the student of step %d to %s", step, out)
    if jax.process_count() == 1:
        model, params, step = restore_student(config, str(workdir), step)
    else:  # each process restores its shards; all gather the whole student; process 0 writes
        from jax.experimental import multihost_utils

        with sharding.peer_failures("export"):
            model, params, step = restore_student(config, str(workdir), step,
                                                  sharding.make_mesh(config.mesh))
            params = multihost_utils.process_allgather(params, tiled=True)
        if jax.process_index() != 0:
            return out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save_pretrained(model, jax.device_get(params), staging)
        AutoTokenizer.from_pretrained(config.data.tokenizer).save_pretrained(staging)
        _replace(out, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _replace(out: pathlib.Path, new: pathlib.Path) -> None:
    """Renames `new` to `out`; an existing `out` is set aside first and deleted only once `new`
    is in place (put back if that rename fails)."""
    if not out.exists():
        os.rename(new, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.rename(out, old)
    try:
        os.rename(new, out)
    except OSError:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _refuse_run_inputs(out: pathlib.Path, config) -> None:
    """Raises ValueError when `out` is a folder the run reads (its teacher, its pretrained
    student, its tokenizer): HF folders that --overwrite would otherwise replace."""
    for field in ("teacher.path", "student.path", "data.tokenizer"):
        group, name = field.split(".")
        path = config[group].get(name)
        if path and pathlib.Path(path).resolve() == out:
            raise ValueError(f"--out {out} is the run's {field}: export to a new folder, e.g. "
                             "--out WORKDIR/hf.")


def _export_target(workdir, out, overwrite: bool) -> pathlib.Path:
    """`out` made absolute (".", "..", symlinks resolved), checked before anything is read.

    `overwrite` replaces an HF folder (one with a config.json) and nothing else: a mistyped
    --out must not delete a run, its parent, or the folder the user stands in.
    """
    out = pathlib.Path(out).resolve()
    for name, keep in (("the run folder --workdir", pathlib.Path(workdir).resolve()),
                       ("the current directory", pathlib.Path.cwd().resolve())):
        if keep == out or out in keep.parents:
            raise ValueError(f"--out {out} is or holds {name} ({keep}): export to a new folder, "
                             "e.g. --out WORKDIR/hf.")
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return out
    if not out.is_dir() or not (out / "config.json").is_file():
        raise FileExistsError(f"{out} exists and is not an HF folder (no config.json), so even "
                              "--overwrite leaves it alone: choose another --out, or remove it "
                              "yourself.")
    if not overwrite:
        raise FileExistsError(f"{out} exists and is not empty: choose another --out, or pass "
                              "--overwrite to replace it.")
    return out
