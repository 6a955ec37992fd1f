"""Bad input raises a clear error naming the argument; LSH; the public names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scfa_jax

B, T, S, N, H = 2, 10, 12, 3, 8


def _arrays(dtype=jnp.float32):
  return jnp.zeros((B, T, N, H), dtype), jnp.zeros((B, S, N, H), dtype), jnp.zeros((B, S, N, H), dtype)


def _hash(**kw):
  q, k, v = _arrays()
  args = dict(q=q, k=k, v=v, q_buckets=jnp.zeros((B, T, N), jnp.int32), k_buckets=jnp.zeros((B, S, N), jnp.int32))
  args.update(kw)
  q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
  return scfa_jax.hash_sparse_attention(q, k, v, **args)


def _qk(**kw):
  q, k, v = _arrays()
  args = dict(q=q, k=k, v=v, q_keep=jnp.ones((B, T, N), bool), k_keep=jnp.ones((B, S, N), bool))
  args.update(kw)
  q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
  return scfa_jax.qk_sparse_attention(q, k, v, **args)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: _hash(q=jnp.zeros((B, T, N))), ValueError, r"q must have rank 4.*q.shape=\(2, 10, 3\)"),
        (lambda: _hash(k=jnp.zeros((B, S, N, H, 1))), ValueError, "k must have rank 4"),
        (lambda: _hash(v=jnp.zeros((B, S + 1, N, H))), ValueError, r"k and v must have the same shape"),
        (lambda: _hash(k=jnp.zeros((B + 1, S, N, H)), v=jnp.zeros((B + 1, S, N, H))), ValueError, "agree on B and H"),
        (lambda: _hash(k=jnp.zeros((B, S, N + 1, H)), v=jnp.zeros((B, S, N + 1, H))), ValueError, "K heads dividing"),
        (lambda: _hash(k=jnp.zeros((B, S, N, H + 1)), v=jnp.zeros((B, S, N, H + 1))), ValueError, "agree on B and H"),
        (lambda: _hash(q=jnp.zeros((B, T, N, H), jnp.int32)), TypeError, "q must be float32, float16 or bfloat16"),
        (lambda: _hash(q=jnp.zeros((B, T, N, H), jnp.float16)), TypeError, "must share a dtype"),
        (lambda: _hash(q=np.zeros((B, 0, N, H), np.float32)), ValueError, "empty axis"),
        (lambda: _hash(q=[[1.0]]), TypeError, "q must be an array"),
        (lambda: _hash(q_buckets=jnp.zeros((B, T, N), jnp.float32)), TypeError, "q_buckets must hold integers"),
        (lambda: _hash(k_buckets=jnp.zeros((B, T, N), jnp.int32)), ValueError, r"k_buckets must have shape \[B, S, K\]"),
        (lambda: _hash(q_buckets=jnp.full((B, T, N), -1)), ValueError, "q_buckets must be non-negative"),
        (lambda: _hash(strict="yes"), TypeError, "strict must be a bool"),
        (lambda: _hash(scale=jnp.float32(1.0)[None]), TypeError, "scale must be a Python float"),
        (lambda: _hash(implementation="cuda"), ValueError, "implementation must be one of"),
        (lambda: _qk(q_keep=jnp.ones((B, T, N), jnp.float32)), TypeError, "q_keep must be a bool mask"),
        (lambda: _qk(k_keep=jnp.ones((B, S, N + 1), bool)), ValueError, r"k_keep must have shape \[B, S, K\] = \(2, 12, 3\)"),
        (lambda: _qk(q_keep=jnp.ones((B, T), bool)), ValueError, r"q_keep must have shape \[B, T, N\]"),
    ],
)
def test_bad_input_names_the_argument(call, error, match):
  with pytest.raises(error, match=match):
    call()


def test_sparse_causal_attention_errors():
  q, k, v = _arrays()
  q_idx, k_idx = jnp.zeros((B, T, N), jnp.int32), jnp.zeros((B, S, N), jnp.int32)
  with pytest.raises(ValueError, match="q_hash and k_hash must be given together"):
    scfa_jax.sparse_causal_attention(q, k, v, q_idx=q_idx, k_idx=k_idx, q_hash=q_idx)
  with pytest.raises(TypeError, match="k_idx must hold integers"):
    scfa_jax.sparse_causal_attention(q, k, v, q_idx=q_idx, k_idx=k_idx.astype(jnp.float32))
  with pytest.raises(ValueError, match=r"q_idx must have shape \[B, T, N\]"):
    scfa_jax.sparse_causal_attention(q, k, v, q_idx=k_idx, k_idx=k_idx)


def test_unavailable_triton_is_a_clear_error_on_cpu():
  if jax.default_backend() == "gpu":
    pytest.skip("a GPU is present")
  q = jnp.zeros((B, T, N, 64))  # a head dim the kernels take: the missing GPU is the error
  keep = jnp.ones((B, T, N), bool)
  with pytest.raises(ValueError, match="implementation='triton' needs a CUDA GPU"):
    scfa_jax.qk_sparse_attention(q, q, q, q_keep=keep, k_keep=keep, implementation="triton")
  with pytest.raises(ValueError, match=r"implementation='triton' takes head dims H in \(16, 32, 64, 128\)"):
    _hash(implementation="triton")


def test_arguments_after_arrays_are_keyword_only():
  q, k, v = _arrays()
  with pytest.raises(TypeError, match="positional argument"):
    scfa_jax.qk_sparse_attention(q, k, v, jnp.ones((B, T, N), bool), jnp.ones((B, S, N), bool))  # noqa


def test_lsh_buckets_and_rotations():
  key = jax.random.PRNGKey(0)
  rotations = scfa_jax.random_rotations(key, N, H, 16)
  assert rotations.shape == (N, H, 8)
  x = jax.random.normal(key, (B, T, N, H))
  buckets = scfa_jax.lsh_buckets(x, rotations)
  assert buckets.shape == (B, T, N) and buckets.dtype == jnp.uint8  # the narrowest key for the sort
  assert int(buckets.min()) >= 0 and int(buckets.max()) < 16
  # Angular: scaling a vector keeps its bucket; negating it moves to the paired bucket.
  np.testing.assert_array_equal(scfa_jax.lsh_buckets(3.0 * x, rotations), buckets)
  np.testing.assert_array_equal(scfa_jax.lsh_buckets(-x, rotations), (buckets + 8) % 16)
  with pytest.raises(ValueError, match="num_buckets must be even"):
    scfa_jax.random_rotations(key, N, H, 7)
  with pytest.raises(ValueError, match="num_heads must be a positive int"):
    scfa_jax.random_rotations(key, 0, H, 8)
  with pytest.raises(ValueError, match=r"rotations must be \[N, H, R\]"):
    scfa_jax.lsh_buckets(x, rotations[:, :4])
  with pytest.raises(ValueError, match=r"x must be \[B, T, N, H\]"):
    scfa_jax.lsh_buckets(x[0], rotations)


def test_bucket_dtype_is_the_narrowest_that_holds_the_ids():
  assert scfa_jax.lsh.bucket_dtype(2) == jnp.uint8
  assert scfa_jax.lsh.bucket_dtype(256) == jnp.uint8
  assert scfa_jax.lsh.bucket_dtype(258) == jnp.uint16
  assert scfa_jax.lsh.bucket_dtype(65536) == jnp.uint16
  assert scfa_jax.lsh.bucket_dtype(65538) == jnp.int32
  rotations = scfa_jax.random_rotations(jax.random.PRNGKey(0), N, H, 300)
  assert scfa_jax.lsh_buckets(jax.random.normal(jax.random.PRNGKey(1), (B, T, N, H)), rotations).dtype == jnp.uint16


def test_public_names():
  """`from scfa_jax import *` gives at least the functions and classes of the contract, and
  every name it gives is defined."""
  assert {
      "GPT", "GPTConfig", "SparseCausalSelfAttention", "causal_center", "hash_sparse_attention", "lsh_buckets",
      "qk_sparse_attention", "random_rotations", "sparse_causal_attention",
  } <= set(scfa_jax.__all__)  # fmt: skip
  for name in scfa_jax.__all__:
    assert callable(getattr(scfa_jax, name)), name
