"""A real multi-process run: two JAX processes on this machine (2 CPU devices each, gloo
collectives, a coordinator on 127.0.0.1) against one process with 4 devices.

configs/tiny.py with fsdp over all 4 devices and `data.num_shards=2`, so that both layouts read the
same global batches. Every run is the README's recipe: `python -m tad_jax.launch ... --
scripts/train.py ...` (and scripts/evaluate.py, scripts/export_hf.py). The references are the
single-process run (first-step loss and gradient norm, held-out figures) and an uninterrupted
2-process run (rerun and resume after SIGKILL: bitwise).
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from tad_jax import evaluate, launch
from tad_jax.data import make_train_iterator
from tad_jax.metrics_log import read_metrics
from tad_jax.run_setup import resolved_config

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
STEPS, CKPT_EVERY = 16, 8
OVERRIDES = [
    "--config.mesh.fsdp=-1", "--config.mesh.data=1",  # fsdp over every device of every process
    "--config.data.num_shards=2",  # the same global batches for 1 or 2 processes
    "--config.data.val_fraction=0.03",  # a held-out split whose 2 shards differ in length
    f"--config.steps={STEPS}", f"--config.ckpt.every_steps={CKPT_EVERY}",
    f"--config.eval.every_steps={CKPT_EVERY}", "--config.log.progress=False",
    "--config.log.tensorboard=False",
    "--config.mesh.heartbeat_timeout_s=10",  # a dead peer stops the survivor within ~10 s
]
# The largest |difference| between the final students of 1 x 4 and 2 x 2 devices that the test
# accepts. Measured: 0.0 (bitwise equal: XLA's CPU reductions and gloo's all-reduce add the
# same per-device partial sums in the same order here); the bound leaves room for a runtime
# that reorders the cross-process sum (float32 rounding over 16 Adam steps at lr 3e-3).
FINAL_STUDENT_ATOL = 1e-5


def _train_cmd(workdir):
    return ["scripts/train.py", "--config", "configs/tiny.py", "--workdir", str(workdir),
            *OVERRIDES]


def _launch(num_processes, devices, command, timeout=300):
    """The README recipe; returns the launcher's output (asserting success)."""
    out = subprocess.run(
        [sys.executable, "-m", "tad_jax.launch", f"--num_processes={num_processes}",
         f"--devices_per_process={devices}", f"--timeout_s={timeout}", "--", *command],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout + 60)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    return out.stdout


def _config():
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import tiny

    cfg = tiny.get_config()
    for o in OVERRIDES:
        dotted, value = o.removeprefix("--config.").split("=")
        *groups, leaf = dotted.split(".")
        node = cfg
        for g in groups:
            node = node[g]
        node[leaf] = type(node[leaf])(value == "True" if value in ("True", "False") else value)
    return cfg


_EXPORTED = {}


def _student(workdir, out):
    """The tensors of the final student of `workdir`, exported in this (single) process."""
    if str(workdir) not in _EXPORTED:  # the uninterrupted run is a reference in several tests
        evaluate.export_hf(workdir, out)
        _EXPORTED[str(workdir)] = load_file(os.path.join(out, "model.safetensors"))
    return _EXPORTED[str(workdir)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(1 process x 4 devices, 2 processes x 2 devices) runs of the same config."""
    root = tmp_path_factory.mktemp("mp")
    # Every launched process shares one compilation cache: the 2-process runs after the first
    # load its programs instead of compiling them again (about a third of a run's CPU time).
    ENV.update(JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    _launch(1, 4, _train_cmd(root / "one"))
    _launch(2, 2, _train_cmd(root / "two"))
    return root, root / "one", root / "two"


def test_two_processes_train_like_one(runs):
    root, one, two = runs
    # Identical batches: each process reads its own shard (disjoint documents), and process 0's
    # rows then process 1's are the single process's rows, step after step.
    cfg = resolved_config(_config())
    single = make_train_iterator(cfg.data, seed=cfg.seed, process_index=0, process_count=1)
    halves = [make_train_iterator(cfg.data, seed=cfg.seed, process_index=p, process_count=2)
              for p in range(2)]
    for _ in range(STEPS):
        whole, parts = next(single), [next(h) for h in halves]
        for key, x in whole.items():
            np.testing.assert_array_equal(x, np.concatenate([p[key] for p in parts]))
    m1, m2 = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(m2[0][key], m1[0][key], rtol=1e-6)
    for key in ("eval_kl", "eval_ce", "eval_full_ece", "eval_tail_mass_k10"):
        np.testing.assert_allclose(m2[-1][key], m1[-1][key], rtol=1e-5, atol=1e-7)
    s1, s2 = _student(one, root / "hf_one"), _student(two, root / "hf_two")
    assert s1.keys() == s2.keys()
    worst = max(float(np.max(np.abs(s1[k] - s2[k]))) for k in s1)
    print(f"final student, 1x4 vs 2x2 devices: max |difference| = {worst:.3g}")
    assert worst <= FINAL_STUDENT_ATOL
    # A 2-process rerun of the same run is bitwise identical.
    _launch(2, 2, _train_cmd(root / "two_again"))
    again = _student(root / "two_again", root / "hf_two_again")
    for k in s2:
        np.testing.assert_array_equal(again[k], s2[k])


def _last_step(workdir):
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return max((json.loads(line)["step"] for line in f if line.strip()), default=0)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def test_sigkill_one_process_the_other_stops_and_a_rerun_resumes_bitwise(runs):
    root, _, two = runs
    work = root / "killed"
    port, logs = launch.free_port(), [root / f"killed_p{i}.log" for i in range(2)]
    procs = []
    for i in range(2):
        with open(logs[i], "w") as log:  # the child keeps its own copy of the descriptor
            procs.append(subprocess.Popen([sys.executable, *_train_cmd(work)], cwd=ROOT,
                                          env=launch.process_env(i, 2, port, 2, ENV),
                                          stdout=log, stderr=subprocess.STDOUT))
    try:
        # Step CKPT_EVERY + 2 logged: checkpoint CKPT_EVERY is complete (saves are synchronous
        # and come before the next step), and the run is in the middle of its second half.
        deadline = time.monotonic() + 240
        while _last_step(work) < CKPT_EVERY + 2:
            assert all(p.poll() is None for p in procs), logs[0].read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never got past its first checkpoint"
            time.sleep(0.02)
        killed_after = _last_step(work)
        assert killed_after < STEPS, "the run ended before it could be killed"
        procs[1].send_signal(signal.SIGKILL)
        start = time.monotonic()
        code = procs[0].wait(timeout=60)  # bounded: the survivor never waits for a dead peer
        seconds = time.monotonic() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    survivor_log = logs[0].read_text()
    assert code != 0 and seconds < 60
    # tad_jax's PeerFailure (the next collective failed) or jax's own stop (missed heartbeats).
    assert any(m in survivor_log for m in ("another process of the run died",
                                           "another task died")), survivor_log[-3000:]
    print(f"killed process 1 after step {killed_after}; process 0 exited with {code} "
          f"after {seconds:.1f} s")
    # Rerun both: resumes from the last complete checkpoint and ends where the uninterrupted
    # run ended, bit for bit; metrics.jsonl holds every step once.
    saved = sorted(int(d) for d in os.listdir(work / "checkpoints") if d.isdigit())
    assert saved == [CKPT_EVERY]  # the last complete checkpoint, where the rerun starts
    _launch(2, 2, _train_cmd(work))
    assert [r["step"] for r in read_metrics(work)] == list(range(1, STEPS + 1))
    resumed, reference = _student(work, root / "hf_killed"), _student(two, root / "hf_ref")
    for k in reference:
        np.testing.assert_array_equal(resumed[k], reference[k])


def test_evaluate_and_export_as_two_processes(runs):
    root, _, two = runs
    # The whole held-out split (max_batches 0): its two shards hold 13 and 14 batches of 8 rows
    # at eval.batch_size=16, so process 0 feeds one fully masked batch while process 1 finishes.
    args = ["--config", "configs/tiny.py", "--workdir", str(two), *OVERRIDES,
            "--config.eval.batch_size=16", "--max_batches=0"]
    _launch(2, 2, ["scripts/evaluate.py", *args])
    two_proc = json.loads((two / "eval.json").read_text())
    cfg = _config()
    cfg.eval.batch_size = 16
    single = evaluate.evaluate(cfg, two, max_batches=0, write=False)
    assert single["tokens"] == two_proc["tokens"] > 0
    for key in ("kl", "full_ece", "mismatch_rate", "top1_agreement", "student_ce", "teacher_ce"):
        np.testing.assert_allclose(two_proc[key], single[key], rtol=1e-5, atol=1e-7, err_msg=key)
    for k, value in single["tail_mass"].items():
        np.testing.assert_allclose(two_proc["tail_mass"][str(k)], value, rtol=1e-5, atol=1e-7)
    # Export: every process restores its shards, process 0 writes the folder.
    _launch(2, 2, ["scripts/export_hf.py", "--workdir", str(two), "--out", str(root / "hf_mp")])
    exported = load_file(os.path.join(root / "hf_mp", "model.safetensors"))
    reference = _student(two, root / "hf_single")
    assert exported.keys() == reference.keys()
    for k in reference:
        np.testing.assert_array_equal(exported[k], reference[k])


def test_readme_recipe_is_the_one_these_tests_run():
    import re

    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    flags = re.search(r'^MP="(.*)"$', readme, re.M).group(1).split()
    assert set(flags) <= set(OVERRIDES)
    for script in ("scripts/train.py", "scripts/evaluate.py", "scripts/export_hf.py"):
        assert re.search(r"python -m tad_jax\.launch --num_processes 2 --devices_per_process 2 "
                         rf"-- \\\n\s+{script}", readme), script


def test_tensor_parallelism_across_processes_is_refused(tmp_path):
    """A mesh whose shards of rows span both processes (tensor over all 2 x 1 devices) fails at
    setup with the fix named; it used to train each process on its rows as the whole batch."""
    cmd = [sys.executable, "-m", "tad_jax.launch", "--num_processes=2",
           "--devices_per_process=1", "--timeout_s=200", "--", "scripts/train.py", "--config",
           "configs/tiny.py", "--workdir", str(tmp_path), "--config.mesh.data=1",
           "--config.mesh.fsdp=1", "--config.mesh.tensor=-1", "--config.steps=2",
           "--config.log.progress=False"]
    out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=260)
    assert out.returncode != 0
    assert "do not split over the 2 processes" in out.stdout + out.stderr
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
