"""The Triton kernels in Triton's CPU interpreter (implementation="interpret") against the
reference: the whole custom_vjp path, forward and backward, on small shapes with
several 16-wide tiles, odd lengths and T != S. float32 and float16 only: the interpreter
computes bfloat16 dots wrongly. The same kernels run on GPUs in test_kernels_gpu.py."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scfa_jax
from scfa_jax import reference
from tests.plan_kernel_check import check_plan_kernel, plan_kernel_cases
from tests.test_attention_xla import _buckets, _check_against, _close, _qkv, run_shard_map_check

pytest.importorskip("torch", reason="the interpreter's tensors")
pytest.importorskip("triton")
IMPL = "interpret"
H = 16


@pytest.mark.parametrize("t, s", [(1, 1), (37, 37), (129, 129), (100, 61), (61, 100)])
@pytest.mark.parametrize("strict", [False, True])
def test_hash(t, s, strict):
  key = jax.random.PRNGKey(t + 3 * s + strict)
  b, n = 2, 2
  q, k, v = _qkv(key, b, t, s, n, H)
  kw = dict(
      q_buckets=_buckets(jax.random.fold_in(key, 1), (b, t, n), 3),
      k_buckets=_buckets(jax.random.fold_in(key, 2), (b, s, n), 3),
      strict=strict,
  )
  _check_against(
      functools.partial(scfa_jax.hash_sparse_attention, **kw, implementation=IMPL),
      functools.partial(reference.hash_sparse_attention, **kw),
      (q, k, v), jnp.float32, key,
  )  # fmt: skip


@pytest.mark.parametrize("drop_rate", [0.0, 0.3, 0.9, 1.0])
def test_qk_drop(drop_rate):
  key = jax.random.PRNGKey(int(drop_rate * 10))
  b, t, s, n = 2, 77, 90, 2
  q, k, v = _qkv(key, b, t, s, n, H)
  kw = dict(
      q_keep=jax.random.bernoulli(jax.random.fold_in(key, 1), 1 - drop_rate, (b, t, n)),
      k_keep=jax.random.bernoulli(jax.random.fold_in(key, 2), 1 - drop_rate, (b, s, n)),
  )
  _check_against(
      functools.partial(scfa_jax.qk_sparse_attention, **kw, implementation=IMPL),
      functools.partial(reference.qk_sparse_attention, **kw),
      (q, k, v), jnp.float32, key,
  )  # fmt: skip


@pytest.mark.parametrize("scale", [-0.3, 0.0, 0.7])
def test_any_scale_sign(scale):
  """The forward takes the row max before scaling only for positive scales (max(c s) = c max(s)
  needs c > 0); a negative or zero scale must take the other path and still be right."""
  key = jax.random.PRNGKey(5)
  b, t, n = 2, 70, 2
  q, k, v = _qkv(key, b, t, t, n, H)
  kw = dict(q_buckets=_buckets(jax.random.fold_in(key, 1), (b, t, n), 2), scale=scale)
  kw["k_buckets"] = kw["q_buckets"]
  _check_against(
      functools.partial(scfa_jax.hash_sparse_attention, **kw, implementation=IMPL),
      functools.partial(reference.hash_sparse_attention, **kw),
      (q, k, v), jnp.float32, key,
  )  # fmt: skip


def _with_table_fields(q, k, v, tokens, cotangent, table, strict=False, **fields):
  """O, dQ, dK, dV through the kernels, with `table`'s KernelConfig fields replaced by `fields`."""
  import dataclasses  # noqa: PLC0415

  from scfa_jax import core  # noqa: PLC0415

  kernel = dataclasses.replace(table, **fields)
  config = core.AttentionConfig(implementation=IMPL, strict=strict, scale=H**-0.5, kernel=kernel)
  out, vjp = jax.vjp(lambda q, k, v: core.attention(q, k, v, tokens, config), q, k, v)
  return [np.asarray(x) for x in (out, *vjp(cotangent))]


@pytest.mark.parametrize("hashed", [False, True])
def test_row_addressing_changes_no_bit(hashed, monkeypatch):
  """prefetch_rows (each tile loop reads the next tile's permutation a step ahead) and the
  64-bit row offsets of arrays with 2**31 elements or more (WIDE, forced here on small ones)
  change only how rows are addressed: outputs and gradients equal the table's bit for bit."""
  import dataclasses  # noqa: PLC0415

  from scfa_jax import core, sorting, triton_backend  # noqa: PLC0415

  key = jax.random.PRNGKey(12)
  b, t, n = 2, 83, 2
  q, k, v = _qkv(key, b, t, t, n, H)
  rng = np.random.default_rng(4)
  if hashed:
    tokens = sorting.by_bucket(jnp.asarray(rng.integers(0, 3, (b, t, n))), jnp.asarray(rng.integers(0, 3, (b, t, n))))
  else:
    tokens = sorting.by_keep_mask(jnp.asarray(rng.random((b, t, n)) < 0.7), jnp.asarray(rng.random((b, t, n)) < 0.7))
  table = triton_backend.kernel_config(IMPL, H, hashed)
  cotangent = jax.random.normal(key, q.shape)

  run = functools.partial(_with_table_fields, q, k, v, tokens, cotangent, table)
  assert table.prefetch_rows
  default = run()
  for got, want in zip(run(prefetch_rows=False), default, strict=True):
    np.testing.assert_array_equal(got, want)

  config = core.AttentionConfig(implementation=IMPL, strict=False, scale=H**-0.5)
  big = jax.ShapeDtypeStruct((1, 2**16, 1, 2**15), jnp.float32)  # 2**31 elements
  assert not triton_backend._call(config, q, k, tokens).meta["WIDE"]
  assert triton_backend._call(config, big, k, tokens).meta["WIDE"]
  call = triton_backend._call

  def wide(*args):
    shared = call(*args)
    return dataclasses.replace(shared, meta=shared.meta | {"WIDE": True})

  monkeypatch.setattr(triton_backend, "_call", wide)
  for got, want in zip(run(), default, strict=True):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "case, strict",
    [
        ("hash_shared", True), ("hash_shared", False), ("hash_shared_documents", True), ("hash", False),
        ("hash_grouped", True), ("qk_shared", False), ("qk_grouped", False),
    ],
)  # fmt: skip
def test_row_ranges_change_no_bit(case, strict):
  """Masks from row ranges (each own slot's run of allowed slots: the plan kernel's 1 x 1
  tiles, bounded by the row's own slot for shared tokens) and from the streamed tile's idx
  and hash give the same outputs and gradients, bit for bit, grouped-query heads and
  documents included."""
  from scfa_jax import sorting, triton_backend  # noqa: PLC0415

  key = jax.random.PRNGKey(21)
  b, t, n = 1, 83, 4
  kv_heads = 2 if case.endswith("grouped") else n
  q, k, v = _qkv(key, b, t, t, n, H)
  k, v = k[:, :, :kv_heads], v[:, :, :kv_heads]
  rng = np.random.default_rng(5)
  draw = lambda heads: jnp.asarray(rng.integers(0, 3, (b, t, heads)), jnp.uint8)
  keep = lambda heads: jnp.asarray(rng.random((b, t, heads)) < 0.7)
  segments = jnp.asarray(np.repeat([[0, 1, 2, -1]], [30, 40, 10, 3], axis=1).repeat(b, 0), jnp.int32)
  q_buckets, q_keep = draw(n), keep(n)
  tokens = {
      "hash_shared": lambda: sorting.by_bucket(q_buckets, q_buckets),
      "hash_shared_documents": lambda: sorting.by_bucket(q_buckets, q_buckets, segments, segments),
      "hash": lambda: sorting.by_bucket(q_buckets, draw(n)),
      "hash_grouped": lambda: sorting.by_bucket(q_buckets, draw(kv_heads)),
      "qk_shared": lambda: sorting.by_keep_mask(q_keep, q_keep),
      "qk_grouped": lambda: sorting.by_keep_mask(q_keep, keep(kv_heads)),
  }[case]()
  assert tokens.shared == ("shared" in case)
  table = triton_backend.kernel_config(IMPL, H, tokens.hashed, kv_heads < n)
  run = functools.partial(_with_table_fields, q, k, v, tokens, jax.random.normal(key, q.shape), table, strict)
  with_ranges = run(row_ranges=True)
  assert np.abs(with_ranges[1]).max() > 0
  for got, want in zip(with_ranges, run(row_ranges=False), strict=True):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("hashed", [False, True])
def test_empty_tiles_store_zeros_without_reading_rows(hashed):
  """skip_empty_tiles: a program whose plan range is empty stores zero rows without reading
  q, k, v, dO or O. Most tiles are empty here (QK: 85% dropped and a head with nothing kept;
  hashed: queries in buckets that hold no key). Outputs and gradients equal those of reading
  the rows, bit for bit, and the reference, both with the table's setting and the other."""
  from scfa_jax import core, sorting, triton_backend  # noqa: PLC0415

  key = jax.random.PRNGKey(21)
  b, t, n = 2, 150, 2
  q, k, v = _qkv(key, b, t, t, n, H)
  rng = np.random.default_rng(9)
  if hashed:
    q_masks, k_masks = jnp.asarray(rng.integers(0, 6, (b, t, n))), jnp.asarray(rng.integers(0, 2, (b, t, n)))
    tokens = sorting.by_bucket(q_masks, k_masks)
    oracle = functools.partial(reference.hash_sparse_attention, q_buckets=q_masks, k_buckets=k_masks)
  else:
    q_masks, k_masks = (jnp.asarray(rng.random((b, t, n)) < 0.15).at[0, :, 1].set(False) for _ in range(2))
    tokens = sorting.by_keep_mask(q_masks, k_masks)
    oracle = functools.partial(reference.qk_sparse_attention, q_keep=q_masks, k_keep=k_masks)
  table = triton_backend.kernel_config(IMPL, H, hashed)
  config = core.AttentionConfig(implementation=IMPL, strict=False, scale=1.0)
  plan = triton_backend.make_plans(config, q, tokens, backward=False).fwd
  assert np.mean(np.asarray(plan.start_n) >= np.asarray(plan.end_n)) > 0.5  # most tiles are empty
  cotangent = jax.random.normal(key, q.shape)

  run = functools.partial(_with_table_fields, q, k, v, tokens, cotangent, table)
  assert table.skip_empty_tiles
  default = run()
  for got, want_bits in zip(run(skip_empty_tiles=False), default, strict=True):
    np.testing.assert_array_equal(got, want_bits)
  want, vjp = jax.vjp(oracle, q, k, v)
  for i, (got, want) in enumerate(zip(default, (want, *vjp(cotangent)), strict=True)):
    _close(got, want, jnp.float32, factor=1.0 if i == 0 else 2.0)


def test_float16_skewed_buckets_and_a_dropped_head():
  key = jax.random.PRNGKey(5)
  b, t, n = 1, 150, 3
  q, k, v = _qkv(key, b, t, t, n, 32, jnp.float16)
  buckets = _buckets(jax.random.fold_in(key, 1), (b, t, n), 6, skew=0.9)
  kw = dict(q_buckets=buckets, k_buckets=buckets, strict=True)
  _check_against(
      functools.partial(scfa_jax.hash_sparse_attention, **kw, implementation=IMPL),
      functools.partial(reference.hash_sparse_attention, **kw),
      (q, k, v), jnp.float16, key,
  )  # fmt: skip
  keep = jax.random.bernoulli(key, 0.6, (b, t, n)).at[:, :, 1].set(False)
  out = scfa_jax.qk_sparse_attention(q, k, v, q_keep=keep, k_keep=keep, implementation=IMPL)
  assert bool(jnp.all(out[:, :, 1] == 0))
  np.testing.assert_allclose(
      np.asarray(out, np.float32),
      np.asarray(reference.qk_sparse_attention(q, k, v, q_keep=keep, k_keep=keep), np.float32),
      atol=2e-3, rtol=2e-3,
  )  # fmt: skip


@pytest.mark.parametrize("beyond_pads", [False, True])
def test_any_order_with_padding(beyond_pads):
  """A caller's order; with beyond_pads, padding is any q_idx < 0 or k_idx >= 2**30 and real
  keys sit at negative positions, where the causal test alone would let padding through."""
  key = jax.random.PRNGKey(6)
  b, t, s, n = 1, 70, 50, 2
  q, k, v = _qkv(key, b, t, s, n, H)
  low = -20 if beyond_pads else 0
  q_pad, k_pad = (-7, 2**30 + 3) if beyond_pads else (-1, 2**30)
  q_idx = jnp.where(jax.random.bernoulli(key, 0.2, (b, t, n)), q_pad, jax.random.randint(key, (b, t, n), 0, 80))
  k_drop = jax.random.bernoulli(jax.random.fold_in(key, 1), 0.2, (b, s, n))
  k_idx = jnp.where(k_drop, k_pad, jax.random.randint(key, (b, s, n), low, 80))
  kw = dict(q_idx=q_idx, k_idx=k_idx, q_hash=q_idx % 2, k_hash=k_idx % 2)
  _check_against(
      functools.partial(scfa_jax.sparse_causal_attention, **kw, implementation=IMPL),
      functools.partial(reference.sparse_causal_attention, **kw),
      (q, k, v), jnp.float32, key,
  )  # fmt: skip


def test_empty_rows_zero_finite_grads_and_bitwise_determinism():
  key = jax.random.PRNGKey(7)
  b, t, n = 1, 64, 2
  q, k, v = _qkv(key, b, t, t, n, H)
  buckets = jax.random.randint(key, (b, t, n), 0, 4)
  attend = lambda q, k, v: scfa_jax.hash_sparse_attention(
      q, k, v, q_buckets=buckets, k_buckets=buckets, strict=True, implementation=IMPL
  )
  loss = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v) ** 2), argnums=(0, 1, 2)))
  first, second = loss(q, k, v), loss(q, k, v)
  for x, y in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
    assert np.array_equal(np.asarray(x), np.asarray(y))
    assert bool(jnp.all(jnp.isfinite(x)))
  out = attend(q, k, v)
  no_key = ~np.asarray(jnp.any(reference.allowed_mask(
      jnp.broadcast_to(jnp.arange(t)[None, :, None], (b, t, n)), jnp.broadcast_to(jnp.arange(t)[None, :, None], (b, t, n)),
      buckets, buckets, strict=True), axis=-1)).swapaxes(1, 2)  # fmt: skip
  assert no_key.sum() >= 2
  assert np.all(np.asarray(out)[no_key] == 0.0)
  assert np.all(np.asarray(first[1][0])[no_key] == 0.0)


def test_interpret_rejects_bfloat16_and_odd_head_dims():
  q = jnp.zeros((1, 8, 1, 16), jnp.bfloat16)
  keep = jnp.ones((1, 8, 1), bool)
  with pytest.raises(ValueError, match="float32 or float16"):
    scfa_jax.qk_sparse_attention(q, q, q, q_keep=keep, k_keep=keep, implementation=IMPL)
  q = jnp.zeros((1, 8, 1, 24), jnp.float32)
  with pytest.raises(ValueError, match=r"head dims H in \(16, 32, 64, 128\)"):
    scfa_jax.qk_sparse_attention(q, q, q, q_keep=keep, k_keep=keep, implementation=IMPL)


@pytest.mark.parametrize("strict", [False, True])
def test_backend_forward_and_lse_match_xla_backend(strict):
  """The intermediates: O at original rows and the lse per sorted slot (ours in base 2, xla's natural)."""
  from scfa_jax import core, sorting, triton_backend, xla  # noqa: PLC0415

  key = jax.random.PRNGKey(8)
  b, t, s, n = 2, 45, 70, 2
  q, k, v = _qkv(key, b, t, s, n, H)
  tokens = sorting.by_bucket(
      _buckets(jax.random.fold_in(key, 1), (b, t, n), 3), _buckets(jax.random.fold_in(key, 2), (b, s, n), 3)
  )
  config = lambda impl: core.AttentionConfig(implementation=impl, strict=strict, scale=0.25)
  o, saved = triton_backend.forward(config(IMPL), q, k, v, tokens)
  assert saved.plans.dq is None and saved.plans.dkdv is None  # not differentiating: forward plan only
  both = triton_backend.forward(config(IMPL), q, k, v, tokens, differentiating=True)[1].plans
  assert both.dq.start_n is not None and both.dkdv.start_m is not None
  o_xla, lse_xla = xla.forward(config("xla"), q, k, v, tokens)
  np.testing.assert_allclose(np.asarray(o), np.asarray(o_xla), atol=1e-5, rtol=1e-5)
  lse, lse_xla = np.asarray(saved.lse), np.asarray(lse_xla)
  assert lse.shape == lse_xla.shape == (b, n, t)
  empty = np.isinf(lse_xla)
  assert 0 < empty.sum() < empty.size  # rows with keys and rows without
  assert np.array_equal(np.isinf(lse), empty)
  np.testing.assert_allclose(lse[~empty] * np.log(2.0), lse_xla[~empty], atol=1e-5, rtol=1e-5)


def test_shard_map_over_the_batch_axis():
  # check_vma=False: custom calls carry no varying-axes type, so custom_vjp would reject
  # their gradients under the check (the same holds for jax-triton on a GPU).
  run_shard_map_check(IMPL, check_vma=False)


@pytest.mark.parametrize("strict", [False, True])
def test_plan_kernel_matches_the_jnp_plan(strict):
  """kernels/plan.py against plan.py's searches, exactly, tiles of one slot (row ranges) too; unordered
  tokens are refused."""
  from scfa_jax import sorting, triton_backend  # noqa: PLC0415

  cases = plan_kernel_cases(long=2100)
  assert any(tokens.shared for tokens in cases)
  for i, tokens in enumerate(cases):
    # 1 x 1 tiles are the row ranges: shared tokens take them only, whose tiles follow the
    # general path; three other cases take them beside the tile shapes.
    shapes = [] if tokens.shared else [(16, 32), (32, 16)]
    check_plan_kernel(IMPL, tokens, shapes + ([(1, 1)] if tokens.shared or i in (0, 2, 10) else []), strict)
  presorted = sorting.presorted(jnp.zeros((1, 8, 1), jnp.int32), jnp.zeros((1, 8, 1), jnp.int32))
  with pytest.raises(ValueError, match="ordered tokens"):
    triton_backend.plan_view(IMPL, presorted, 16, 16, strict=strict, view="q")


@pytest.mark.parametrize("hashed", [False, True])
def test_backend_plans_from_the_kernel_equal_the_jnp_plans(hashed):
  """triton_backend.make_plans: the plan kernel (one launch per distinct view, the forward's
  plan reused where dQ's tiles are the same) and the jnp searches give the same three plans."""
  from scfa_jax import core, sorting, triton_backend  # noqa: PLC0415
  from scfa_jax import plan as plan_lib  # noqa: PLC0415

  rng = np.random.default_rng(3)
  b, t, s, n = 2, 75, 75, 2
  if hashed:
    tokens = sorting.by_bucket(jnp.asarray(rng.integers(0, 3, (b, t, n))), jnp.asarray(rng.integers(0, 3, (b, s, n))))
  else:
    tokens = sorting.by_keep_mask(jnp.asarray(rng.random((b, t, n)) < 0.6), jnp.asarray(rng.random((b, s, n)) < 0.6))
  q = jnp.zeros((b, t, n, H), jnp.float32)
  table = triton_backend.kernel_config(IMPL, H, hashed)
  kernels = ("fwd", "dkdv", "dq")  # triton_backend.Plans' field order
  shapes, views = zip(*(table.kernel_tiles[name] for name in kernels))
  for strict in (False, True):
    config = core.AttentionConfig(implementation=IMPL, strict=strict, scale=1.0)
    got = triton_backend.make_plans(config, q, tokens, backward=True)
    want = plan_lib.make_plans(tokens, shapes, strict=strict, views=views)
    for name, plan in zip(kernels, want, strict=True):
      assert jax.tree.structure(getattr(got, name)) == jax.tree.structure(plan), name
      for a, b in zip(jax.tree.leaves(getattr(got, name)), jax.tree.leaves(plan), strict=True):
        np.testing.assert_array_equal(a, b)


def test_float32_products_follow_default_matmul_precision():
  """The kernels' tl.dot input precision: IEEE for float32 unless JAX is asked for less."""
  from scfa_jax.triton_backend import input_precision

  assert input_precision(jnp.float32) == "ieee"
  with jax.default_matmul_precision("highest"):
    assert input_precision(jnp.float32) == "ieee"
  for name in ("tensorfloat32", "high", "default"):
    with jax.default_matmul_precision(name):
      assert input_precision(jnp.float32) == "tf32", name
  assert input_precision(jnp.bfloat16) == input_precision(jnp.float16) == "tf32"  # exact 16-bit products
