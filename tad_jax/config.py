"""The run configuration: shared defaults for `configs/*.py` and their validation.

A run config is an `ml_collections.ConfigDict` with the groups `teacher`, `student`, `loss`, `opt`,
`data`, `ckpt`, `mesh`, `eval`, `log`, `dry_run` and the top-level `seed`, `steps`, `train_tokens`.
`base_config()` gives every field with its default and a comment; each `configs/NAME.py` starts
from it and changes what its paper setup needs. `validate_config()` checks what can be checked
before any device work and raises a ValueError / FileNotFoundError that names the fix.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import ml_collections

DIVERGENCES = ("tad", "kl", "rkl", "jsd")
DTYPES = ("float32", "bfloat16", "float16")

# Fields that may differ between the run that wrote a checkpoint and the run that resumes it:
# they change how the run is watched or stored, never what is computed (micro-batching included:
# the step divides the summed losses once by the whole batch's tokens).
RESUMABLE_FIELDS = (
    "max_steps_per_run", "ckpt.every_steps", "ckpt.keep", "ckpt.async_save",
    "ckpt.allow_config_change", "log", "eval.every_steps", "eval.max_batches", "dry_run",
    "teacher.path", "student.path", "data.train_files", "data.val_files", "data.tokenizer",
    "mesh", "opt.grad_accum_steps", "data.num_workers", "data.read_threads",
    "data.worker_buffer_size",
    # How attention is computed, not what: the same numbers, so a run resumes across backends.
    "teacher.attention", "student.attention",
    # How the same layers are compiled: the teacher's loop (its params are not checkpointed) and
    # what the student's remat keeps.
    "teacher.scan_layers", "student.remat_policy",
)


def base_config() -> ml_collections.ConfigDict:
    """Every run-config field with its default; `configs/*.py` start from this."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # PRNG seed of the student init and of the data order.
    c.steps = 1000  # optimizer steps to run (ignored when train_tokens > 0).
    # > 0: this invocation stops (with a checkpoint) after this many steps; rerun to go on
    # (time-limited jobs, tests). 0 = run to the end.
    c.max_steps_per_run = 0
    c.train_tokens = 0  # if > 0: steps = ceil(train_tokens / (global_batch_size * seq_len)).
    c.teacher = _teacher_defaults()  # the model distilled from.
    c.student = _student_defaults()  # the model trained.
    c.loss = _loss_defaults()  # Eq. 4: CLM + divergence (+ cosine).
    c.opt = _opt_defaults()  # AdamW, schedule, clipping, accumulation.
    c.data = data_defaults()  # tad_jax.data's pipeline fields.
    c.ckpt = _ckpt_defaults()  # orbax checkpoints in WORKDIR/checkpoints.
    c.mesh = _mesh_defaults()  # device mesh (data, fsdp, tensor).
    c.eval = _eval_defaults()  # held-out evaluation during training.
    c.log = _log_defaults()  # metrics.jsonl, TensorBoard, progress bar.
    c.dry_run = _dry_run_defaults()  # --dry_run settings.
    return c


def _teacher_defaults() -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    t.path = ""  # HF model folder (config.json + safetensors) loaded with models.from_pretrained.
    t.preset = ""  # else: a name in tad_jax.models.PRESETS (its architecture; random weights).
    # else: ModelConfig fields of a custom random teacher (tiny test configs); {} = unused.
    t.model = ml_collections.ConfigDict({}, type_safe=False)
    t.random_init = False  # without teacher.path: a random teacher (dry runs always; tests).
    t.dtype = "float32"  # parameter and compute dtype of the teacher ("bfloat16" halves memory).
    t.remat = False  # rematerialise teacher layers (no backward pass, so rarely useful).
    # scan one layer over a stacked axis: a deep teacher compiles in a fraction of the time
    # (loading stacks the checkpoint's layers on the host first).
    t.scan_layers = False
    t.attention = "auto"  # "auto" (TPU: splash, GPU: cudnn), "xla", "chunked", "splash", "cudnn".
    return t


def _student_defaults() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.path = ""  # HF folder of a pretrained student (continued pretraining); "" = init_student.
    s.preset = ""  # PRESETS name of that pretrained student's architecture (dry runs without path).
    # ModelConfig fields changed from the teacher's by init_student (e.g. num_layers).
    s.overrides = ml_collections.ConfigDict({}, type_safe=False)
    s.dtype = "float32"  # compute dtype of the student forward pass.
    s.param_dtype = "float32"  # dtype of the trained parameters and of Adam's moments.
    s.remat = True  # rematerialise student layers in the backward pass (activation memory).
    # What a rematerialised layer keeps (ModelConfig.remat_policy): "nothing_saveable" (least
    # memory, the forward rerun in the backward), "dots_with_no_batch_dims_saveable" (keeps the
    # projections' outputs: fewer FLOPs, more memory), "dots_saveable" (also attention scores).
    s.remat_policy = "nothing_saveable"
    s.scan_layers = False  # scan one layer over a stacked axis (faster compiles of deep models).
    s.attention = "auto"  # like teacher.attention (ModelConfig.attention), for the student.
    return s


def _loss_defaults() -> ml_collections.ConfigDict:
    lo = ml_collections.ConfigDict()
    lo.divergence = "tad"  # "tad" (the paper), "kl" (vanilla KD), "rkl" or "jsd".
    lo.top_k = 10  # K: teacher top-K tokens kept apart by TAD.
    lo.beta = 2.0  # beta of Eq. 3 (divided by the row's mean teacher tail mass).
    lo.temperature = 1.0  # tau; the divergence is multiplied by tau^2.
    lo.eps_alpha = 1e-6  # floor of the sequence's mean tail mass in beta(X).
    # The sequence X of Eq. 3: "row" (a packed row, pretraining) or "segment" (one document of a
    # packed row, from segment_ids: supervised distillation of packed examples).
    lo.beta_scope = "row"
    lo.jsd_weight = 0.5  # mixture weight of the JSD divergence.
    lo.cosine_weight = 0.0  # lambda of the cosine loss on final hidden states (Sec. 3.2.2).
    lo.vocab_size = 0  # slice both vocabularies to this many entries; 0 = min of the two models.
    # fused output-head + loss in token chunks (tad_jax.fused), no [B,T,V] logits; only "tad" and
    # "kl" have a fused kernel: "rkl" / "jsd" run unfused whatever this says.
    lo.fused = False
    # Tokens per chunk of the fused loss (memory ~ chunk_size x V floats). With seq_len <=
    # chunk_size each chunk holds whole rows and TAD's beta(X) needs no teacher pre-pass (1.00x
    # fused KL's FLOPs instead of ~1.34x; docs/fused_loss.md).
    lo.chunk_size = 1024
    return lo


def _opt_defaults() -> ml_collections.ConfigDict:
    o = ml_collections.ConfigDict()
    o.lr = 1e-4  # peak learning rate (paper: 1e-4 from scratch, 3e-5 continued, 1e-5 supervised).
    # The paper gives Adam, the learning rate and weight decay 0.1 (App. B); the rest of this
    # group (warmup, cosine decay, AdamW's decoupled decay on matrices, beta2, clipping) is ours.
    o.warmup_steps = 100  # linear warmup from 0 to lr.
    # the cosine decay reaches lr * min_lr_ratio at step `steps` (the last update takes the
    # schedule's value one step earlier, as optax counts updates from 0).
    o.min_lr_ratio = 0.1
    o.weight_decay = 0.1  # decoupled AdamW weight decay (matrices only; not norms or biases).
    o.b1 = 0.9  # Adam beta1.
    o.b2 = 0.95  # Adam beta2 (the paper is silent; 0.95 is the common LM choice).
    o.eps = 1e-8  # Adam epsilon.
    o.clip_norm = 1.0  # global-norm gradient clipping; 0 = off.
    # micro-batches per step (a scan inside the step); 0 = the fewest whose compiled step fits the
    # device's memory (tad_jax.aot.choose_grad_accum).
    o.grad_accum_steps = 1
    return o


def data_defaults() -> ml_collections.ConfigDict:
    """The data section: tad_jax.data's defaults (its module documents the fields)."""
    from tad_jax.data import default_data_config

    return default_data_config()


def _ckpt_defaults() -> ml_collections.ConfigDict:
    k = ml_collections.ConfigDict()
    k.every_steps = 500  # save a checkpoint every this many steps (and at the end, and on SIGTERM).
    k.keep = 3  # keep the newest this many checkpoints.
    k.async_save = True  # write checkpoints in a background thread while training goes on.
    k.allow_config_change = False  # resume a workdir whose checkpoint has another config.
    return k


def _mesh_defaults() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.data = -1  # data-parallel axis; -1 = all devices the other axes leave.
    m.fsdp = 1  # parameter-sharded data-parallel axis.
    m.tensor = 1  # tensor-parallel axis (heads, MLP, vocabulary).
    m.num_devices = 0  # use the first this many devices; 0 = all of them.
    m.distributed = "auto"  # jax.distributed.initialize(): "auto" (when multi-host), "on", "off".
    m.init_timeout_s = 300  # multi-process: seconds to wait for every process to connect.
    m.heartbeat_timeout_s = 100  # multi-process: a silent peer counts as dead after this; all stop.
    return m


def _eval_defaults() -> ml_collections.ConfigDict:
    e = ml_collections.ConfigDict()
    e.every_steps = 500  # evaluate on the held-out split every this many steps (and at the end).
    e.batch_size = 8  # sequences per evaluation batch (divisible by data x fsdp).
    e.max_batches = 16  # evaluation batches per evaluation; 0 = the whole held-out split.
    return e


def _log_defaults() -> ml_collections.ConfigDict:
    g = ml_collections.ConfigDict()
    g.every_steps = 10  # write metrics.jsonl / TensorBoard every this many steps.
    g.tensorboard = True  # also write TensorBoard scalars under WORKDIR/tb.
    g.progress = True  # show a tqdm progress bar.
    return g


def _dry_run_defaults() -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    # > 0: build the teacher with this many layers and shrink the student's in proportion, so a
    # 9B compile fits a CPU test; 0 = the configured sizes.
    d.num_layers = 0
    d.flops_tokens = 1_000_000  # the paper's Table 3 measure: FLOPs to train on this many tokens.
    # Compile for devices that are not attached (tad_jax.targets): a TPU topology ("v5p:2x2x1",
    # "v5e:2x2", "v6e:2x4", "v4:2x2x1") or GPUs ("h100:2", "a100-80g:8", "h200:8"); "" = this host.
    d.topology = ""
    d.memory_margin = 0.1  # the step must leave this fraction of the device's memory free.
    d.memory_gib = 0.0  # > 0: per-device memory in GiB instead of the device's (what-ifs, tests).
    d.auto_accum = True  # also report what opt.grad_accum_steps=0 would choose (a few compiles).
    d.eval_step = True  # also compile the eval step and report its memory.
    return d


# ---------------------------------------------------------------------------------------------
# Validation


def validate_config(config: ml_collections.ConfigDict, *, check_paths: bool = True) -> None:
    """Checks a run config before any device work.

    Args:
      config: the run config.
      check_paths: also check that teacher/student/data paths exist (off for dry runs).

    Raises:
      ValueError: an inconsistent or unknown setting (the message names the field and the fix).
      FileNotFoundError: a configured path does not exist.
    """
    _check_teacher(config.teacher, check_paths)
    if check_paths and config.student.preset and not config.student.path:
        raise FileNotFoundError(
            f"student.path is empty but student.preset={config.student.preset!r} names a "
            "pretrained student: set --config.student.path to its HF folder (the preset only "
            "sizes --dry_run).")
    if check_paths and config.student.path and not os.path.isdir(config.student.path):
        raise FileNotFoundError(
            f"student.path={config.student.path!r} is not a folder; give an HF model folder or "
            "set --config.student.path='' to initialise the student from the teacher."
        )
    for field in ("teacher.dtype", "student.dtype", "student.param_dtype"):
        group, name = field.split(".")
        if config[group][name] not in DTYPES:
            raise ValueError(f"{field}={config[group][name]!r}: use one of {DTYPES}.")
    _check_loss(config.loss)
    _check_opt(config.opt)
    if config.steps < 1 and config.train_tokens < 1:
        raise ValueError("steps and train_tokens are both < 1: set --config.steps=N.")
    for field, ok, what in _RANGES:
        value = config
        for name in field.split("."):
            value = value[name]
        if not ok(value):
            raise ValueError(f"{field}={value!r} must be {what}: set --config.{field}.")


# Numeric fields checked up front (a bad value otherwise trains silently, e.g. a negative warmup,
# or fails later without naming the field): (dotted field, test, what it must be).
_RANGES = (
    ("opt.lr", lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    ("opt.warmup_steps", lambda v: v >= 0, ">= 0"),
    ("opt.min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("opt.weight_decay", lambda v: v >= 0, ">= 0"),
    ("opt.b1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("opt.b2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("opt.eps", lambda v: v > 0, "> 0"),
    ("opt.clip_norm", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("loss.cosine_weight", lambda v: v >= 0, ">= 0"),
    ("loss.jsd_weight", lambda v: 0 < v < 1, "in (0, 1)"),
    ("loss.vocab_size", lambda v: v >= 0, ">= 0 (0 = the smaller model's vocabulary)"),
    ("loss.chunk_size", lambda v: v >= 1, ">= 1"),
    ("max_steps_per_run", lambda v: v >= 0, ">= 0 (0 = no limit)"),
    ("data.global_batch_size", lambda v: v >= 1, ">= 1"),
    ("eval.batch_size", lambda v: v >= 1, ">= 1"),
    ("eval.max_batches", lambda v: v >= 0, ">= 0 (0 = the whole held-out split)"),
    ("ckpt.every_steps", lambda v: v >= 1, ">= 1"),
    ("ckpt.keep", lambda v: v >= 1, ">= 1"),
    ("eval.every_steps", lambda v: v >= 1, ">= 1"),
    ("log.every_steps", lambda v: v >= 1, ">= 1"),
)


def _check_teacher(t: ml_collections.ConfigDict, check_paths: bool) -> None:
    if t.preset and t.model:
        raise ValueError("teacher.preset and teacher.model are both set: keep one of them.")
    if not (t.path or t.preset or t.model):
        raise ValueError("No teacher: set --config.teacher.path=HF_FOLDER (or teacher.preset).")
    if not check_paths:
        return
    if not t.path and not t.random_init:
        raise FileNotFoundError(
            "teacher.path is empty: set --config.teacher.path to the teacher's HF folder "
            "(config.json + *.safetensors); teacher.random_init=True trains against a random "
            "teacher (tests only).")
    if t.path and not os.path.isfile(os.path.join(t.path, "config.json")):
        raise FileNotFoundError(
            f"teacher.path={t.path!r} holds no config.json; point --config.teacher.path at an HF "
            "model folder (config.json + *.safetensors).")


def _check_loss(lo: ml_collections.ConfigDict) -> None:
    if lo.divergence not in DIVERGENCES:
        raise ValueError(f"loss.divergence={lo.divergence!r}: use one of {DIVERGENCES}.")
    try:
        tad_config(lo)
    except ValueError as e:
        raise ValueError(f"loss.{e} (set --config.loss.*)") from e


def tad_config(lo: ml_collections.ConfigDict):
    """The validated `TADConfig` of the run config's `loss` section (ValueError if invalid)."""
    from tad_jax.tad_core import TADConfig

    return TADConfig(top_k=lo.top_k, beta=lo.beta, temperature=lo.temperature,
                     eps_alpha=lo.eps_alpha, beta_scope=lo.get("beta_scope", "row"))


def _check_opt(o: ml_collections.ConfigDict) -> None:
    if o.grad_accum_steps < 0:
        raise ValueError(f"opt.grad_accum_steps={o.grad_accum_steps} must be >= 1, or 0 (the "
                         "fewest micro-batches that fit the device's memory).")


def num_steps(config: ml_collections.ConfigDict) -> int:
    """Optimizer steps of the run: `steps`, or `train_tokens` divided by the tokens of one step."""
    if config.train_tokens > 0:
        per_step = config.data.global_batch_size * config.data.seq_len
        return math.ceil(config.train_tokens / per_step)
    return int(config.steps)


# ---------------------------------------------------------------------------------------------
# Comparing the config of a checkpoint with the current one


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A JSON-safe plain dict of the config (tuples become lists)."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def config_differences(saved: dict[str, Any], current: dict[str, Any],
                       ignore: tuple[str, ...] = RESUMABLE_FIELDS) -> list[str]:
    """Dotted names of the fields that differ, ignoring `ignore` (fields or whole groups)."""
    old, new = _flatten(saved), _flatten(current)
    diffs = []
    for key in sorted(set(old) | set(new)):
        if any(key == f or key.startswith(f + ".") for f in ignore):
            continue
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            diffs.append(key)
    return diffs


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_overrides(config: ml_collections.ConfigDict, argv: list[str], name: str = "config"):
    """Raises a ValueError naming the field when an `--config.a.b=v` override names no field.

    Args:
      config: the config as loaded from its file, before overrides.
      argv: the command line.
      name: the config flag's name.

    Raises:
      ValueError: an override of a field the config does not have (with the valid names).
    """
    prefix = f"--{name}."
    for arg in argv:
        if not arg.startswith(prefix):
            continue
        dotted = arg[len(prefix):].split("=", 1)[0]
        node, parts = config, dotted.split(".")
        for i, part in enumerate(parts):
            fields = list(node.keys()) if isinstance(node, ml_collections.ConfigDict | dict) else []
            if part not in fields:
                where = ".".join(parts[:i]) or "the config"
                raise ValueError(
                    f"Unknown config field {dotted!r} in {arg!r}: {where} has no field {part!r}. "
                    f"Its fields: {sorted(fields)}.")
            node = node[part]
