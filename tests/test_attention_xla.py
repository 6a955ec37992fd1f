"""The public functions (XLA backend) against jax.nn.dot_product_attention and the reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scfa_jax
from scfa_jax import reference

# Forward tolerances per input dtype (both sides compute in float32); gradients 2x looser.
TOL = {jnp.float32: 2e-5, jnp.float16: 2e-3, jnp.bfloat16: 2e-2}
IMPL = "xla"


def _qkv(key, b, t, s, n, h, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(key, 3)
  return (
      jax.random.normal(kq, (b, t, n, h), dtype),
      jax.random.normal(kk, (b, s, n, h), dtype),
      jax.random.normal(kv, (b, s, n, h), dtype),
  )


def _close(actual, expected, dtype, factor=1.0):
  tol = TOL[dtype] * factor
  np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32), atol=tol, rtol=tol)


def _check_against(fn, ref, args, dtype, key):
  """Output and q, k, v gradients (random cotangent through jax.vjp) of fn against ref."""

  @jax.jit
  def out_and_grads(f, cotangent, *args):
    out, f_vjp = jax.vjp(f, *args)
    return out, f_vjp(cotangent.astype(out.dtype))

  cotangent = jax.random.normal(key, args[0].shape)
  out, grads = out_and_grads(jax.tree_util.Partial(fn), cotangent, *args)
  expected, expected_grads = out_and_grads(jax.tree_util.Partial(ref), cotangent, *args)
  _close(out, expected, dtype)
  for got, want in zip(grads, expected_grads, strict=True):
    assert bool(jnp.all(jnp.isfinite(got)))
    _close(got, want, dtype, factor=2.0 * np.sqrt(args[0].shape[-1] / 16))


def _jax_nn(q, k, v, mask):
  """jax.nn.dot_product_attention under an explicit mask; rows with no key zeroed."""
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
  has_key = jnp.any(mask, axis=-1)  # [B, N, T]
  return jnp.where(jnp.swapaxes(has_key, 1, 2)[..., None], out, 0.0)


def _buckets(key, shape, num_buckets, skew=None):
  if skew is None:
    return jax.random.randint(key, shape, 0, num_buckets)
  # One bucket holds `skew` of the tokens, the rest spread uniformly.
  k1, k2 = jax.random.split(key)
  return jnp.where(jax.random.uniform(k1, shape) < skew, 0, jax.random.randint(k2, shape, 1, num_buckets))


LENGTHS = [(1, 1), (127, 127), (128, 128), (129, 129), (258, 258), (1000, 1000), (100, 300), (300, 100)]


@pytest.mark.parametrize("t, s", LENGTHS)
@pytest.mark.parametrize("strict", [False, True])
def test_hash_matches_jax_nn_with_mask(t, s, strict):
  key = jax.random.PRNGKey(t * 7 + s)
  b, n, h = 2, 2, 16
  q, k, v = _qkv(key, b, t, s, n, h)
  qb = _buckets(jax.random.fold_in(key, 1), (b, t, n), 3)
  kb = _buckets(jax.random.fold_in(key, 2), (b, s, n), 3)
  mask = reference.allowed_mask(
      jnp.broadcast_to(jnp.arange(t)[None, :, None], qb.shape),
      jnp.broadcast_to(jnp.arange(s)[None, :, None], kb.shape),
      qb, kb, strict=strict,
  )  # fmt: skip
  fn = lambda q, k, v: scfa_jax.hash_sparse_attention(
      q, k, v, q_buckets=qb, k_buckets=kb, strict=strict, implementation=IMPL
  )
  _check_against(fn, lambda q, k, v: _jax_nn(q, k, v, mask), (q, k, v), jnp.float32, key)


@pytest.mark.parametrize("t, s", LENGTHS)
def test_qk_drop_matches_jax_nn_with_mask(t, s):
  key = jax.random.PRNGKey(t * 11 + s)
  b, n, h = 2, 2, 16
  q, k, v = _qkv(key, b, t, s, n, h)
  q_keep = jax.random.bernoulli(jax.random.fold_in(key, 1), 0.6, (b, t, n))
  k_keep = jax.random.bernoulli(jax.random.fold_in(key, 2), 0.6, (b, s, n))
  mask = (
      (jnp.arange(t)[:, None] >= jnp.arange(s)[None, :])
      & jnp.swapaxes(q_keep, 1, 2)[..., :, None]
      & jnp.swapaxes(k_keep, 1, 2)[..., None, :]
  )
  fn = lambda q, k, v: scfa_jax.qk_sparse_attention(q, k, v, q_keep=q_keep, k_keep=k_keep, implementation=IMPL)
  _check_against(fn, lambda q, k, v: _jax_nn(q, k, v, mask), (q, k, v), jnp.float32, key)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("mode", ["hash", "qk"])
def test_dtypes_against_reference(dtype, mode):
  key = jax.random.PRNGKey(3)
  b, t, n, h = 2, 200, 2, 32
  q, k, v = _qkv(key, b, t, t, n, h, dtype)
  if mode == "hash":
    qb = _buckets(jax.random.fold_in(key, 1), (b, t, n), 4)
    kb = _buckets(jax.random.fold_in(key, 2), (b, t, n), 4)
    kw = dict(q_buckets=qb, k_buckets=kb, strict=True)
    fn, ref = scfa_jax.hash_sparse_attention, reference.hash_sparse_attention
  else:
    kw = dict(
        q_keep=jax.random.bernoulli(jax.random.fold_in(key, 1), 0.5, (b, t, n)),
        k_keep=jax.random.bernoulli(jax.random.fold_in(key, 2), 0.5, (b, t, n)),
    )
    fn, ref = scfa_jax.qk_sparse_attention, reference.qk_sparse_attention
  out = fn(q, k, v, **kw, implementation=IMPL)
  assert out.dtype == dtype
  _check_against(
      functools.partial(fn, **kw, implementation=IMPL), functools.partial(ref, **kw), (q, k, v), dtype, key
  )


def test_all_kept_equals_causal_attention():
  key = jax.random.PRNGKey(4)
  q, k, v = _qkv(key, 2, 257, 257, 3, 16)
  keep = jnp.ones((2, 257, 3), bool)
  fn = lambda q, k, v: scfa_jax.qk_sparse_attention(q, k, v, q_keep=keep, k_keep=keep, implementation=IMPL)
  causal = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  _check_against(fn, causal, (q, k, v), jnp.float32, key)


def test_single_bucket_equals_causal_attention():
  key = jax.random.PRNGKey(5)
  q, k, v = _qkv(key, 1, 300, 300, 2, 16)
  one = jnp.full((1, 300, 2), 7, jnp.int32)
  fn = lambda q, k, v: scfa_jax.hash_sparse_attention(q, k, v, q_buckets=one, k_buckets=one, implementation=IMPL)
  causal = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  _check_against(fn, causal, (q, k, v), jnp.float32, key)


@pytest.mark.parametrize("skew", [0.9, None])
def test_uneven_and_singleton_buckets(skew):
  key = jax.random.PRNGKey(6)
  b, t, n, h = 2, 400, 2, 16
  q, k, v = _qkv(key, b, t, t, n, h)
  if skew is None:  # many buckets of size 1 or 0
    qb = jax.random.randint(jax.random.fold_in(key, 1), (b, t, n), 0, 2 * t)
    kb = jax.random.randint(jax.random.fold_in(key, 2), (b, t, n), 0, 2 * t)
  else:
    qb = _buckets(jax.random.fold_in(key, 1), (b, t, n), 8, skew)
    kb = _buckets(jax.random.fold_in(key, 2), (b, t, n), 8, skew)
  kw = dict(q_buckets=qb, k_buckets=kb)
  _check_against(
      functools.partial(scfa_jax.hash_sparse_attention, **kw, implementation=IMPL),
      functools.partial(reference.hash_sparse_attention, **kw),
      (q, k, v), jnp.float32, key,
  )  # fmt: skip


def test_all_queries_dropped_in_one_head():
  key = jax.random.PRNGKey(7)
  b, t, n, h = 2, 150, 3, 16
  q, k, v = _qkv(key, b, t, t, n, h)
  q_keep = jax.random.bernoulli(key, 0.7, (b, t, n)).at[1, :, 2].set(False)
  k_keep = jax.random.bernoulli(jax.random.fold_in(key, 1), 0.7, (b, t, n)).at[0, :, 1].set(False)
  kw = dict(q_keep=q_keep, k_keep=k_keep)
  fn = functools.partial(scfa_jax.qk_sparse_attention, **kw, implementation=IMPL)
  out = fn(q, k, v)
  assert bool(jnp.all(out[1, :, 2] == 0)) and bool(jnp.all(out[0, :, 1] == 0))
  _check_against(fn, functools.partial(reference.qk_sparse_attention, **kw), (q, k, v), jnp.float32, key)


@pytest.mark.parametrize("hashed", [False, True])
@pytest.mark.parametrize("strict", [False, True])
def test_permuted_positions_any_order(hashed, strict):
  """sparse_causal_attention is exact for any token order (sorting only makes it fast)."""
  key = jax.random.PRNGKey(8)
  b, t, s, n, h = 2, 190, 170, 2, 16
  q, k, v = _qkv(key, b, t, s, n, h)
  perm = lambda kk, length: jnp.stack([jax.random.permutation(jax.random.fold_in(kk, i), length) for i in range(b * n)])
  q_idx = jnp.transpose(perm(jax.random.fold_in(key, 1), t).reshape(b, n, t), (0, 2, 1))
  k_idx = jnp.transpose(perm(jax.random.fold_in(key, 2), s).reshape(b, n, s), (0, 2, 1))
  q_idx = jnp.where(jax.random.bernoulli(jax.random.fold_in(key, 3), 0.1, q_idx.shape), -1, q_idx)
  k_idx = jnp.where(jax.random.bernoulli(jax.random.fold_in(key, 4), 0.1, k_idx.shape), 2**30, k_idx)
  kw = dict(q_idx=q_idx, k_idx=k_idx, strict=strict)
  if hashed:
    kw.update(
        q_hash=jax.random.randint(jax.random.fold_in(key, 5), (b, t, n), 0, 3),
        k_hash=jax.random.randint(jax.random.fold_in(key, 6), (b, s, n), 0, 3),
    )
  _check_against(
      functools.partial(scfa_jax.sparse_causal_attention, **kw, implementation=IMPL),
      functools.partial(reference.sparse_causal_attention, **kw),
      (q, k, v), jnp.float32, key,
  )  # fmt: skip


def test_empty_rows_are_exactly_zero_with_finite_gradients():
  """Under strict causality the first token of each bucket has no key."""
  key = jax.random.PRNGKey(9)
  b, t, n, h = 1, 64, 2, 16
  q, k, v = _qkv(key, b, t, t, n, h)
  buckets = jax.random.randint(key, (b, t, n), 0, 4)
  fn = lambda q, k, v: scfa_jax.hash_sparse_attention(
      q, k, v, q_buckets=buckets, k_buckets=buckets, strict=True, implementation=IMPL
  )
  out = fn(q, k, v)
  first = np.zeros((b, t, n), bool)
  bk = np.asarray(buckets)
  for n_ in range(n):
    for bucket in np.unique(bk[0, :, n_]):
      first[0, np.argmax(bk[0, :, n_] == bucket), n_] = True
  assert first.sum() >= 2
  assert bool(jnp.all(jnp.asarray(out)[first] == 0.0))
  grads = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2))(q, k, v)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
  assert bool(jnp.all(grads[0][first] == 0.0))


def test_jit_grad_compose_and_bitwise_determinism():
  key = jax.random.PRNGKey(10)
  b, t, n, h = 2, 200, 2, 16
  q, k, v = _qkv(key, b, t, t, n, h)
  qb = jax.random.randint(jax.random.fold_in(key, 1), (b, t, n), 0, 4)
  kb = jax.random.randint(jax.random.fold_in(key, 2), (b, t, n), 0, 4)

  @jax.jit
  def loss_and_grads(q, k, v, qb, kb):
    loss = lambda q, k, v: jnp.sum(
        jnp.sin(scfa_jax.hash_sparse_attention(q, k, v, q_buckets=qb, k_buckets=kb, implementation=IMPL))
    )
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

  first = loss_and_grads(q, k, v, qb, kb)
  second = loss_and_grads(q, k, v, qb, kb)
  for x, y in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
    assert np.array_equal(np.asarray(x), np.asarray(y))
  ref = jax.value_and_grad(
      lambda q, k, v: jnp.sum(jnp.sin(reference.hash_sparse_attention(q, k, v, q_buckets=qb, k_buckets=kb))),
      argnums=(0, 1, 2),
  )(q, k, v)
  for x, y in zip(jax.tree.leaves(first), jax.tree.leaves(ref), strict=True):
    _close(x, y, jnp.float32, factor=10.0)


def test_vmap_over_an_extra_batch_axis():
  key = jax.random.PRNGKey(11)
  q, k, v = _qkv(key, 3 * 2, 70, 70, 2, 16)
  q, k, v = (x.reshape(3, 2, 70, 2, 16) for x in (q, k, v))
  keep = jax.random.bernoulli(key, 0.5, (3, 2, 70, 2))
  fn = lambda q, k, v, keep: scfa_jax.qk_sparse_attention(q, k, v, q_keep=keep, k_keep=keep, implementation=IMPL)
  out = jax.vmap(fn)(q, k, v, keep)
  want = jnp.stack([reference.qk_sparse_attention(q[i], k[i], v[i], q_keep=keep[i], k_keep=keep[i]) for i in range(3)])
  _close(out, want, jnp.float32)


def test_default_implementation_on_cpu_is_xla():
  key = jax.random.PRNGKey(12)
  q, k, v = _qkv(key, 1, 50, 50, 2, 16)
  keep = jnp.ones((1, 50, 2), bool)
  out = scfa_jax.qk_sparse_attention(q, k, v, q_keep=keep, k_keep=keep)
  want = scfa_jax.qk_sparse_attention(q, k, v, q_keep=keep, k_keep=keep, implementation="xla")
  assert np.array_equal(np.asarray(out), np.asarray(want))


def test_default_implementation_warns_when_a_gpu_falls_back_to_xla(monkeypatch):
  """A GPU without jax-triton (or with a head dim the kernels do not tile) gets the XLA backend,
  with a warning that says why; a CPU gets it silently."""
  import warnings  # noqa: PLC0415

  from scfa_jax import triton_backend  # noqa: PLC0415

  q = jnp.zeros((1, 8, 2, 64))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert not triton_backend.default_available(q)  # this machine: a CPU, no warning
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")

  def missing():
    raise ImportError("No module named 'jax_triton'")

  monkeypatch.setattr(triton_backend, "import_jax_triton", missing)
  with pytest.warns(RuntimeWarning, match=r"jax-triton could not be imported .*pip install 'scfa-jax\[gpu\]'"):
    assert not triton_backend.default_available(q)
  with pytest.warns(RuntimeWarning, match="head dims"):
    assert not triton_backend.default_available(jnp.zeros((1, 8, 2, 48)))


def run_shard_map_check(implementation: str, check_vma: bool) -> None:
  """Hash attention and its gradient under shard_map over B on 4 virtual CPU devices."""
  import subprocess
  import sys
  import textwrap

  script = textwrap.dedent(
      f"""
      import os
      os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import PartitionSpec as P
      import scfa_jax
      from scfa_jax import reference
      mesh = jax.make_mesh((4,), ("data",))
      q, k, v = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 96, 2, 16))
      buckets = jax.random.randint(jax.random.PRNGKey(1), (8, 96, 2), 0, 4)
      batch = jax.sharding.NamedSharding(mesh, P("data"))
      q, k, v, buckets = (jax.device_put(x, batch) for x in (q, k, v, buckets))
      attn = lambda q, k, v, b: scfa_jax.hash_sparse_attention(
          q, k, v, q_buckets=b, k_buckets=b, strict=True, implementation={implementation!r})
      with jax.set_mesh(mesh):
        sharded = jax.jit(jax.shard_map(
            attn, mesh=mesh, in_specs=P("data"), out_specs=P("data"), check_vma={check_vma}))
        grad = jax.jit(jax.grad(lambda q: jnp.sum(sharded(q, k, v, buckets) ** 2)))
        out = sharded(q, k, v, buckets)
        want = reference.hash_sparse_attention(q, k, v, q_buckets=buckets, k_buckets=buckets, strict=True)
        np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
        want_grad = jax.grad(lambda q: jnp.sum(reference.hash_sparse_attention(
            q, k, v, q_buckets=buckets, k_buckets=buckets, strict=True) ** 2))(q)
        np.testing.assert_allclose(grad(q), want_grad, atol=1e-4, rtol=1e-4)
        assert len(out.sharding.device_set) == 4
      print("ok")
      """
  )
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
  assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_shard_map_over_the_batch_axis():
  run_shard_map_check("xla", check_vma=True)


def test_tma_tf32_defined_where_triton_lacks_it(monkeypatch):
  """jax-triton 0.4 stubs out its CUDA backend when triton's driver has no TMA_TF32 (triton 3.6)."""
  driver = pytest.importorskip("triton.backends.nvidia.driver")
  from scfa_jax import triton_backend  # noqa: PLC0415

  monkeypatch.delattr(driver, "TMA_TF32", raising=False)
  triton_backend._define_tma_tf32()
  assert driver.TMA_TF32 == 0
  monkeypatch.setattr(driver, "TMA_TF32", 7, raising=False)
  triton_backend._define_tma_tf32()
  assert driver.TMA_TF32 == 7  # a triton that has it keeps its own value
