"""The Triton kernels on a GPU against the float32 reference (pytest -m gpu)."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scfa_jax
from scfa_jax import reference
from tests.lsh_check import check_buckets
from tests.plan_kernel_check import check_plan_kernel, plan_kernel_cases

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        jax.default_backend() != "gpu" or os.environ.get("TRITON_INTERPRET") == "1", reason="needs a CUDA GPU"
    ),
]

# Relative error ||ours - ref|| / ||ref|| per input dtype; gradients get 2x.
REL_TOL = {jnp.float32: 1e-5, jnp.float16: 2e-3, jnp.bfloat16: 1.6e-2}


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _inputs(key, b, t, n, h, dtype):
  return [jax.random.normal(jax.random.fold_in(key, i), (b, t, n, h), dtype) for i in range(3)]


def _masks(key, mode, b, t, n, param):
  k1, k2 = jax.random.split(key)
  if mode == "hash":
    if param == "skew":  # one bucket with 90% of the tokens, the rest mostly singletons
      pick = lambda kk: jnp.where(jax.random.uniform(kk, (b, t, n)) < 0.9, 0, jax.random.randint(kk, (b, t, n), 1, 10 * t))
      return dict(q_buckets=pick(k1), k_buckets=pick(k2))
    return dict(q_buckets=jax.random.randint(k1, (b, t, n), 0, param), k_buckets=jax.random.randint(k2, (b, t, n), 0, param))
  return dict(
      q_keep=jax.random.bernoulli(k1, 1 - param, (b, t, n)), k_keep=jax.random.bernoulli(k2, 1 - param, (b, t, n))
  )


def _fns(mode, masks, strict):
  if mode == "hash":
    ours = functools.partial(scfa_jax.hash_sparse_attention, **masks, strict=strict)
    oracle = functools.partial(reference.hash_sparse_attention, **masks, strict=strict)
  else:
    ours = functools.partial(scfa_jax.qk_sparse_attention, **masks)
    oracle = functools.partial(reference.qk_sparse_attention, **masks)
  return ours, oracle


def _out_and_grads(fn, q, k, v, ct):
  out, vjp = jax.vjp(fn, q, k, v)
  return out, vjp(ct.astype(out.dtype))


CASES = [
    # (dtype, H, T, mode, param, strict)
    (jnp.bfloat16, 64, 1, "hash", 4, False),
    (jnp.bfloat16, 64, 258, "hash", 4, True),
    (jnp.bfloat16, 128, 4097, "hash", 16, False),
    (jnp.float16, 64, 4097, "hash", "skew", True),
    (jnp.float32, 64, 1000, "hash", 8, True),
    (jnp.float32, 128, 258, "qk", 0.3, False),
    (jnp.bfloat16, 64, 4097, "qk", 0.0, False),
    (jnp.bfloat16, 128, 2048, "qk", 0.9, False),
    (jnp.float16, 64, 777, "qk", 1.0, False),
    (jnp.bfloat16, 64, 2048, "qk", 0.3, False),
    (jnp.bfloat16, 32, 1000, "qk", 0.3, True),  # H=32 and H=16 have their own QK forward tiles
    (jnp.float16, 16, 4097, "qk", 0.0, False),
    (jnp.bfloat16, 32, 777, "hash", 8, False),
]


@pytest.mark.parametrize("dtype, h, t, mode, param, strict", CASES)
def test_against_float32_reference(dtype, h, t, mode, param, strict):
  key = jax.random.PRNGKey(t + h)
  b, n = 2, 3
  q, k, v = _inputs(key, b, t, n, h, dtype)
  masks = _masks(jax.random.fold_in(key, 9), mode, b, t, n, param)
  ours, oracle = _fns(mode, masks, strict)
  ct = jax.random.normal(jax.random.fold_in(key, 10), q.shape, jnp.float32)
  out, grads = jax.jit(functools.partial(_out_and_grads, functools.partial(ours, implementation="triton")))(q, k, v, ct)
  up = lambda x: x.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):  # JAX's float32 default on GPU is TF32
    ref_out, ref_grads = jax.jit(functools.partial(_out_and_grads, oracle))(up(q), up(k), up(v), ct)
  assert out.dtype == dtype
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in (out, *grads))
  tol = REL_TOL[dtype]
  assert _rel(out, ref_out) < tol
  for name, got, want in zip("qkv", grads, ref_grads, strict=True):
    assert _rel(got, want) < 2 * tol, f"d{name}"


@pytest.mark.parametrize("mode", ["hash", "qk"])
def test_float32_precision_follows_default_matmul_precision(mode):
  """Float32 inputs: IEEE products by default and under "highest"; TF32 under "tensorfloat32",
  whose error is TF32's (10-bit mantissa) and above the IEEE tolerance."""
  key = jax.random.PRNGKey(7)
  q, k, v = _inputs(key, 2, 777, 3, 64, jnp.float32)
  masks = _masks(jax.random.fold_in(key, 1), mode, 2, 777, 3, 8 if mode == "hash" else 0.3)
  ours, oracle = _fns(mode, masks, False)
  with jax.default_matmul_precision("highest"):
    want = jax.jit(oracle)(q, k, v)
  errors = {}
  for precision in (None, "highest", "tensorfloat32"):
    with jax.default_matmul_precision(precision):
      errors[precision] = _rel(jax.jit(functools.partial(ours, implementation="triton"))(q, k, v), want)
  assert errors[None] < REL_TOL[jnp.float32] and errors["highest"] < REL_TOL[jnp.float32], errors
  assert REL_TOL[jnp.float32] < errors["tensorfloat32"] < 2e-3, errors


@pytest.mark.parametrize("t", [8192, 16384])
def test_long_sequences_against_xla_backend(t):
  key = jax.random.PRNGKey(t)
  b, n, h = 1, 2, 64
  q, k, v = _inputs(key, b, t, n, h, jnp.bfloat16)
  masks = _masks(jax.random.fold_in(key, 1), "hash", b, t, n, 16)
  ours, _ = _fns("hash", masks, True)
  ct = jax.random.normal(key, q.shape, jnp.float32)
  run = lambda impl, *a: jax.jit(functools.partial(_out_and_grads, functools.partial(ours, implementation=impl)))(*a, ct)
  out, grads = run("triton", q, k, v)
  up = lambda x: x.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    ref_out, ref_grads = run("xla", up(q), up(k), up(v))
  assert _rel(out, ref_out) < REL_TOL[jnp.bfloat16]
  for got, want in zip(grads, ref_grads, strict=True):
    assert _rel(got, want) < 2 * REL_TOL[jnp.bfloat16]


def test_empty_rows_zero_and_bitwise_deterministic():
  key = jax.random.PRNGKey(0)
  b, t, n, h = 2, 3000, 4, 64
  q, k, v = _inputs(key, b, t, n, h, jnp.bfloat16)
  buckets = jax.random.randint(key, (b, t, n), 0, 64)
  fn = jax.jit(
      jax.value_and_grad(
          lambda q, k, v: jnp.sum(
              scfa_jax.hash_sparse_attention(q, k, v, q_buckets=buckets, k_buckets=buckets, strict=True).astype(jnp.float32) ** 2
          ),
          argnums=(0, 1, 2),
      )
  )
  first, second = fn(q, k, v), fn(q, k, v)
  for x, y in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
    assert np.array_equal(np.asarray(x), np.asarray(y))
  out = scfa_jax.hash_sparse_attention(q, k, v, q_buckets=buckets, k_buckets=buckets, strict=True)
  ref = reference.hash_sparse_attention(q[:, :512], k[:, :512], v[:, :512], q_buckets=buckets[:, :512], k_buckets=buckets[:, :512], strict=True)
  empty = ~np.asarray(jnp.any(reference.allowed_mask(
      jnp.broadcast_to(jnp.arange(512)[None, :, None], (b, 512, n)), jnp.broadcast_to(jnp.arange(512)[None, :, None], (b, 512, n)),
      buckets[:, :512], buckets[:, :512], strict=True), axis=-1)).swapaxes(1, 2)  # fmt: skip
  assert empty.sum() > 0
  assert np.all(np.asarray(out[:, :512], np.float32)[empty] == 0.0)
  assert _rel(out[:, :512], ref) < REL_TOL[jnp.bfloat16]


def test_default_implementation_is_triton_and_shard_map_works():
  key = jax.random.PRNGKey(1)
  b, t, n, h = jax.device_count() * 2, 512, 2, 64
  q, k, v = _inputs(key, b, t, n, h, jnp.bfloat16)
  keep = jax.random.bernoulli(key, 0.5, (b, t, n))
  default = scfa_jax.qk_sparse_attention(q, k, v, q_keep=keep, k_keep=keep)
  explicit = scfa_jax.qk_sparse_attention(q, k, v, q_keep=keep, k_keep=keep, implementation="triton")
  assert np.array_equal(np.asarray(default), np.asarray(explicit))
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  P = jax.sharding.PartitionSpec
  batch = jax.sharding.NamedSharding(mesh, P("data"))
  args = [jax.device_put(x, batch) for x in (q, k, v, keep)]
  with jax.set_mesh(mesh):
    attn = lambda q, k, v, keep: scfa_jax.qk_sparse_attention(q, k, v, q_keep=keep, k_keep=keep)
    sharded = jax.jit(jax.shard_map(attn, mesh=mesh, in_specs=P("data"), out_specs=P("data"), check_vma=False))
    grads = jax.jit(jax.grad(lambda q: jnp.sum(sharded(q, *args[1:]).astype(jnp.float32))))(args[0])
    out = sharded(*args)
  assert _rel(out, explicit) < 1e-6
  assert bool(jnp.all(jnp.isfinite(grads)))


@pytest.mark.parametrize("strict", [False, True])
def test_plan_kernel_matches_the_jnp_plan(strict):
  """kernels/plan.py as the GPU compiles it, at the tile table's shapes and a long side
  (several programs per head)."""
  for tokens in plan_kernel_cases(long=20000):
    check_plan_kernel("triton", tokens, [(64, 32), (32, 64), (128, 64), (32, 128), (16, 16), (1, 1)], strict)


@pytest.mark.parametrize("documents", [False, True])
def test_lsh_kernels_pick_the_argmax(documents):
  """kernels/lsh.py on bf16 inputs, several chunks per head, against the argmax of the
  float32 centered projections: a bucket may differ only at a near-tie (the kernels' TF32
  products, as XLA's default float32 product), and two calls agree bit for bit."""
  b, t, n, h = 2, 3001, 4, 64
  key = jax.random.PRNGKey(2)
  x = (jax.random.normal(key, (b, t, n, h)) + 0.5).astype(jnp.bfloat16)
  rotations = scfa_jax.random_rotations(jax.random.fold_in(key, 1), n, h, 16)
  seg = jnp.cumsum(jax.random.bernoulli(key, 0.002, (b, t)), axis=1).astype(jnp.int32) if documents else None
  fn = jax.jit(lambda x, seg: scfa_jax.centered_buckets(x, rotations, seg))
  got = fn(x, seg)
  assert np.array_equal(np.asarray(got), np.asarray(fn(x, seg)))
  near_ties = check_buckets(got, x, rotations, seg, tolerance=4e-3)
  assert near_ties < 0.01
  xla = scfa_jax.centered_buckets(x, rotations, seg, implementation="xla")
  assert np.mean(np.asarray(got) == np.asarray(xla)) > 0.98
