"""Distillation training: the loop, resumable from its workdir, and restoring its student.

Public API (the pieces live in their own modules; this module re-exports them so that
`tad_jax.train` stays the one entry point of training):
- `train_and_evaluate(config, workdir)`: the loop, resumable from `workdir`
- `restore_student(config, workdir, step=None) -> (student_model, student_params, step)`
- from `tad_jax.builders`: `build_teacher`, `build_student`, `build_models`, `shared_vocab_size`,
  `check_tokenizers`, `teacher_model_config`
- from `tad_jax.step`: `make_optimizer`, `init_state`, `make_train_step`, `make_eval_step`,
  `finalize_eval`, `METRIC_KEYS`, ...
- from `tad_jax.run_setup`: `setup_run`, `Run`; from `tad_jax.dry_run`: `dry_run(config) -> dict`
- from `tad_jax.metrics_log`: `MetricsWriter`, `read_metrics(workdir)`

Workdir layout: `checkpoints/<step>/` (orbax: state + meta JSON with the config),
`data_state/<step>/process_<i>.json`, `metrics.jsonl`, `tb/` (TensorBoard).
"""

from __future__ import annotations

import logging
import os
import signal
import time

import jax
import ml_collections
import numpy as np

from tad_jax import sharding
from tad_jax.builders import (
    abstract_student,
    abstract_teacher,
    build_models,
    build_student,
    build_teacher,
    check_tokenizers,
    shared_vocab_size,
    teacher_model_config,
)
from tad_jax.checkpoint import Checkpointer, prune_data_states, save_data_state
from tad_jax.config import config_to_dict, num_steps
from tad_jax.dry_run import dry_run
from tad_jax.metrics import add_sums
from tad_jax.metrics_log import MetricsWriter, read_metrics
from tad_jax.run_setup import Run, setup_run
from tad_jax.run_setup import mesh_context as _mesh_context
from tad_jax.run_setup import resolved_config as _resolved
from tad_jax.step import (
    METRIC_KEYS,
    finalize_eval,
    init_state,
    make_eval_step,
    make_optimizer,
    make_train_step,
    merge_trainable,
    split_trainable,
    state_shardings,
)

__all__ = [
    "METRIC_KEYS", "Checkpointer", "MetricsWriter", "Run", "build_models", "build_student",
    "build_teacher", "check_tokenizers", "dry_run", "finalize_eval", "heldout_sums", "init_state",
    "make_eval_step", "make_optimizer", "make_train_step", "merge_trainable", "read_metrics",
    "restore_student", "setup_run", "shared_vocab_size", "split_trainable", "state_shardings",
    "teacher_model_config", "train_and_evaluate",
]


logger = logging.getLogger(__name__)


class _Stop:
    """Set by SIGTERM: the loop saves a checkpoint at the end of the current step and returns."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        self.requested = True


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (or resumes) the run of `config` in `workdir`.

    Rerunning the same command with the same `workdir` resumes from the newest checkpoint: state,
    data position and metrics.jsonl continue exactly where the checkpoint was taken.

    Args:
      config: the run config (`configs/*.py`).
      workdir: folder of checkpoints, metrics.jsonl and TensorBoard files.

    Returns:
      The last logged record (training metrics, plus eval metrics when the last step evaluated).

    Raises:
      FloatingPointError: a non-finite loss or gradient norm (the message names the step; the
        checkpoints written before it are kept).
      sharding.PeerFailure: another process of a multi-process run died.
      ValueError / FileNotFoundError: bad config or paths (see `setup_run`).
    """
    os.makedirs(workdir, exist_ok=True)
    run = setup_run(config, workdir)
    writer = MetricsWriter(workdir, resume_step=run.start_step,
                           tensorboard=run.config.log.tensorboard)
    stop = _Stop()
    previous = signal.signal(signal.SIGTERM, stop) if _main_thread() else None
    try:
        with _mesh_context(run.mesh), sharding.peer_failures("training"):
            return _loop(run, writer, stop)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        run.ckpt.close()
        writer.close()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _loop(run: Run, writer: MetricsWriter, stop: _Stop) -> dict[str, float]:
    from tqdm.auto import tqdm

    from tad_jax.data import to_global_batch

    cfg, teacher_params = run.config, run.models[1]
    bar = tqdm(total=run.total_steps, initial=run.start_step, disable=not cfg.log.progress,
               desc="distilling", unit="step", dynamic_ncols=True)
    clock = _Throughput(cfg.data.global_batch_size * cfg.data.seq_len)
    pending, last, saved, evaluated = None, {}, run.start_step, run.start_step
    stop_at = run.total_steps
    if cfg.max_steps_per_run > 0:
        stop_at = min(stop_at, run.start_step + cfg.max_steps_per_run)
    for step in range(run.start_step + 1, stop_at + 1):
        local = next(run.data_iter, None)
        ended = local is None
        if cfg.data.num_epochs is not None:  # the hosts' shards may end at different steps
            ended = sharding.any_process(ended)
        if ended:  # a finite pipeline (data.num_epochs) ran out before `steps`
            if pending is not None:  # the run's last step: evaluated, as a last step always is
                extra = _evaluate_keeping_steps(run, writer, clock, bar, *pending, saved)
                last = _finish_step(run, writer, clock, bar, *pending, extra, force=True) or last
            elif step - 1 > evaluated:  # it was saved (and logged) but not evaluated
                extra = _evaluate(run)
                writer.write(step - 1, extra)
                last = {**last, **extra}
            if step - 1 > saved:  # the last step may have been evaluated but not saved
                _save(run, step - 1)
            bar.write(f"The training data ran out after step {step - 1}; stopping there.")
            break
        batch = to_global_batch(local, run.batch_sh)
        run.state, metrics = run.step_fn(run.state, batch, teacher_params)
        if pending is not None:  # the previous step's metrics: one step late, dispatch stays async
            last = _finish_step(run, writer, clock, bar, *pending) or last
        pending = (step, metrics)
        boundary = step == stop_at or stop.requested
        do_eval = step % cfg.eval.every_steps == 0 or step == run.total_steps
        do_save = step % cfg.ckpt.every_steps == 0 or boundary
        if do_eval or do_save:
            extra = (_evaluate_keeping_steps(run, writer, clock, bar, step, metrics, saved)
                     if do_eval else {})
            evaluated = step if do_eval else evaluated
            if extra:
                logger.info("step %d: held-out KL %.4f, student CE %.4f, top-1 agreement %.3f, "
                            "Full-ECE %.4f", step, extra["eval_kl"], extra["eval_ce"],
                            extra["eval_top1_agreement"], extra["eval_full_ece"])
            last = _finish_step(run, writer, clock, bar, step, metrics, extra,
                                force=do_eval) or last
            pending = None
            if do_save:
                _save(run, step)
                saved = step
        if stop.requested:
            bar.write(f"SIGTERM: saved a checkpoint at step {step}; rerun the command to resume.")
            break
    bar.close()
    return last


def _evaluate_keeping_steps(run, writer, clock, bar, step, metrics, saved) -> dict[str, float]:
    """`_evaluate`; when it fails (out of memory, a bad held-out file) in a single-process run,
    the steps trained since the last checkpoint are saved before the error goes on. (Across
    processes a failure may be one process's alone, while the others wait in a collective: a
    save would wait for them too.)"""
    try:
        return _evaluate(run)
    except Exception:
        if step > saved and jax.process_count() == 1:
            _save_before_error(run, writer, clock, bar, step, metrics)
        raise


def _save_before_error(run, writer, clock, bar, step, metrics) -> None:
    """The step's record and checkpoint, written when its evaluation fails, so that rerunning
    resumes there; a failure here is logged, and the evaluation's error goes on."""
    try:
        _finish_step(run, writer, clock, bar, step, metrics, force=True)
        _save(run, step)
        run.ckpt.wait()  # an asynchronous save's error surfaces here, not in place of the eval's
        bar.write(f"The evaluation at step {step} failed; saved a checkpoint of step {step} "
                  "first (fix the cause, then rerun the command to resume).")
    except Exception:  # the evaluation's error is the one to report
        logger.exception("Could not save step %d after its evaluation failed", step)


def _finish_step(run, writer, clock, bar, step, metrics, extra=None, force=False):
    """Fetches a step's metrics, stops on non-finite values, logs every `log.every_steps`."""
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
        run.ckpt.wait()
        raise FloatingPointError(
            f"Non-finite loss at step {step} (loss={m['loss']}, grad_norm={m['grad_norm']}). "
            f"Stopped; the last good checkpoint (step {run.ckpt.latest_step()}) is kept in "
            f"{run.ckpt.directory}. Lower opt.lr or check the data.")
    clock.tick()
    bar.update(1)
    bar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)
    if not (force or step % run.config.log.every_steps == 0 or step == run.total_steps):
        return None
    record = {**m, "tokens_per_s": clock.rate(), **(extra or {})}
    writer.write(step, record)
    return record


class _Throughput:
    """Tokens per second between two logged steps."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self._t0, self._steps = time.perf_counter(), 0

    def tick(self) -> None:
        self._steps += 1

    def rate(self) -> float:
        now = time.perf_counter()
        r = self._steps * self.tokens_per_step / max(now - self._t0, 1e-9)
        self._t0, self._steps = now, 0
        return r


def _save(run: Run, step: int) -> None:
    """Checkpoints state + config (orbax) and every process's data position (its own file)."""
    from tad_jax.data import iterator_state_to_json

    data_state = iterator_state_to_json(run.data_iter)
    save_data_state(run.workdir, step, jax.process_index(), data_state)
    meta = {"step": step, "config": config_to_dict(run.config), "data_state": data_state}
    run.ckpt.save(step, run.state, meta)
    if jax.process_index() == 0:
        prune_data_states(run.workdir, run.ckpt.all_steps() + [step])


def _evaluate(run: Run) -> dict[str, float]:
    """Held-out metrics of the current student (each batch's sums added on the host)."""
    cfg = run.config
    total = heldout_sums(run.eval_fn, run.state["params"], run.models[1], cfg.data,
                         batch_size=cfg.eval.batch_size, max_batches=cfg.eval.max_batches,
                         batch_sharding=run.batch_sh)
    return finalize_eval(total)


def heldout_sums(eval_fn, student_params, teacher_params, data_cfg, *, batch_size: int,
                 max_batches: int, batch_sharding, progress: bool = False) -> dict:
    """Streams the held-out split through `eval_fn`; every process calls it together.

    Each process reads its own shards of the split. With `max_batches=0` (the whole split) they
    may hold different numbers of batches, so before each batch the processes agree whether any
    has one left (`sharding.any_process`); a process whose shards have ended feeds fully masked
    rows, which add nothing to the sums. The figures equal a single process's over the same
    `data.num_shards`, up to float32 summation order within a batch.

    Args:
      eval_fn: `(student_params, teacher_params, global_batch) -> sums` (jitted, sharded).
      student_params, teacher_params: the models' params.
      data_cfg: the run config's `data` section.
      batch_size: rows per global evaluation batch (`eval.batch_size`).
      max_batches: batches per process (0 = the whole split).
      batch_sharding: the sharding of a global batch.
      progress: print one line per batch (process 0).

    Returns:
      The summed metrics on the host, float64 (see `tad_jax.metrics.add_sums`).

    Raises:
      ValueError: the held-out split is empty.
    """
    from tad_jax.data import make_eval_iterator, masked_like, to_global_batch

    n_proc = jax.process_count()
    it = make_eval_iterator(data_cfg, batch_size=batch_size // n_proc,
                            max_batches=max_batches or None,
                            process_index=jax.process_index(), process_count=n_proc)
    total, template, start = None, None, time.perf_counter()
    while True:
        local = next(it, None)
        if not sharding.any_process(local is not None):
            break
        if local is None:
            if template is None:  # the split is too small to give this process a batch
                raise ValueError(f"Process {jax.process_index()} has no held-out batch; raise "
                                 "data.val_fraction or use fewer processes.")
            local = template
        template = masked_like(local)
        sums = eval_fn(student_params, teacher_params, to_global_batch(local, batch_sharding))
        # Added on the host in float64, as `evaluate.heldout_metrics` does: float32 on device
        # stops counting tokens exactly past 2^24.
        total = add_sums(total, jax.device_get(sums))
        if progress and jax.process_index() == 0:
            print(f"eval batch: {time.perf_counter() - start:.1f} s", flush=True)
    if total is None:
        raise ValueError(
            "The held-out split is empty: set data.val_files or raise data.val_fraction.")
    return total


# ---------------------------------------------------------------------------------------------
# Restoring a trained student (for evaluation and export)


def restore_student(config, workdir: str, step: int | None = None, mesh=None):
    """The student of a run's checkpoint, without loading the teacher's weights.

    Args:
      config: the run's config (the one it was trained with).
      workdir: the run folder.
      step: the checkpoint step; None = the newest.
      mesh: restore straight into the training shardings over this mesh (required when the
        run spans several processes); None = the default device.

    Returns:
      (student_model, student_params, step): params are plain arrays on the default device, or
      sharded over `mesh`.

    Raises:
      FileNotFoundError: no checkpoint in `workdir`.
    """
    config = _resolved(config)
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(
            f"No checkpoint in {workdir}/checkpoints: train first (scripts/train.py).")
    ckpt = Checkpointer(workdir, keep=config.ckpt.keep, async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(
            f"No checkpoint in {ckpt.directory}: train first (scripts/train.py).")
    teacher_model, teacher_abs, _ = abstract_teacher(config, mesh)
    student_model, params_abs, mask = abstract_student(config, teacher_model, teacher_abs, mesh)
    tx, _ = make_optimizer(config, num_steps(config))
    abstract = jax.eval_shape(lambda p: init_state(p, mask, tx), params_abs)
    if mesh is not None:
        shardings = state_shardings(abstract, jax.tree.map(lambda x: x.sharding, params_abs), mesh)
    else:  # explicit: the checkpoint's own shardings may name devices of other processes
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: one, abstract)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    state, _ = ckpt.restore(step, abstract)
    ckpt.close()
    return student_model, state["params"], step
