"""Grouped-query and multi-query attention: k and v with K heads, K dividing q's N heads.

Query head n reads kv head n // (N // K); key masks and buckets are [B, S, K]. Every case is
checked against the dense reference (which repeats k and v inside the oracle) and against
the N-head path on explicitly repeated k, v and key masks, whose dK and dV summed over each
group must equal ours. Groups of 1 (K = N), 4, and N (K = 1, multi-query).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scfa_jax
from scfa_jax import reference
from tests.test_attention_xla import _check_against, _close

H = 16
# (N, K): groups of 1, 4 and N (multi-query).
XLA_HEADS = [(8, 8), (8, 2), (8, 1)]
INTERPRET_HEADS = [(4, 4), (4, 1)]


def _qkv(key, b, t, s, n, kv_heads, h=H, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(key, 3)
  return (
      jax.random.normal(kq, (b, t, n, h), dtype),
      jax.random.normal(kk, (b, s, kv_heads, h), dtype),
      jax.random.normal(kv, (b, s, kv_heads, h), dtype),
  )


def _masks(key, mode, b, t, s, n, kv_heads):
  """Keyword arguments of the mode's function: query masks [B, T, N], key masks [B, S, K]."""
  k1, k2 = jax.random.split(key)
  if mode == "hash":
    return dict(q_buckets=jax.random.randint(k1, (b, t, n), 0, 3), k_buckets=jax.random.randint(k2, (b, s, kv_heads), 0, 3))
  return dict(
      q_keep=jax.random.bernoulli(k1, 0.7, (b, t, n)), k_keep=jax.random.bernoulli(k2, 0.7, (b, s, kv_heads))
  )


_FUNCTIONS = {
    "hash": (scfa_jax.hash_sparse_attention, reference.hash_sparse_attention),
    "qk": (scfa_jax.qk_sparse_attention, reference.qk_sparse_attention),
}


def _check_mode(implementation, mode, b, t, s, n, kv_heads, strict, seed):
  key = jax.random.PRNGKey(seed)
  q, k, v = _qkv(key, b, t, s, n, kv_heads)
  kw = _masks(jax.random.fold_in(key, 1), mode, b, t, s, n, kv_heads)
  if mode == "hash":
    kw["strict"] = strict
  fn, ref = _FUNCTIONS[mode]
  _check_against(
      functools.partial(fn, **kw, implementation=implementation), functools.partial(ref, **kw), (q, k, v),
      jnp.float32, key,
  )  # fmt: skip


@pytest.mark.parametrize("n, kv_heads", XLA_HEADS)
@pytest.mark.parametrize("t, s, strict", [(129, 129, True), (100, 61, False), (61, 100, True)])
def test_xla_hash_against_reference(n, kv_heads, t, s, strict):
  _check_mode("xla", "hash", 2, t, s, n, kv_heads, strict, seed=t + s + n + kv_heads)


@pytest.mark.parametrize("n, kv_heads", XLA_HEADS)
def test_xla_qk_drop_against_reference(n, kv_heads):
  _check_mode("xla", "qk", 2, 137, 137, n, kv_heads, False, seed=n + kv_heads)


@pytest.mark.parametrize("n, kv_heads", INTERPRET_HEADS)
@pytest.mark.parametrize("mode, t, s, strict", [("hash", 37, 37, True), ("hash", 61, 40, False), ("qk", 40, 61, False)])
def test_interpret_against_reference(n, kv_heads, mode, t, s, strict):
  pytest.importorskip("torch", reason="the interpreter's tensors")
  pytest.importorskip("triton")
  _check_mode("interpret", mode, 1, t, s, n, kv_heads, strict, seed=3 * t + s + kv_heads)


def _repeat(x, group):
  return jnp.repeat(x, group, axis=2)


@pytest.mark.parametrize("implementation", ["xla", "interpret"])
@pytest.mark.parametrize("hashed", [False, True])
def test_primitive_equals_the_n_head_path_on_repeated_kv(implementation, hashed):
  """sparse_causal_attention in a caller's order (the bounding-box plan), K = N / 4: output and dQ
  equal those of the N-head call on repeated k, v, k_idx, k_hash, and dK, dV its gradients
  summed over each group, to rounding."""
  if implementation == "interpret":
    pytest.importorskip("torch", reason="the interpreter's tensors")
    pytest.importorskip("triton")
  key = jax.random.PRNGKey(17 + hashed)
  b, t, s, n, kv_heads = 1, 45, 52, 4, 1
  group = n // kv_heads
  q, k, v = _qkv(key, b, t, s, n, kv_heads)
  q_idx = jnp.where(jax.random.bernoulli(key, 0.1, (b, t, n)), -1, jax.random.randint(key, (b, t, n), 0, 60))
  k_idx = jnp.where(
      jax.random.bernoulli(jax.random.fold_in(key, 1), 0.1, (b, s, kv_heads)),
      2**30, jax.random.randint(jax.random.fold_in(key, 2), (b, s, kv_heads), 0, 60),
  )  # fmt: skip
  kw = dict(q_idx=q_idx, k_idx=k_idx, strict=hashed)
  if hashed:
    kw.update(q_hash=q_idx % 2, k_hash=k_idx % 2)
  repeated = {name: _repeat(x, group) if name.startswith("k_") else x for name, x in kw.items()}
  ours = functools.partial(scfa_jax.sparse_causal_attention, **kw, implementation=implementation)
  heads = functools.partial(scfa_jax.sparse_causal_attention, **repeated, implementation=implementation)
  cotangent = jax.random.normal(jax.random.fold_in(key, 3), q.shape)
  out, vjp = jax.vjp(ours, q, k, v)
  want, want_vjp = jax.vjp(heads, q, _repeat(k, group), _repeat(v, group))
  dq, dk, dv = vjp(cotangent)
  want_dq, want_dk, want_dv = want_vjp(cotangent)
  _close(out, want, jnp.float32)
  _close(dq, want_dq, jnp.float32)
  summed = lambda x: jnp.sum(x.reshape(b, s, kv_heads, group, H), axis=3)
  _close(dk, summed(want_dk), jnp.float32)
  _close(dv, summed(want_dv), jnp.float32)
  assert dk.shape == dv.shape == k.shape


def test_interpret_gqa_is_bitwise_deterministic_and_empty_rows_are_zero():
  """dK/dV of a kv head accumulate its group's query heads in one program, in a fixed order:
  two runs agree bit for bit. Rows with no key (strict: each bucket's first query) give 0."""
  pytest.importorskip("torch", reason="the interpreter's tensors")
  pytest.importorskip("triton")
  key = jax.random.PRNGKey(23)
  b, t, n, kv_heads = 1, 48, 4, 2
  q, k, v = _qkv(key, b, t, t, n, kv_heads)
  kw = _masks(key, "hash", b, t, t, n, kv_heads)
  attend = functools.partial(scfa_jax.hash_sparse_attention, **kw, strict=True, implementation="interpret")
  loss = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v) ** 2), argnums=(0, 1, 2)))
  first, second = loss(q, k, v), loss(q, k, v)
  for x, y in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
    assert np.array_equal(np.asarray(x), np.asarray(y))
  mask = reference.allowed_mask(
      jnp.broadcast_to(jnp.arange(t)[None, :, None], (b, t, n)),
      jnp.broadcast_to(jnp.arange(t)[None, :, None], (b, t, kv_heads)),
      kw["q_buckets"], kw["k_buckets"], strict=True,
  )  # fmt: skip
  no_key = ~np.asarray(jnp.any(mask, axis=-1)).swapaxes(1, 2)
  assert no_key.sum() >= 2
  assert np.all(np.asarray(attend(q, k, v))[no_key] == 0.0)


@pytest.mark.parametrize("strict", [False, True])
def test_plan_kernel_pairs_each_query_head_with_its_kv_head(strict):
  """kernels/plan.py on tokens with N = 6 query heads and K = 2 or 3 kv heads gives the jnp
  plan's ranges exactly, both views."""
  pytest.importorskip("torch", reason="the interpreter's tensors")
  pytest.importorskip("triton")
  from scfa_jax import sorting  # noqa: PLC0415
  from tests.plan_kernel_check import check_plan_kernel  # noqa: PLC0415

  rng = np.random.default_rng(5)
  cases = [
      sorting.by_bucket(jnp.asarray(rng.integers(0, 3, (2, 70, 6))), jnp.asarray(rng.integers(0, 3, (2, 53, 2)))),
      sorting.by_keep_mask(jnp.asarray(rng.random((1, 53, 6)) < 0.6), jnp.asarray(rng.random((1, 70, 3)) < 0.6)),
  ]
  for tokens in cases:
    check_plan_kernel("interpret", tokens, [(16, 32)], strict)


def test_plans_pair_each_query_head_with_its_kv_head():
  """The tile plan of GQA tokens is that of the tokens with the key side repeated per query head."""
  from scfa_jax import plan as plan_lib  # noqa: PLC0415
  from scfa_jax import sorting  # noqa: PLC0415

  rng = np.random.default_rng(6)
  q_buckets, k_buckets = jnp.asarray(rng.integers(0, 3, (2, 70, 6))), jnp.asarray(rng.integers(0, 3, (2, 53, 2)))
  grouped = sorting.by_bucket(q_buckets, k_buckets)
  assert grouped.k_perm.shape == (2, 2, 53) and grouped.q_perm.shape == (2, 6, 70)
  repeated = sorting.by_bucket(q_buckets, _repeat(k_buckets, 3))
  for ordered in (True, False):
    tokens = [grouped, repeated] if ordered else [
        sorting.presorted(jnp.swapaxes(x.q_idx, 1, 2), jnp.swapaxes(x.k_idx, 1, 2),
                          jnp.swapaxes(x.q_hash, 1, 2), jnp.swapaxes(x.k_hash, 1, 2)) for x in (grouped, repeated)
    ]  # fmt: skip
    got, want = (plan_lib.make_plan(x, block_q=16, block_k=32, strict=True) for x in tokens)
    for view in ("q", "k"):
      np.testing.assert_array_equal(got.to_dense(view), want.to_dense(view))


@pytest.mark.parametrize(
    "k_heads, masks, match",
    [
        (3, {}, r"k and v must have K heads dividing q's N heads, got q.shape=\(1, 8, 4, 16\), k.shape=\(1, 8, 3, 16\)"),
        (2, {"k_buckets": (1, 8, 4)}, r"k_buckets must have shape \[B, S, K\] = \(1, 8, 2\), got k_buckets.shape=\(1, 8, 4\)"),
        (2, {"q_buckets": (1, 8, 2)}, r"q_buckets must have shape \[B, T, N\] = \(1, 8, 4\)"),
    ],
)
def test_bad_head_counts_name_the_argument(k_heads, masks, match):
  q = jnp.zeros((1, 8, 4, H))
  k = jnp.zeros((1, 8, k_heads, H))
  shapes = {"q_buckets": (1, 8, 4), "k_buckets": (1, 8, k_heads)} | masks
  buckets = {name: jnp.zeros(shape, jnp.int32) for name, shape in shapes.items()}
  with pytest.raises(ValueError, match=match):
    scfa_jax.hash_sparse_attention(q, k, k, **buckets)


def test_k_and_v_head_counts_must_agree():
  q = jnp.zeros((1, 8, 4, H))
  keep = dict(q_keep=jnp.ones((1, 8, 4), bool), k_keep=jnp.ones((1, 8, 2), bool))
  with pytest.raises(ValueError, match=r"k and v must have the same shape, got k.shape=\(1, 8, 2, 16\), v.shape=\(1, 8, 1, 16\)"):
    scfa_jax.qk_sparse_attention(q, jnp.zeros((1, 8, 2, H)), jnp.zeros((1, 8, 1, H)), **keep)
  with pytest.raises(ValueError, match=r"k_keep must have shape \[B, S, K\] = \(1, 8, 2\)"):
    scfa_jax.qk_sparse_attention(q, jnp.zeros((1, 8, 2, H)), jnp.zeros((1, 8, 2, H)), **keep | {"k_keep": keep["q_keep"]})
  idx = jnp.zeros((1, 8, 4), jnp.int32)
  with pytest.raises(ValueError, match=r"k_idx must have shape \[B, S, K\] = \(1, 8, 1\)"):
    scfa_jax.sparse_causal_attention(q, jnp.zeros((1, 8, 1, H)), jnp.zeros((1, 8, 1, H)), q_idx=idx, k_idx=idx)
