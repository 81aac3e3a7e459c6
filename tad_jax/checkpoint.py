"""Orbax checkpoints of a run: train state, data-iterator position and config, saved together.

Layout: `WORKDIR/checkpoints/<step>/{state,meta}`; `state` is the train-state pytree (sharded
arrays, restored straight into their shardings), `meta` a JSON object
`{"step", "config", "data_state"}`. Saving is asynchronous (the loop goes on while a background
thread writes); the newest `keep` checkpoints are kept.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

from tad_jax.config import config_differences


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` with the run's two items."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        """Opens (or creates) `workdir/checkpoints`.

        Args:
          workdir: the run's folder.
          keep: number of newest checkpoints kept.
          async_save: write in a background thread.
        """
        if "://" in str(workdir):
            # orbax itself writes gs:// (tensorstore; etils needs gcsfs), but the run's
            # metrics.jsonl and data positions go through local file APIs.
            raise ValueError(f"workdir {workdir}: URLs are not supported; use a filesystem "
                             "path every host sees (NFS, Filestore, or a bucket mounted with "
                             "gcsfuse).")
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every saved step, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Starts saving `state` and `meta` at `step` (returns before the write ends if async)."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restores (state, meta) of `step` into the shardings of `abstract_state`."""
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return out.state, out.meta

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON meta item of `step` (config, data-iterator state) without the arrays."""
        args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        return self._manager.restore(step, args=args).meta

    def wait(self) -> None:
        """Blocks until every pending asynchronous save has been written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


def check_same_config(saved: dict[str, Any], current: dict[str, Any], *, workdir: str,
                      allow_change: bool) -> list[str]:
    """Refuses to resume a checkpoint written under another config.

    Args:
      saved: the config stored with the checkpoint (plain dict).
      current: the config of this run (plain dict).
      workdir: the run folder (for the message).
      allow_change: resume anyway (returns the differing fields for a warning).

    Returns:
      The dotted names of the differing fields (empty when they agree).

    Raises:
      ValueError: the configs differ and `allow_change` is False.
    """
    diffs = config_differences(saved, current)
    if diffs and not allow_change:
        shown = ", ".join(diffs[:10]) + (" ..." if len(diffs) > 10 else "")
        raise ValueError(
            f"{workdir} holds a checkpoint of a different config (fields differ: {shown}). "
            "Use a new --workdir, or pass --config.ckpt.allow_config_change=True to resume it "
            "with the new config."
        )
    return diffs


# Each process reads its own shard of the data, so each has its own iterator position. Orbax's
# JSON item is written by the primary process only; the positions go to per-process files
# `WORKDIR/data_state/<step>/process_<i>.json` instead (written before the step's checkpoint is
# started, pruned with it).


def _data_state_path(workdir: str, step: int, process: int) -> str:
    return os.path.join(os.path.abspath(workdir), "data_state", str(step),
                        f"process_{process}.json")


def save_data_state(workdir: str, step: int, process: int, state_json: str) -> None:
    """Writes this process's data-iterator position for `step` (atomically)."""
    path = _data_state_path(workdir, step, process)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(state_json)
    os.replace(tmp, path)


def load_data_state(workdir: str, step: int, process: int, fallback: str | None) -> str:
    """This process's saved position at `step`; if its file is absent, process 0 may use
    `fallback` (the meta item's state, which orbax writes from the primary process: it is process
    0's position, so no other process may take it).

    Raises:
      FileNotFoundError: neither a per-process file nor, for process 0, a fallback exists.
    """
    path = _data_state_path(workdir, step, process)
    if os.path.exists(path):
        with open(path) as f:
            return f.read()
    if fallback is None or process != 0:
        raise FileNotFoundError(
            f"No data-iterator state for process {process} at step {step} ({path}); resume with "
            "the same number of processes that wrote the checkpoint.")
    return fallback


def prune_data_states(workdir: str, keep_steps: list[int]) -> None:
    """Removes the data-state folders of steps whose checkpoints are gone."""
    import shutil

    root = os.path.join(os.path.abspath(workdir), "data_state")
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        if name.isdigit() and int(name) not in keep_steps:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
