"""Tests of tad_jax.metrics_log: metrics.jsonl across a resume."""

import os

from tad_jax.metrics_log import MetricsWriter, read_metrics


def test_metrics_writer_drops_records_after_the_resumed_step(tmp_path):
    w = str(tmp_path)
    with open(os.path.join(w, "metrics.jsonl"), "w") as f:
        f.write('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')  # torn
    writer = MetricsWriter(w, resume_step=1, tensorboard=False)
    writer.write(2, {"loss": 1.25})
    writer.close()
    assert read_metrics(w) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.25}]


def test_readers_skip_a_torn_last_line(tmp_path, caplog):
    # A run killed mid-write and not resumed: the readers (and the KL plot) keep the whole
    # records; they raised JSONDecodeError and evaluate() silently drew no curve (a reviewer's
    # finding).
    from tad_jax import plots

    w = str(tmp_path)
    with open(os.path.join(w, "metrics.jsonl"), "w") as f:
        f.write('{"step": 10, "eval_kl": 1.5}\n{"step": 11, "loss": 0.9')
    assert read_metrics(w) == [{"step": 10, "eval_kl": 1.5}]
    assert "line 2 is torn" in caplog.text
    assert plots.read_kl_curve(w, 4) == ([40.0], [1.5], "training tokens")
