"""tad_jax.console: by default only our setup steps and every library's warnings reach the console;
--verbosity brings library INFO logs back. Checked in a fresh process, as the scripts run."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import logging
    from absl import app
    from tad_jax import console

    def main(argv):
        console.setup()
        logging.getLogger("orbax.checkpoint").info("LIBRARY-INFO")
        logging.getLogger("orbax.checkpoint").warning("LIBRARY-WARNING")
        logging.getLogger("tad_jax.train").info("OWN-STEP")
        logging.getLogger("lm_eval.models.huggingface").warning("HARNESS-NOTE")

    app.run(main)
""")


def _run(*flags):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *flags], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def test_default_shows_steps_and_warnings_only():
    out = _run()
    lines = out.splitlines()
    assert "OWN-STEP" in lines  # a plain line, no absl prefix
    assert "LIBRARY-WARNING" in out
    assert "LIBRARY-INFO" not in out and "HARNESS-NOTE" not in out


def test_verbosity_brings_library_logs_back():
    out = _run("--verbosity=0")
    assert "LIBRARY-INFO" in out and "LIBRARY-WARNING" in out and "OWN-STEP" in out
