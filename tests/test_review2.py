"""Review checks: the fused loss at a valid position with no teacher entry left.

Reference: `losses.tad_divergence` on the materialised logits h @ W + b (0 and a 0 gradient at
such a position, α_T = 0 in ᾱ(X); its own tests check it against plain jnp).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tad_jax import fused, losses


# chunk_size 16: whole rows per step; 3: rows span steps (the teacher pre-pass gives log α_T)
@pytest.mark.parametrize("chunk_size", [16, 3])
def test_fused_empty_teacher_position_matches_unfused(chunk_size):
    ks = jax.random.split(jax.random.key(0), 4)
    hs, ws = jax.random.normal(ks[0], (2, 8, 4)), jax.random.normal(ks[1], (4, 64))
    bs = 0.5 * jax.random.normal(ks[3], (64,))
    # A positive teacher head and a -inf hidden state: every teacher logit of (0, 3) is -inf.
    ht = jax.random.normal(ks[2], (2, 8, 4)).at[0, 3].set(-jnp.inf)
    wt = jnp.abs(jax.random.normal(ks[1], (4, 64))) + 0.1
    zt = jnp.einsum("rtd,dv->rtv", ht, wt)
    assert bool(jnp.all(jnp.isneginf(zt[0, 3]))) and bool(jnp.all(jnp.isfinite(zt[1])))
    mask = jnp.ones((2, 8))

    def unfused(hs, ws, bs):
        return losses.tad_divergence(hs @ ws + bs, zt, mask, top_k=3)

    def fused_loss(hs, ws, bs):
        return fused.fused_tad_loss(hs, ws, ht, wt, mask, top_k=3, chunk_size=chunk_size,
                                    student_bias=bs)

    want = jax.value_and_grad(unfused, argnums=(0, 1, 2))(hs, ws, bs)
    got = jax.value_and_grad(fused_loss, argnums=(0, 1, 2))(hs, ws, bs)
    assert np.isfinite(float(want[0]))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
