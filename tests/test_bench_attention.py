"""experiments/bench_attention.py's model-shaped case: buckets as the 122M GPT's hash calls see them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scfa_jax import reference, sorting
from tests.scripts import load_script

bench = load_script("bench_attention.py")


def test_model16_shares_skewed_buckets_between_queries_and_keys_strictly():
  b, t, n = 2, 4096, 3
  fn, q_buckets, k_buckets, density = bench.make_case("model16", b, t, n, seed=0)
  assert q_buckets is k_buckets and q_buckets.shape == (b, t, n) and q_buckets.dtype == jnp.uint8
  counts = np.stack([np.bincount(np.asarray(q_buckets)[i, :, h], minlength=16) for i in range(b) for h in range(n)])
  shares = counts / t
  np.testing.assert_allclose((shares**2).sum(axis=1), density, atol=0.006)  # 0.080, uniform would be 0.0625
  assert abs(density - 0.080) < 0.001
  assert len({int(np.argmax(c)) for c in counts[::b]}) > 1 or n == 1  # the largest bucket's id varies by head
  # Strict causality: a token never attends to itself, so the first token of a bucket outputs 0.
  q = jnp.asarray(np.random.default_rng(0).normal(size=(1, 8, 1, 16)), jnp.float32)
  ids = jnp.zeros((1, 8, 1), jnp.uint8)
  out = fn(q, q, q, ids, ids)
  expected = reference.hash_sparse_attention(q, q, q, q_buckets=ids, k_buckets=ids, strict=True)
  np.testing.assert_allclose(out, expected, atol=1e-5)
  assert float(jnp.abs(out[0, 0]).max()) == 0.0
  # Inside jit (two arguments), the case still sorts one array, as the model's layer does.
  sort = lambda case: jax.jit(lambda qm, km: sorting.by_bucket(qm, bench.key_masks(case, qm, km)))
  assert sort("model16")(q_buckets, k_buckets).shared
  assert not sort("hash16")(q_buckets, k_buckets).shared
  with pytest.raises(ValueError, match="needs kv_heads = 3"):
    bench.make_case("model16", b, 64, n, seed=0, kv_heads=1)
