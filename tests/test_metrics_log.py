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
