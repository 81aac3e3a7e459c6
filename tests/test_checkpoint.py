"""tad_jax.checkpoint: what a workdir may be (the save/restore path is tested by test_train)."""

import pytest

from tad_jax.checkpoint import Checkpointer


def test_url_workdir_is_refused_naming_a_mounted_path():
    with pytest.raises(ValueError, match="URLs are not supported.*gcsfuse"):
        Checkpointer("gs://bucket/runs/a")
