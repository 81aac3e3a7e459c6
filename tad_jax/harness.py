"""The paper's evaluation: EleutherAI's lm-evaluation-harness on HF folders (student, teacher).

Each model is an HF folder (`evaluate.export_hf` writes the student's), loaded into a transformers
model in memory and handed to the harness as ``HFLM(pretrained=model, tokenizer=tok)``: no Hub
access, so it runs offline with local tasks. Two local tasks ship in ``harness_tasks/``:

  tad_mc        40 multiple-choice cloze items of our own (accuracy, length-normalised accuracy)
  tad_text_ppl  perplexity on eight paragraphs of our own (word / byte perplexity, bits per byte)

The paper's suite for the pretraining setups (MiniPLM's tasks; the harness's names) needs the
datasets in the HF datasets cache (`HF_DATASETS_OFFLINE=1` then reads them from there):
``PAPER_TASKS``. The paper says few-shot but gives no shot count: pass one (`num_fewshot`), or
each task runs with its own default (zero-shot for most). The math setups (Sec. 3.3-3.4) were
scored with the separate math-evaluation-harness (ZubinGou), which is not wrapped here.

Needs the ``lm_eval`` extra: ``pip install -e '.[lm_eval]'``.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

TASKS_DIR = pathlib.Path(__file__).parent / "harness_tasks"
LOCAL_TASKS = ("tad_mc", "tad_text_ppl")
# MiniPLM's few-shot suite, which the paper follows (its Table 1 names ARC-E/C, OBQA, Story).
# storycloze needs its data downloaded by hand (see the harness's task README).
PAPER_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "lambada_openai", "openbookqa", "piqa",
               "siqa", "winogrande", "storycloze_2016")
RESULTS_FILE = "lm_eval.json"

logger = logging.getLogger(__name__)


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise ImportError("lm-evaluation-harness is not installed: pip install -e '.[lm_eval]' "
                          "(or `pip install lm_eval[hf]`).") from e


def local_task_config(name: str) -> dict[str, Any]:
    """The YAML config of a local task, its ``data_files`` made absolute (the harness reads them
    relative to the working directory).

    Raises:
        ValueError: ``name`` is not a local task.
    """
    import yaml  # a dependency of lm_eval

    path = TASKS_DIR / f"{name}.yaml"
    if not path.exists():
        raise ValueError(f"no local task {name!r}; the local tasks are {LOCAL_TASKS}.")
    config = yaml.safe_load(path.read_text())
    files = config["dataset_kwargs"]["data_files"]
    config["dataset_kwargs"]["data_files"] = {k: str(TASKS_DIR / v) for k, v in files.items()}
    return config


def load_hf_model(folder: str | pathlib.Path):
    """(transformers model in float32 on CPU, in eval mode, its tokenizer) of an HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = pathlib.Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} holds no config.json: give an HF model folder (e.g. "
                                "one written by scripts/export_hf.py).")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def run(folder: str | pathlib.Path, tasks: list[str], *, num_fewshot: int | None = None,
        limit: int | float | None = None, batch_size: int = 8) -> dict[str, dict[str, float]]:
    """Runs the harness on the model of an HF folder.

    Args:
        folder: an HF folder (config.json, safetensors, tokenizer files).
        tasks: local task names (``LOCAL_TASKS``) and / or the harness's own task names.
        num_fewshot: few-shot examples per prompt (None: each task's default, 0 for ours).
        limit: at most this many documents per task (a float < 1: that fraction); None: all.
        batch_size: requests per forward pass.

    Returns:
        ``{task: {metric: value}}`` (metrics as the harness names them, e.g. ``acc``,
        ``acc_stderr``, ``word_perplexity``; its ``,none`` filter suffix dropped).

    Raises:
        ImportError: lm_eval is not installed.
        FileNotFoundError: ``folder`` is not an HF folder.
        ValueError: an unknown local task.
    """
    _require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logger.info("lm-evaluation-harness on %s: %s", folder, ", ".join(tasks))
    model, tok = load_hf_model(folder)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device="cpu")
    specs = [local_task_config(t) if t in LOCAL_TASKS else t for t in tasks]
    # Indexing the harness's ~14k task YAMLs takes ~30 s on a small CPU: only when one is named.
    only_local = all(t in LOCAL_TASKS for t in tasks)
    out = simple_evaluate(model=lm, tasks=specs, num_fewshot=num_fewshot, limit=limit,
                          task_manager=TaskManager(include_defaults=not only_local),
                          log_samples=False, bootstrap_iters=0)
    return {task: _metrics(values) for task, values in out["results"].items()}


def _metrics(values: dict) -> dict[str, float]:
    """The harness's ``{"acc,none": x, "alias": ...}`` → ``{"acc": x}`` (numbers only)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            name, _, filt = key.partition(",")
            out[name if filt in ("", "none") else key] = float(value)
    return out


def compare(student: str | pathlib.Path, teacher: str | pathlib.Path | None, tasks: list[str],
            out_dir: str | pathlib.Path | None = None, **kwargs) -> dict[str, Any]:
    """Runs ``run`` on the student (and the teacher) and writes ``out_dir/lm_eval.json``.

    Returns:
        ``{"tasks", "lm_eval_version", "student": {task: {metric: value}}, "teacher": ...}``
        (``teacher`` is None without a teacher).
    """
    import lm_eval

    result = {"tasks": list(tasks), "lm_eval_version": lm_eval.__version__, **kwargs,
              "student": run(student, tasks, **kwargs),
              "teacher": run(teacher, tasks, **kwargs) if teacher else None}
    if out_dir is not None:
        path = pathlib.Path(out_dir) / RESULTS_FILE
        path.write_text(json.dumps(result, indent=2) + "\n")
    return result


# The metrics of the summary table: the harness's headline ones.
_SUMMARY_METRICS = ("acc", "acc_norm", "word_perplexity", "bits_per_byte")


def summary_table(result: dict[str, Any]) -> str:
    """A plain-text table of ``compare``'s result: task, metric, student, teacher."""
    rows = [("task", "metric", "student", "teacher")]
    teacher = result.get("teacher") or {}
    for task, metrics in result["student"].items():
        for m in _SUMMARY_METRICS:
            if m in metrics:
                t = teacher.get(task, {}).get(m)
                rows.append((task, m, f"{metrics[m]:.4f}", "-" if t is None else f"{t:.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def expand_tasks(spec: str | list[str]) -> list[str]:
    """Task names from a comma-separated list; "local" and "paper" stand for those suites."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for name in (n.strip() for n in names):
        out += list({"local": LOCAL_TASKS, "paper": PAPER_TASKS}.get(name, [name] if name else []))
    return list(dict.fromkeys(out))


def evaluate_run(config, workdir: str | pathlib.Path, tasks: list[str], *,
                 student_dir: str | pathlib.Path | None = None, teacher: bool = True,
                 step: int | None = None, **kwargs) -> dict[str, Any]:
    """`compare` for a run folder: its student (exported) and its config's teacher.

    Args:
        config: the run config (its ``teacher.path`` is the teacher's HF folder).
        workdir: the run folder; ``lm_eval.json`` is written there, beside eval.json.
        tasks: task names (see ``run``).
        student_dir: the student's HF folder (e.g. WORKDIR/hf from scripts/export_hf.py); None:
            the checkpoint ``step`` is exported to a temporary folder first.
        teacher: also evaluate the teacher.
        **kwargs: ``num_fewshot``, ``limit``, ``batch_size`` of ``run``.
    """
    import tempfile

    from tad_jax import evaluate

    _require_lm_eval()
    teacher_dir = config.teacher.path if teacher else None
    if teacher and not teacher_dir:
        raise ValueError("the config has no teacher.path (a HF folder) to evaluate; pass "
                         "--nolm_eval_teacher to evaluate the student only.")
    if student_dir is not None:
        return compare(student_dir, teacher_dir, tasks, out_dir=workdir, **kwargs)
    with tempfile.TemporaryDirectory(prefix="tad_jax_student_") as tmp:
        folder = evaluate.export_hf(workdir, pathlib.Path(tmp) / "hf", step=step)
        return compare(folder, teacher_dir, tasks, out_dir=workdir, **kwargs)
