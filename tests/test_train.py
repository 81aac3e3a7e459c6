"""Tests of tad_jax.train: the step against a hand-written reference, the loop, resume, dry run.

Runs use configs/tiny.py (a random 2-layer Llama teacher, a 1-layer student, a slice of a real
corpus, a locally trained tokenizer): seconds per run on one CPU core.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tad_jax import losses, sharding, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import tiny  # noqa: E402

# Fields that depend on the wall clock, never compared between runs.
TIMING = ("tokens_per_s",)


def tiny_config(**changes):
    """configs/tiny.py on one device, without a progress bar; `changes` use dotted names."""
    cfg = tiny.get_config()
    cfg.log.progress = False
    cfg.mesh.num_devices = 1
    for dotted, value in changes.items():
        *groups, leaf = dotted.split(".")
        node = cfg
        for g in groups:
            node = node[g]
        node[leaf] = value
    return cfg


def _steps(metrics_path):
    with open(metrics_path) as f:
        return [json.loads(line)["step"] for line in f.read().splitlines() if line.strip()]


def _numbers(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def _train_cmd(workdir, *extra):
    """scripts/train.py on configs/tiny.py, one device, no progress bar, in a fresh process."""
    return [sys.executable, os.path.join(ROOT, "scripts", "train.py"),
            "--config", os.path.join(ROOT, "configs", "tiny.py"), "--workdir", workdir,
            "--config.mesh.num_devices=1", "--config.log.progress=False", *extra]


ENV = dict(os.environ, JAX_PLATFORMS="cpu")


@pytest.fixture(scope="module")
def run30(tmp_path_factory):
    """The uninterrupted 30-step reference run, in a fresh process like the resumed run's: XLA's
    CPU kernels can round differently depending on what the process compiled and allocated
    before (1-ulp differences in reductions), so bitwise comparisons need equal histories."""
    workdir = str(tmp_path_factory.mktemp("run30"))
    done = subprocess.run(_train_cmd(workdir), env=ENV, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return workdir, train.read_metrics(workdir)


# ---------------------------------------------------------------------------------------------
# The step against a hand-written reference


def _models_and_batch(cfg):
    mesh = sharding.make_mesh(cfg.mesh)
    cfg = train._resolved(cfg)
    with train._mesh_context(mesh):
        models = train.build_models(cfg, mesh)
    from tad_jax.data import make_train_iterator

    batch = {k: jnp.asarray(v) for k, v in next(make_train_iterator(cfg.data, seed=0)).items()}
    return cfg, models, batch


# Adam's eps well above the smallest gradients keeps g / (|g| + eps) well conditioned, so float32
# summation-order noise in tiny gradients cannot dominate the comparisons of updates.
STEP_CHANGES = {"opt.warmup_steps": 0, "opt.clip_norm": 0.05, "opt.eps": 1e-3}


@pytest.fixture(scope="module")
def one_step():
    """Models, a batch, and one step from fresh params with 1 and with 4 micro-batches."""
    cfg, models, batch = _models_and_batch(tiny_config(**STEP_CHANGES))
    teacher_model, teacher_params, student_model, params, mask, vocab = models
    outs = {}
    for accum in (1, 4):
        cfg.opt.grad_accum_steps = accum
        tx, schedule = train.make_optimizer(cfg, 30)
        step = jax.jit(train.make_train_step(cfg, student_model, teacher_model, mask, tx,
                                             schedule, vocab))
        outs[accum] = step(train.init_state(params, mask, tx), batch, teacher_params)
    cfg.opt.grad_accum_steps = 1
    return cfg, models, batch, outs


def _reference_loss(params, teacher_model, teacher_params, student_model, batch, vocab):
    """The mean Eq. 4 loss of the whole batch, written without the step's machinery."""
    kw = dict(segment_ids=batch["segment_ids"], positions=batch["positions"])
    t = teacher_model.apply({"params": teacher_params}, batch["input_ids"], **kw).logits
    s = student_model.apply({"params": params}, batch["input_ids"], **kw).logits
    total, _ = losses.distillation_loss(s[..., :vocab], t[..., :vocab], batch["targets"],
                                        batch["loss_mask"], divergence="tad", top_k=10, beta=2.0)
    return total


def test_one_step_equals_clipped_adamw_on_the_reference_gradient(one_step):
    cfg, models, batch, outs = one_step
    teacher_model, teacher_params, student_model, params, mask, vocab = models
    o = cfg.opt
    _, schedule = train.make_optimizer(cfg, 30)
    new_state, metrics = outs[1]

    ref = jax.jit(jax.value_and_grad(
        lambda p: _reference_loss(p, teacher_model, teacher_params, student_model, batch, vocab)))
    loss, g = ref(params)
    g = jax.tree.map(lambda x, m: x if m else jnp.zeros_like(x), g, mask)
    norm = float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(g))))
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-5)
    assert norm > o.clip_norm  # the clip is exercised
    lr = float(schedule(0))
    assert lr == pytest.approx(o.lr)

    def adam_first_step(p, gr, m):
        if not m:
            return p  # frozen: untouched
        gr = gr * o.clip_norm / norm
        # First Adam step: m_hat = g, v_hat = g^2.
        upd = gr / (np.abs(gr) + o.eps) + (o.weight_decay * p if p.ndim >= 2 else 0.0)
        return p - lr * upd

    expected = jax.tree.map(adam_first_step, jax.device_get(params), jax.device_get(g), mask)
    got = jax.device_get(new_state["params"])
    for (path, e), a in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(got),
                            strict=True):
        np.testing.assert_allclose(a, e, atol=1e-6, rtol=1e-5, err_msg=str(path))
    assert int(new_state["step"]) == 1


def test_frozen_params_have_no_optimizer_state(one_step):
    cfg, models, _, _ = one_step
    _, _, _, params, mask, _ = models
    assert not all(jax.tree.leaves(mask)), "the tiny student should freeze its embeddings"
    tx, _ = train.make_optimizer(cfg, 30)
    state = train.init_state(params, mask, tx)
    n_train = sum(x.size for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask),
                                         strict=True) if m)
    moments = sum(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0)
    assert moments == 2 * n_train  # Adam's mu and nu, for the trainable params only


def test_gradient_accumulation_equals_the_full_batch(one_step):
    (s1, m1), (s4, m4) = one_step[3][1], one_step[3][4]
    for k in ("loss", "clm_loss", "div_loss", "grad_norm"):
        np.testing.assert_allclose(float(m4[k]), float(m1[k]), rtol=1e-5, err_msg=k)
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s4["params"]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("divergence", ["tad"])
def test_fused_loss_step_equals_the_logits_step(one_step, divergence):
    cfg, models, batch, _ = one_step
    teacher_model, teacher_params, student_model, params, mask, vocab = models
    outs = []
    for fused in (False, True):
        cfg.loss.fused, cfg.loss.cosine_weight, cfg.loss.chunk_size = fused, 0.5, 64
        tx, schedule = train.make_optimizer(cfg, 30)
        step = jax.jit(train.make_train_step(cfg, student_model, teacher_model, mask, tx,
                                             schedule, vocab))
        outs.append(step(train.init_state(params, mask, tx), batch, teacher_params))
    cfg.loss.fused, cfg.loss.cosine_weight = False, 0.0
    (s0, m0), (s1, m1) = outs
    assert float(m0["cosine_loss"]) > 0
    for k in ("loss", "clm_loss", "div_loss", "cosine_loss", "grad_norm"):
        np.testing.assert_allclose(float(m1[k]), float(m0[k]), rtol=1e-5, err_msg=k)
    for a, b in zip(jax.tree.leaves(s0["params"]), jax.tree.leaves(s1["params"]), strict=True):
        np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-5)


def test_eval_step_matches_numpy(one_step):
    _, models, batch, _ = one_step
    teacher_model, teacher_params, student_model, params, _, vocab = models
    sums = jax.jit(train.make_eval_step(student_model, teacher_model, vocab))(
        params, teacher_params, batch)
    kw = dict(segment_ids=batch["segment_ids"], positions=batch["positions"])
    t = np.asarray(teacher_model.apply({"params": teacher_params}, batch["input_ids"], **kw)
                   .logits, np.float64)
    s = np.asarray(student_model.apply({"params": params}, batch["input_ids"], **kw).logits,
                   np.float64)
    m = np.asarray(batch["loss_mask"], np.float64)
    lt = t - np.log(np.exp(t - t.max(-1, keepdims=True)).sum(-1, keepdims=True)) - t.max(-1,
                                                                                       keepdims=True)
    ls = s - np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True)) - s.max(-1,
                                                                                       keepdims=True)
    kl = (np.exp(lt) * (lt - ls)).sum(-1)
    ce = -np.take_along_axis(ls, np.asarray(batch["targets"])[..., None], -1)[..., 0]
    agree = (s.argmax(-1) == t.argmax(-1)).astype(np.float64)
    out = train.finalize_eval(jax.device_get(sums))
    np.testing.assert_allclose(out["eval_kl"], (kl * m).sum() / m.sum(), rtol=1e-4)
    np.testing.assert_allclose(out["eval_ce"], (ce * m).sum() / m.sum(), rtol=1e-5)
    np.testing.assert_allclose(out["eval_ppl"], np.exp((ce * m).sum() / m.sum()), rtol=1e-4)
    assert out["eval_top1_agreement"] == pytest.approx((agree * m).sum() / m.sum(), abs=1e-7)
    assert out["eval_tokens"] == m.sum()


# ---------------------------------------------------------------------------------------------
# The loop


@pytest.mark.slow
def test_tiny_run_trains_logs_and_evaluates(run30):
    workdir, records = run30
    assert [r["step"] for r in records] == list(range(1, 31))
    for key in ("loss", "clm_loss", "div_loss", "lr", "grad_norm", "tokens_per_s"):
        assert all(np.isfinite(r[key]) for r in records), key
    evals = [r["step"] for r in records if "eval_kl" in r]
    assert evals == [10, 20, 30]
    assert {"eval_ce", "eval_ppl", "eval_top1_agreement"} <= set(records[-1])
    first = np.mean([r["loss"] for r in records[:5]])
    last = np.mean([r["loss"] for r in records[-5:]])
    assert last < first - 0.2, (first, last)
    assert os.listdir(os.path.join(workdir, "tb"))
    assert train.Checkpointer(workdir).all_steps() == [10, 20, 30]


def test_golden_metrics_after_3_steps(run30):
    # These change when the tiny config, the data pipeline's order, init_student, the decoder's
    # numerics or the optimizer's defaults change; update them then (from metrics.jsonl), after
    # checking that the change is intended. The step itself is pinned by the reference tests.
    records = run30[1][:3]
    for r, g in zip(records, GOLDEN_3_STEPS, strict=True):
        for k, v in g.items():
            np.testing.assert_allclose(r[k], v, rtol=1e-5, err_msg=f"step {r['step']} {k}")


GOLDEN_3_STEPS = [
    dict(step=1, loss=7.594277858734131, clm_loss=6.790476322174072, div_loss=0.8038015961647034,
         grad_norm=0.9711717367172241, lr=0.0),
    dict(step=2, loss=7.544375419616699, clm_loss=6.71591329574585, div_loss=0.8284622430801392,
         grad_norm=1.1671730279922485, lr=0.0010000001639127731),
    dict(step=3, loss=7.617609024047852, clm_loss=6.778395175933838, div_loss=0.8392137885093689,
         grad_norm=1.0251491069793701, lr=0.0020000000949949026),
]


@pytest.mark.slow
def test_sharded_mesh_matches_single_device(run30, tmp_path):
    workdir = str(tmp_path)
    cfg = tiny_config(max_steps_per_run=3, **{"mesh.num_devices": 0, "mesh.data": 1,
                                              "mesh.fsdp": 2, "mesh.tensor": 4})
    train.train_and_evaluate(cfg, workdir)
    single, meshed = _numbers(run30[1][:3]), _numbers(train.read_metrics(workdir))
    assert [r["step"] for r in meshed] == [1, 2, 3]
    for a, b in zip(single, meshed, strict=True):
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_workdir_with_another_config_is_refused(run30):
    workdir, _ = run30
    with pytest.raises(ValueError, match="allow_config_change=True"):
        train.train_and_evaluate(tiny_config(**{"opt.lr": 0.5}), workdir)


def test_non_finite_loss_stops_naming_the_step(tmp_path):
    class Ckpt:
        directory, waited = str(tmp_path), []

        def wait(self):
            self.waited.append(True)

        def latest_step(self):
            return 10

    run = train.Run(ckpt=Ckpt(), config=tiny_config(), total_steps=30)
    metrics = {k: jnp.float32(1.0) for k in train.METRIC_KEYS}
    for bad in ("loss", "grad_norm"):
        m = dict(metrics, **{bad: jnp.float32(np.nan if bad == "loss" else np.inf)})
        with pytest.raises(FloatingPointError, match=r"at step 17.*checkpoint \(step 10\)"):
            train._finish_step(run, None, None, None, 17, m)
    assert Ckpt.waited  # pending saves finish before the error: the last good checkpoint stays


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_exactly(run30, tmp_path):
    workdir = str(tmp_path / "run")
    cmd = _train_cmd(workdir)
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and max(_steps(metrics), default=0) >= 12:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed: " + (
        proc.stderr.read().decode()[-2000:])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(_steps(metrics))
    assert 12 <= killed_at < 30
    done = subprocess.run(cmd, env=ENV, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    resumed = train.read_metrics(workdir)
    assert [r["step"] for r in resumed] == list(range(1, 31))  # none repeated, none skipped
    # Bitwise: XLA on CPU is deterministic for a given program and process history.
    assert _numbers(resumed) == _numbers(run30[1])


# ---------------------------------------------------------------------------------------------
# Dry run


@pytest.fixture(scope="module")
def gemma_dry_run():
    """`scripts/train.py --dry_run` of configs/gemma2_9b.py on the 8 fake CPU devices, with the
    teacher cut to 3 layers (the student to 1) so the abstract compile fits CI's budget."""
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--dry_run",
           "--config", os.path.join(ROOT, "configs", "gemma2_9b.py"),
           "--config.dry_run.num_layers=3"]
    env = dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    done = subprocess.run(cmd, env=env, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return done.stdout.decode()


@pytest.mark.slow
def test_dry_run_of_gemma2_9b_prints_its_figures(gemma_dry_run):
    from tad_jax.models import PRESETS, STUDENT_OVERRIDES

    out = gemma_dry_run
    assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1} (8 devices)" in out
    assert "teacher 3 layers, student 1 layers" in out
    teacher = PRESETS["gemma2-9b"]
    teacher = teacher.replace(num_layers=3, layer_types=teacher.layer_types[:3])
    student = teacher.replace(**{**STUDENT_OVERRIDES["gemma2-9b-student"][1], "num_layers": 1,
                                 "layer_types": None})  # layer types do not change the count
    counts = [int(x.replace(",", "")) for x in
              re.search(r"parameters: teacher ([\d,]+)\s+student ([\d,]+)", out).groups()]
    assert counts == [teacher.num_params(), student.num_params()]
    # Only the student's non-embedding parameters train (Gemma's tied embedding is frozen).
    trainable = int(re.search(r"trainable ([\d,]+)", out).group(1).replace(",", ""))
    assert trainable == student.num_params() - student.vocab_size * student.hidden_size
    mem = float(re.search(r"memory per device: ([\d.]+) GiB", out).group(1))
    assert mem > 0
    flops = float(re.search(r"FLOPs per token: ([\d.e+]+)", out).group(1))
    # A lower bound from the sizes alone: teacher forward (2 FLOPs per weight) + student forward
    # and backward through the activations (4 per weight) + weight gradients (2 per trained one).
    assert flops > 2 * teacher.num_params() + 4 * student.num_params() + 2 * trainable
    assert "PFLOPs for 1,000,000 tokens" in out


@pytest.mark.slow
def test_tad_step_costs_at_most_one_percent_more_flops_than_kd(gemma_dry_run):
    ratio = float(re.search(r"ratio ([\d.]+)", gemma_dry_run).group(1))
    assert 1.0 <= ratio <= 1.01, ratio


# ---------------------------------------------------------------------------------------------
# Bad input: errors that name the fix, raised before any step is compiled


@pytest.mark.parametrize("changes, error, match", [
    ({"data.global_batch_size": 6, "mesh.num_devices": 4}, ValueError,
     "global_batch_size=6 is not divisible by the 4 batch shards"),
    ({"opt.grad_accum_steps": 3}, ValueError, "opt.grad_accum_steps"),
    ({"eval.batch_size": 3, "mesh.num_devices": 2}, ValueError, "eval.batch_size=3"),
    ({"mesh.num_devices": 0, "mesh.data": 3, "mesh.fsdp": -1}, ValueError, "not divisible"),
    ({"mesh.num_devices": 0, "mesh.data": 2, "mesh.fsdp": 2}, ValueError,
     "covers 4 devices but 8"),
    ({"data.train_files": "/no/such/corpus/*.txt"}, FileNotFoundError, "/no/such/corpus"),
    ({"teacher.random_init": False}, FileNotFoundError, "teacher.path is empty"),
    ({"teacher.path": "/no/such/teacher"}, FileNotFoundError, "no config.json"),
])
def test_bad_input_is_a_clear_error(tmp_path, changes, error, match):
    with pytest.raises(error, match=match):
        train.train_and_evaluate(tiny_config(**changes), str(tmp_path))


def test_different_tokenizers_are_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    _, tok_dir = tiny.build_assets()
    other = Tokenizer(models.BPE())
    other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    other.train_from_iterator(["a completely different corpus " * 50], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=other).save_pretrained(tmp_path / "other")
    train.check_tokenizers({"teacher": tok_dir, "data": tok_dir}, 512)  # one tokenizer: fine
    with pytest.raises(ValueError, match="teacher and student tokenizers differ"):
        train.check_tokenizers({"teacher": tok_dir, "student": str(tmp_path / "other")}, 256)


@pytest.mark.slow
def test_restore_student_gives_the_evaluated_student(run30):
    from tad_jax.data import make_eval_iterator

    workdir, records = run30
    cfg = tiny_config()
    model, params, step = train.restore_student(cfg, workdir)
    assert step == 30 and model.config.num_layers == 1
    teacher_model, teacher_params = train.build_teacher(cfg)
    eval_step = jax.jit(train.make_eval_step(model, teacher_model, 512))
    sums = None
    for batch in make_eval_iterator(cfg.data, batch_size=cfg.eval.batch_size,
                                    max_batches=cfg.eval.max_batches):
        out = eval_step(params, teacher_params, batch)
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    got = train.finalize_eval(jax.device_get(sums))
    for k in ("eval_kl", "eval_ce", "eval_top1_agreement"):
        np.testing.assert_allclose(got[k], records[-1][k], rtol=1e-5, err_msg=k)
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        train.restore_student(cfg, os.path.join(workdir, "empty"))


@pytest.mark.slow
def test_sigterm_saves_then_stops(tmp_path, monkeypatch):
    import tad_jax.data

    real, calls = tad_jax.data.to_global_batch, []

    def to_global_batch(batch, sharding_):
        calls.append(1)
        if len(calls) == 5:  # the scheduler's SIGTERM arrives while step 5 is being prepared
            os.kill(os.getpid(), signal.SIGTERM)
        return real(batch, sharding_)

    monkeypatch.setattr(tad_jax.data, "to_global_batch", to_global_batch)
    previous = signal.getsignal(signal.SIGTERM)
    workdir = str(tmp_path)
    train.train_and_evaluate(tiny_config(), workdir)  # returns instead of dying
    assert signal.getsignal(signal.SIGTERM) == previous  # the handler is restored
    assert [r["step"] for r in train.read_metrics(workdir)] == [1, 2, 3, 4, 5]
    assert train.Checkpointer(workdir).latest_step() == 5
    assert os.path.exists(os.path.join(workdir, "data_state", "5", "process_0.json"))


def test_data_state_files_are_per_process_and_pruned(tmp_path):
    from tad_jax import checkpoint

    w = str(tmp_path)
    for step in (10, 20):
        for proc in (0, 1):
            checkpoint.save_data_state(w, step, proc, json.dumps({"step": step, "proc": proc}))
    assert json.loads(checkpoint.load_data_state(w, 20, 1, None)) == {"step": 20, "proc": 1}
    checkpoint.prune_data_states(w, [20])
    assert checkpoint.load_data_state(w, 10, 0, fallback="meta") == "meta"
    with pytest.raises(FileNotFoundError, match="same number of processes"):
        checkpoint.load_data_state(w, 20, 2, None)


def test_metrics_writer_drops_records_after_the_resumed_step(tmp_path):
    w = str(tmp_path)
    with open(os.path.join(w, "metrics.jsonl"), "w") as f:
        f.write('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')  # torn
    writer = train.MetricsWriter(w, resume_step=1, tensorboard=False)
    writer.write(2, {"loss": 1.25})
    writer.close()
    assert train.read_metrics(w) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.25}]


@pytest.mark.slow
def test_finite_data_ends_the_run_with_a_checkpoint(tmp_path):
    corpus, _ = tiny.build_assets()
    small = tmp_path / "small.txt"
    with open(corpus) as f:
        small.write_text(f.read()[:3000])  # a few batches' worth of tokens
    workdir = str(tmp_path / "run")
    cfg = tiny_config(**{"data.train_files": str(small), "data.val_files": corpus,
                         "data.num_epochs": 1, "data.val_fraction": 0.0})
    train.train_and_evaluate(cfg, workdir)
    steps = [r["step"] for r in train.read_metrics(workdir)]
    assert 1 < len(steps) < 30 and steps == list(range(1, len(steps) + 1))
    assert train.Checkpointer(workdir).latest_step() == steps[-1]


@pytest.mark.slow
def test_teacher_and_student_from_hf_folders_with_a_sliced_vocabulary(tmp_path):
    import shutil

    from tad_jax.models import save_pretrained

    _, tok_dir = tiny.build_assets()
    cfg = tiny_config()
    cfg.teacher.model.vocab_size = 520  # a padded vocabulary, larger than the tokenizer's 512
    teacher_model, teacher_params = train.build_teacher(cfg)
    student_model, student_params, _ = train.build_student(cfg, teacher_model, teacher_params)
    folders = {}
    for name, model, params in (("teacher", teacher_model, teacher_params),
                                ("student", student_model, student_params)):
        folders[name] = str(tmp_path / name)
        save_pretrained(model, params, folders[name])
        for f in os.listdir(tok_dir):  # each folder carries the (shared) tokenizer
            shutil.copy(os.path.join(tok_dir, f), folders[name])
    # A pretrained student (every parameter trains); both vocabularies cut to the tokenizer's.
    cfg = tiny_config(steps=2, **{"teacher.path": folders["teacher"], "teacher.random_init": False,
                                  "student.path": folders["student"], "loss.vocab_size": 512,
                                  "data.tokenizer": "", "eval.every_steps": 100})
    with cfg.unlocked():
        cfg.teacher.model = {}
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(cfg, workdir)
    first = train.read_metrics(workdir)[0]
    _, _, batch = _models_and_batch(tiny_config())
    expected = jax.jit(lambda p, t: _reference_loss(p, teacher_model, t, student_model, batch,
                                                    512))(student_params, teacher_params)
    np.testing.assert_allclose(first["loss"], float(expected), rtol=1e-5)
    cfg.loss.vocab_size = 500  # smaller than the tokenizer: refused before any step
    with pytest.raises(ValueError, match="loss.vocab_size=512"):
        train.train_and_evaluate(cfg, str(tmp_path / "run500"))
