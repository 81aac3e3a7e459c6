"""The README stays true: its loss example runs, and it opens with the two commands CI relies on."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_opens_with_the_two_make_commands():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()]
    assert commands == ["make demo", "make test"]


def test_readme_loss_example_runs_and_matches_the_definition():
    import jax

    import tad_jax

    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    scope = {}
    exec(code, scope)
    loss, grads = scope["loss"], scope["grads"]
    assert np.isfinite(float(loss)) and grads.shape == (2, 16, 1000)
    # The identity L_DIV = KL + (β(X) − 1)·α_T·D_KL2 (TAD_SPEC.md), from the components.
    c = tad_jax.tad_components(scope["student_logits"], scope["teacher_logits"], top_k=10, beta=2.0)
    expected = c["kl"] + (c["beta_x"][:, None] - 1.0) * c["alpha_t"] * c["kl2"]
    np.testing.assert_allclose(float(loss), float(jax.numpy.mean(expected)), rtol=1e-5)
