"""tad_jax.launch: real JAX processes on this machine, connected by jax.distributed.

Each test starts fresh Python processes (2 processes x 2 CPU devices, gloo collectives); the
global sum is checked against the hand-computed total of every process's values.
"""

import os
import subprocess
import sys
import textwrap
import time

import pytest

from tad_jax import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)

PSUM = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from tad_jax import sharding
    assert sharding.maybe_initialize_distributed("auto", heartbeat_timeout_s=10)
    mesh = jax.make_mesh((jax.device_count(),), ("x",))
    local = np.arange(2, dtype=np.float32) + 10 * jax.process_index()  # [10p, 10p + 1]
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("x")), local)
    total = jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, P()))(x)
    print("process", jax.process_index(), "of", jax.process_count(), "devices",
          jax.device_count(), "sum", float(total), flush=True)
""")


def _run_launcher(tmp_path, script, *extra, timeout=120):
    path = tmp_path / "prog.py"
    path.write_text(script)
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "tad_jax.launch", "--num_processes", "2",
                          "--devices_per_process", "2", *extra, "--", str(path)],
                         env=ENV, capture_output=True, text=True, timeout=timeout)
    return out, time.monotonic() - start


def test_two_processes_sum_over_four_devices(tmp_path):
    out, _ = _run_launcher(tmp_path, PSUM)
    assert out.returncode == 0, out.stdout + out.stderr
    # 0 + 1 + 10 + 11: each process's two values, summed across the processes by gloo.
    for p in range(2):
        assert f"[p{p}] process {p} of 2 devices 4 sum 22.0" in out.stdout, out.stdout


def test_a_failing_process_stops_the_others_and_the_launcher_fails_fast(tmp_path):
    script = ("import os, sys, time\n"
              "if os.environ['JAX_PROCESS_ID'] == '1':\n"
              "    print('giving up', flush=True); sys.exit(3)\n"
              "time.sleep(600)\n")
    out, seconds = _run_launcher(tmp_path, script)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "[p1] giving up" in out.stdout
    assert "process 1 exited with code 3; stopping the others" in out.stderr
    assert seconds < 30  # the sleeping process 0 was stopped, not waited for


@pytest.mark.parametrize("program", ["scripts/no_such.py", "no-such-program"])
def test_a_missing_program_is_a_usage_error(program):
    # It was a raw FileNotFoundError traceback from Popen (a reviewer's note).
    out = subprocess.run([sys.executable, "-m", "tad_jax.launch", "--num_processes", "2", "--",
                          program], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "No such" in out.stderr and program in out.stderr
    assert "Traceback" not in out.stderr


def test_process_env_sets_the_coordinator_devices_and_collectives():
    env = launch.process_env(1, 2, 4321, 3, base={"XLA_FLAGS": "--foo "
                                                  "--xla_force_host_platform_device_count=8"})
    assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:4321"
    assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == ("2", "1")
    assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=3"
    assert env["JAX_PLATFORMS"] == "cpu"
    assert env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] == "gloo"


# What a survivor prints: tad_jax's PeerFailure, or jax's own stop after missed heartbeats.
DEATH_MESSAGES = ("another process of the run died", "another task died")
DIE = textwrap.dedent("""
    import os, signal, jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from tad_jax import sharding
    sharding.maybe_initialize_distributed("auto", heartbeat_timeout_s=5)
    mesh = jax.make_mesh((jax.device_count(),), ("x",))
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("x")), np.ones(2, np.float32))
    total = jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, P()))
    for i in range(10**6):
        with sharding.peer_failures("a test loop"):
            float(total(x))
        if i == 20 and jax.process_index() == int(os.environ["VICTIM"]):
            os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("victim", [0, 1])
def test_a_killed_process_stops_the_survivor_within_bounded_time(tmp_path, victim):
    # The survivor stops either at its next collective (gloo: connection reset; tad_jax's
    # PeerFailure names the cause) or, when the coordination service misses the dead process's
    # heartbeats (5 s here), by jax itself ("another task died"); which comes first is a race.
    path = tmp_path / "die.py"
    path.write_text(DIE)
    port = launch.free_port()
    env = lambda i: launch.process_env(i, 2, port, 2, dict(ENV, VICTIM=str(victim)))
    procs = [subprocess.Popen([sys.executable, str(path)], env=env(i), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    start = time.monotonic()
    try:
        outs = [p.communicate(timeout=60)[0] for p in procs]
        seconds = time.monotonic() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[victim].returncode == -9
    survivor = procs[1 - victim]
    assert survivor.returncode != 0 and seconds < 60, outs[1 - victim][-2000:]
    assert any(m in outs[1 - victim] for m in DEATH_MESSAGES), outs[1 - victim][-3000:]
