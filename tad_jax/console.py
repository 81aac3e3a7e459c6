"""What the scripts print: setup steps, progress bars, evaluation summaries, warnings and errors.

Libraries log a lot at INFO (orbax alone writes ~150 lines in a short demo). By default the
scripts show INFO only from tad_jax's own loggers (the setup steps and evaluation summaries, as
plain lines that do not break a progress bar) and WARNING and above from everything else. absl's
``--verbosity`` (e.g. ``--verbosity=0`` for INFO, ``1`` for DEBUG) brings every library's logs
back in absl's format, as absl apps normally log.
"""

from __future__ import annotations

import logging
import os
import sys

_OWN = "tad_jax"
# Warnings that say nothing to a user of the scripts: lm_eval's notes that it was handed a model
# object rather than a name, which tad_jax.harness does on purpose.
_NOISY_WARNINGS = ("lm_eval.models.huggingface",)


class _BarSafeHandler(logging.Handler):
    """Writes plain messages through tqdm, so a progress bar on screen is redrawn below them."""

    def emit(self, record):
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 (logging must never raise)
            self.handleError(record)


def setup(verbose: bool | None = None) -> bool:
    """Configures logging for a script; call it at the top of ``main`` (after absl parsed flags).

    Args:
      verbose: show every library's logs; None: whether ``--verbosity`` was given.

    Returns:
      Whether the library logs are shown.
    """
    if verbose is None:
        verbose = _verbosity_given()
    own = logging.getLogger(_OWN)
    own.setLevel(logging.INFO)
    for h in list(own.handlers):
        if isinstance(h, _BarSafeHandler):
            own.removeHandler(h)
    if verbose:
        own.propagate = True
        return True
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # the root logger: libraries
    logging.getLogger().setLevel(logging.WARNING)
    handler = _BarSafeHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    own.addHandler(handler)
    own.propagate = False
    for name in _NOISY_WARNINGS:
        logging.getLogger(name).setLevel(logging.ERROR)
    _quiet_hf_progress()
    return False


def _verbosity_given() -> bool:
    from absl import flags

    try:
        return bool(flags.FLAGS["verbosity"].present)
    except (KeyError, flags.UnparsedFlagAccessError):
        return False


def _quiet_hf_progress() -> None:
    """transformers' "Loading weights" / "Writing model shards" bars and datasets' "Generating
    split" bars: internal steps of a setup step, not progress a user waits on."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_warning()
    except ImportError:
        pass
    # datasets reads this when imported (importing it here would cost seconds in every script).
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
