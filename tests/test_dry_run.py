"""Tests of tad_jax.dry_run: the abstract compile of a full-size config and its figures."""

import contextlib
import json
import os
import re
import subprocess
import sys

import pytest
from tiny_setup import ENV, ROOT, tiny_config

from tad_jax import aot, builders, run_setup, sharding, targets
from tad_jax.dry_run import dry_run


@pytest.fixture(scope="module")
def gemma_dry_run():
    """`scripts/train.py --dry_run` of configs/gemma2_9b.py on the 8 fake CPU devices, with the
    teacher cut to 3 layers (the student to 1) so the abstract compile fits CI's budget. Unfused:
    the paper's Table 3 compares TAD and KD on the logits path (the fused TAD kernel adds a head
    matmul that fused KD does not need)."""
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--dry_run",
           "--config", os.path.join(ROOT, "configs", "gemma2_9b.py"),
           "--config.dry_run.num_layers=3", "--config.loss.fused=False",
           "--config.dry_run.eval_step=False"]
    env = dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    done = subprocess.run(cmd, env=env, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return done.stdout.decode()


@pytest.mark.slow
def test_dry_run_of_gemma2_9b_prints_its_figures(gemma_dry_run):
    from tad_jax.models import PRESETS, STUDENT_OVERRIDES

    out = gemma_dry_run
    assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1} (8 devices)" in out
    assert "teacher 3 scanned layers, student 1 scanned layers (remat nothing_saveable)" in out
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
# Target compiles, FLOPs with loops counted, automatic micro-batching (configs/tiny.py)

needs_libtpu = pytest.mark.skipif(not targets.has_module("libtpu"), reason=(
    "libtpu is not installed: pip install 'tad_jax[tpu]' (the test extra brings it)"))


def _abstract_models(cfg, mesh):
    cfg = run_setup.resolved_config(cfg)
    with run_setup.mesh_context(mesh) if mesh is not None else contextlib.nullcontext():
        tm, ta, _ = builders.abstract_teacher(cfg, mesh)
        sm, sa, mask = builders.abstract_student(cfg, tm, ta, mesh)
    return cfg, aot.Models(tm, ta, sm, sa, mask, builders.shared_vocab_size(cfg, tm.config,
                                                                           sm.config))


@needs_libtpu
def test_tiny_step_compiles_for_a_tpu_topology_and_reports(tmp_path):
    lines = []
    cfg = tiny_config(**{"dry_run.topology": "v5p:2x2x1", "mesh.num_devices": 2})
    f = dry_run(cfg, print_fn=lines.append, json_path=str(tmp_path / "d.json"))
    out = "\n".join(lines)
    assert f["platform"] == "tpu" and f["devices"] == 2
    m = f["train_memory_gib"]
    # The argument groups are the abstract inputs' shard sizes (batch [8, 32] split in 2).
    assert m["batch"] * 2**30 == 4 * 4 * 32 * 5
    assert m["student_params"] * 2**30 == 4 * f["student_params"]  # float32, replicated
    assert m["teacher_params"] * 2**30 == 4 * f["teacher_params"]
    assert 0 < m["total"] < 0.1 and f["peak_gib"] >= m["total"]
    assert "verdict: fits with" in out and "opt.grad_accum_steps=0 would choose 1" in out
    # Roofline: max(FLOPs / peak, bytes / bandwidth) per device with the v5p figures.
    peak, bw = 459e12, 2765e9
    assert f["step_time_s"] == pytest.approx(max(f["step_flops"] / 2 / peak,
                                                 f["bytes_per_device"] / bw))
    assert f["run_days"] == pytest.approx(30 * f["step_time_s"] / 86400)
    assert "roofline step time >=" in out and "chip-hours" in out
    assert json.loads((tmp_path / "d.json").read_text())["grad_accum_steps"] == 1


def _hand_flops_per_token(t, s, seq_len, head_trained: bool) -> float:
    """Matmul FLOPs per token of one step (teacher forward, student forward and backward).

    Per layer: 2 per weight of the projections, and attention's QK^T and PV over all T
    positions (4·T·H·hd forward, twice that backward). Backward: activation gradients (2 per
    weight) and weight gradients (2 per weight, every layer trains); the first layer sends no
    gradient through q/k/v into the frozen embeddings. Head: 2·d·V forward, its activation gradient
    2·d·V, its weight gradient only when it trains.
    """
    def layer(c):
        d, hd = c.hidden_size, c.head_dim
        w = d * hd * (2 * c.num_heads + 2 * c.num_kv_heads) + 3 * d * c.intermediate_size
        return w, 4 * seq_len * c.num_heads * hd, d * hd * (c.num_heads + 2 * c.num_kv_heads)

    head = lambda c: 2 * c.hidden_size * c.vocab_size
    tw, ta, _ = layer(t)
    sw, sa, qkv = layer(s)
    teacher = t.num_layers * (2 * tw + ta) + head(t)
    student_fwd = s.num_layers * (2 * sw + sa) + head(s)
    student_bwd = s.num_layers * (4 * sw + 2 * sa) - 2 * qkv + head(s) * (2 if head_trained else 1)
    return teacher + student_fwd + student_bwd


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned-layers"])
def test_step_flops_equal_a_hand_count(scan):
    # Wider than tiny (d = 256, MLP 1024) so that matmuls dominate as in real models. Scanned
    # layers (teacher and student): the layer loop's trip count is counted too.
    cfg = tiny_config(**{"teacher.model.hidden_size": 256, "teacher.model.intermediate_size": 1024,
                         "teacher.model.head_dim": 64, "opt.grad_accum_steps": 2,
                         "teacher.scan_layers": scan, "student.scan_layers": scan})
    cfg, models = _abstract_models(cfg, None)
    costs = aot.step_costs(cfg, models)
    tokens = cfg.data.global_batch_size * cfg.data.seq_len
    hand = tokens * _hand_flops_per_token(models.teacher_model.config,
                                          models.student_model.config, cfg.data.seq_len,
                                          head_trained=bool(models.mask["lm_head"]["kernel"]))
    assert costs.flops == pytest.approx(hand, rel=0.05), (costs.flops, hand)
    # XLA counts a loop's body once: the compiled step (2 micro-batches in a scan) shows about
    # half of the step's FLOPs.
    mesh = sharding.make_mesh(cfg.mesh)
    with run_setup.mesh_context(mesh):
        compiled = aot.compile_train_step(cfg, _abstract_models(cfg, mesh)[1], mesh)
    assert aot.cost_flops(compiled) < 0.6 * costs.flops


def test_flops_count_every_micro_batch_and_fused_chunk():
    cfg, models = _abstract_models(tiny_config(**{"data.global_batch_size": 16}), None)
    one = aot.step_costs(cfg, models, accum=1).flops
    assert aot.step_costs(cfg, models, accum=4).flops == pytest.approx(one, rel=0.01)
    # The fused loss's chunk loop: 512 tokens in chunks of 64 or of 128 tokens, same FLOPs.
    fused = [aot.step_costs(aot.with_accum(cfg, 1, fused=True, chunk_size=c), models).flops
             for c in (64, 128)]
    assert fused[0] == pytest.approx(fused[1], rel=0.01)
    assert fused[0] == pytest.approx(one, rel=0.25)  # the same model; the loss differs a little


@pytest.fixture(scope="module")
def tiny_accum():
    """The tiny config with 16 sequences on one device: (config, models, mesh, accum ->
    `MemorySplit` of its compiled train step for every candidate 1, 2, 4, 8, 16)."""
    cfg = tiny_config(**{"data.global_batch_size": 16})
    mesh = sharding.make_mesh(cfg.mesh)
    cfg, models = _abstract_models(cfg, mesh)
    with run_setup.mesh_context(mesh):
        splits = {a: aot.train_memory(cfg, models, mesh, aot.compile_train_step(cfg, models, mesh,
                                                                                a), accum=a)
                  for a in aot.accum_candidates(cfg, mesh)}
    return cfg, models, mesh, splits


def test_auto_micro_batching_picks_the_fewest_that_fit(tiny_accum):
    cfg, models, mesh, splits = tiny_accum
    total = {a: s.total for a, s in splits.items()}
    assert total[1] > total[4]  # smaller micro-batches need less memory
    budget = (total[2] + total[4]) / 2  # 4 micro-batches fit, 2 do not
    with run_setup.mesh_context(mesh):
        choice = aot.choose_grad_accum(cfg, models, mesh, budget)
    assert (choice.accum, choice.fits) == (4, True)
    assert choice.tried[4] <= budget < choice.tried[2]
    assert choice.tried == {a: total[a] for a in choice.tried}  # the compiles measured above


def test_auto_micro_batching_from_the_configured_compile_needs_one_or_two_more(tiny_accum):
    """From the configured 16 micro-batches' compile (its split gives `guess_accum`), for every
    budget: the choice fits, the next fewer micro-batches do not, and the search compiles only
    the choice and the next fewer (only the next fewer when 16 is the choice; at most the guess
    and 1 when one micro-batch fits). The tiny step's memory is nearly proportional to a
    micro-batch's rows, so the one-point guess is right."""
    cfg, models, mesh, splits = tiny_accum
    total = {a: s.total for a, s in splits.items()}
    cands = aot.accum_candidates(cfg, mesh)
    budgets = {1: total[1] * 1.01}  # the answer -> a budget between it and the next fewer
    budgets.update({b: (total[b] + total[p]) / 2 for p, b in zip(cands, cands[1:], strict=False)})
    for want, budget in budgets.items():
        compiled = []
        measure = lambda a: (compiled.append(a), total[a])[1]  # noqa: B023 (used in the loop)
        guess = aot.guess_accum(splits[16], 16, cands, budget)
        choice = aot.choose_grad_accum(cfg, models, mesh, budget, measure=measure,
                                       known={16: total[16]}, guess=guess)
        assert (choice.accum, choice.fits) == (want, True), budget
        assert total[want] <= budget
        fewer = cands[cands.index(want) - 1] if want > 1 else None
        if fewer:
            assert total[fewer] > budget
        if want == 16:  # the configured compile fits: only the next fewer is compiled
            assert compiled == [8]
        elif want == 1:  # nothing fewer to verify; the guess (2, a little cautious), then 1
            assert compiled in ([1], [2, 1]), compiled
        else:
            assert compiled == [want, fewer], (want, compiled)


def test_dry_run_auto_mode_on_the_host_with_a_fake_budget():
    lines = []
    cfg = tiny_config(**{"data.global_batch_size": 4, "opt.grad_accum_steps": 0,
                         "dry_run.memory_gib": 1e-9, "dry_run.eval_step": False})
    f = dry_run(cfg, print_fn=lines.append)
    out = "\n".join(lines)
    assert f["auto_accum"]["fits"] is False and f["grad_accum_steps"] == 4
    assert "verdict: does not fit by" in out and "try:" in out
    assert "CPU figures" in out


def test_training_resolves_auto_micro_batching_from_the_devices_memory(monkeypatch, capsys):
    cfg = tiny_config(**{"data.global_batch_size": 4, "dry_run.memory_margin": 0.0})
    mesh = sharding.make_mesh(cfg.mesh)
    cfg, models = _abstract_models(cfg, mesh)
    host = targets.resolve_target("")
    with run_setup.mesh_context(mesh):
        assert run_setup._auto_accum(cfg, models, mesh) == 1  # CPU: no limit reported
        assert "no memory limit" in capsys.readouterr().out
        one = aot.train_memory(cfg, models, mesh, aot.compile_train_step(cfg, models, mesh, 1),
                               accum=1).total
        limited = targets.Target("", "cpu", host.devices, None, one, attached=True)
        monkeypatch.setattr(targets, "resolve_target", lambda *a, **k: limited)
        assert run_setup._auto_accum(cfg, models, mesh) == 1  # exactly fits
        limited = targets.Target("", "cpu", host.devices, None, one - 1, attached=True)
        monkeypatch.setattr(targets, "resolve_target", lambda *a, **k: limited)
        assert run_setup._auto_accum(cfg, models, mesh) > 1
    assert "micro-batches (the fewest that fit" in capsys.readouterr().out


def test_auto_micro_batching_search_with_a_guess_compiles_twice():
    cfg = tiny_config(**{"data.global_batch_size": 16})
    mesh = sharding.make_mesh(cfg.mesh)
    fake = lambda a: 10.0 + 80.0 / a  # bytes: fixed + temporaries that shrink with micro-batches
    plain = aot.choose_grad_accum(cfg, None, mesh, 35.0, measure=fake)
    assert (plain.accum, plain.fits) == (4, True) and set(plain.tried) == {1, 2, 4}
    split = aot.MemorySplit(2.0, 3.0, 4.0, 1.0, temporaries=5.0, outputs=0.0, code=0.0)
    # 16 micro-batches measured: 10 fixed + 5 temporaries; 4 micro-batches -> 10 + 20 <= 35.
    guess = aot.guess_accum(split, 16, aot.accum_candidates(cfg, mesh), 35.0)
    assert guess == 4
    guided = aot.choose_grad_accum(cfg, None, mesh, 35.0, measure=fake, known={16: 15.0},
                                   guess=guess)
    assert (guided.accum, set(guided.tried)) == (4, {16, 4, 2})
    wrong = aot.choose_grad_accum(cfg, None, mesh, 35.0, measure=fake, guess=1)
    assert (wrong.accum, set(wrong.tried)) == (4, {1, 2, 4})


def test_dry_run_table_names_a_host_dry_run(tmp_path):
    """A host dry run's JSON (no chip: no roofline fields) is a usage error that says what to
    compile for; it was a KeyError (a reviewer's finding)."""
    host = tmp_path / "host.json"
    host.write_text(json.dumps({"target": "host", "devices": 1, "grad_accum_steps": 1,
                                "peak_gib": 0.1}))
    out = subprocess.run([sys.executable, "scripts/dry_run_table.py", f"tiny={host}"], cwd=ROOT,
                         env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "compile for a topology" in out.stderr
    assert "KeyError" not in out.stderr
