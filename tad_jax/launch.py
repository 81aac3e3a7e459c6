"""Start N local JAX processes that form one multi-process run (JAX's multi-controller runtime).

    python -m tad_jax.launch --num_processes 2 --devices_per_process 2 -- \\
        scripts/train.py --config configs/tiny.py --workdir runs/mp

Each process gets `JAX_COORDINATOR_ADDRESS` (a free port on 127.0.0.1), `JAX_NUM_PROCESSES`,
`JAX_PROCESS_ID`, `--xla_force_host_platform_device_count` devices, `JAX_PLATFORMS=cpu` and gloo
CPU collectives; `tad_jax.sharding.maybe_initialize_distributed` then calls
`jax.distributed.initialize` with exactly those values. This is the local stand-in for a cluster
(the tests run it); on real hosts run the same command once per host with those variables set by
hand, or let SLURM / a TPU pod provide them. Logs are streamed with a `[pI]` prefix; if any process
exits with an error, the others are stopped and the launcher exits with that process's code.

Public API: `launch(command, num_processes, devices_per_process, ...) -> int`, `process_env(...)`,
`free_port()`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the coordinator binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, port: int, devices_per_process: int,
                base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of local process `process_id` of `num_processes`.

    Args:
      process_id: 0-based index of the process (process 0 hosts the coordinator).
      num_processes: processes in the run.
      port: the coordinator's port on 127.0.0.1.
      devices_per_process: CPU devices each process simulates.
      base: the environment to extend (default: this process's).

    Returns:
      A copy of `base` with the coordinator, process, device-count and collectives variables set
      (any earlier device-count flag in `XLA_FLAGS` is replaced).
    """
    env = dict(os.environ if base is None else base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_FLAG)]
    env.update(
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES=str(num_processes),
        JAX_PROCESS_ID=str(process_id),
        XLA_FLAGS=" ".join([*flags, f"{_DEVICE_FLAG}={devices_per_process}"]),
        # CPU devices only: with libtpu installed, nothing may try to claim a TPU.
        JAX_PLATFORMS="cpu",
        # Cross-process collectives between CPU devices (jax reads its flags from JAX_* vars).
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        PYTHONUNBUFFERED="1",
    )
    return env


def _argv(command: Sequence[str]) -> list[str]:
    """A Python script runs with this interpreter; anything else as given."""
    command = list(command)
    if command and command[0].endswith(".py"):
        return [sys.executable, *command]
    return command


def _stream(proc: subprocess.Popen, prefix: str, lock: threading.Lock) -> None:
    for line in proc.stdout:
        with lock:
            sys.stdout.write(f"{prefix} {line}")
            sys.stdout.flush()


def _stop(procs: Sequence[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM every live process group, then SIGKILL what is left after `grace_s`."""
    for p in procs:
        if p.poll() is None:
            _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            _signal_group(p, signal.SIGKILL)
            p.wait()


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    # Each child leads its own process group, so its helpers (grain workers) go too.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, sig)


def launch(command: Sequence[str], num_processes: int, devices_per_process: int, *,
           port: int | None = None, timeout_s: float | None = None, grace_s: float = 10.0,
           env: Mapping[str, str] | None = None) -> int:
    """Runs `command` as `num_processes` local processes of one JAX distributed run.

    Args:
      command: the program and its arguments (a `.py` file runs with this Python).
      num_processes: processes to start (>= 1).
      devices_per_process: CPU devices per process (>= 1).
      port: the coordinator's port (default: a free one).
      timeout_s: stop everything and return 124 after this many seconds (None = no limit).
      grace_s: seconds between SIGTERM and SIGKILL when stopping the others.
      env: the base environment (default: this process's).

    Returns:
      0 when every process exited 0; else the exit code of the first process that failed
      (a process killed by signal S gives 128 + S), or 124 on timeout.

    Raises:
      ValueError: a count below 1, an empty command, or a program that does not exist.
    """
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError("--num_processes and --devices_per_process must be at least 1.")
    if not command:
        raise ValueError("No command: put it after `--`, e.g. `-- scripts/train.py --config ...`.")
    program = command[0]
    if not (os.path.isfile(program) if program.endswith(".py") else shutil.which(program)):
        raise ValueError(f"No such {'script' if program.endswith('.py') else 'program'}: "
                         f"{program!r} (a path from this folder, {os.getcwd()}).")
    port = port or free_port()
    lock, procs, threads = threading.Lock(), [], []
    for i in range(num_processes):
        p = subprocess.Popen(_argv(command), env=process_env(i, num_processes, port,
                                                             devices_per_process, env),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             errors="replace", start_new_session=True)
        procs.append(p)
        t = threading.Thread(target=_stream, args=(p, f"[p{i}]", lock), daemon=True)
        t.start()
        threads.append(t)
    try:
        code = _watch(procs, timeout_s)
    except BaseException:  # Ctrl-C or SIGTERM to the launcher: the processes go with it
        _stop(procs, grace_s)
        raise
    if code != 0:
        _stop(procs, grace_s)
    for t in threads:
        t.join(timeout=5)
    return code


def _watch(procs: Sequence[subprocess.Popen], timeout_s: float | None) -> int:
    """Waits for all processes; returns at the first failure (or 124 at the timeout)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        codes = [p.poll() for p in procs]
        for i, c in enumerate(codes):
            if c is not None and c != 0:
                code = 128 - c if c < 0 else c
                print(f"[launch] process {i} exited with code {code}; stopping the others.",
                      file=sys.stderr, flush=True)
                return code
        if all(c == 0 for c in codes):
            return 0
        if deadline is not None and time.monotonic() > deadline:
            print(f"[launch] timeout after {timeout_s} s; stopping every process.",
                  file=sys.stderr, flush=True)
            return 124
        time.sleep(0.2)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        prog="python -m tad_jax.launch", description=__doc__.split("\n\n")[0],
        usage="%(prog)s --num_processes N --devices_per_process D [--port P] -- SCRIPT.py ARGS")
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--devices_per_process", type=int, default=1)
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0 = a free one)")
    parser.add_argument("--timeout_s", type=float, default=None, help="stop everything after")
    args = parser.parse_args(own)
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops the processes, as Ctrl-C does
    try:
        return launch(command, args.num_processes, args.devices_per_process,
                      port=args.port or None, timeout_s=args.timeout_s)
    except ValueError as e:
        parser.error(str(e))
    except KeyboardInterrupt:
        return 130


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
