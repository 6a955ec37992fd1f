"""The tile plan is conservative (never skips an allowed pair), honest about full tiles,
and tight on sorted input; the sorting produces the documented order."""

from __future__ import annotations

import dataclasses
import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scfa_jax import plan as plan_lib
from scfa_jax import reference, sorting


def _tile_truth(tokens: sorting.SortedTokens, block_q: int, block_k: int, strict: bool):
  """(any allowed pair, all pairs allowed) per tile pair, from the dense rule; numpy."""
  to_btn = lambda x: None if x is None else jnp.swapaxes(x, 1, 2)
  mask = np.asarray(
      _allowed(to_btn(tokens.q_idx), to_btn(tokens.k_idx), to_btn(tokens.q_hash), to_btn(tokens.k_hash), strict)
  )
  b, n, t, s = mask.shape
  nq, nk = -(-t // block_q), -(-s // block_k)
  # Slots past T or S are outside the tensor: a partial tile is never "all allowed".
  padded = np.zeros((b, n, nq * block_q, nk * block_k), bool)
  padded[:, :, :t, :s] = mask
  tiles = padded.reshape(b, n, nq, block_q, nk, block_k)
  return tiles.any(axis=(3, 5)), tiles.all(axis=(3, 5))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _make_plan(tokens, block_q, block_k, strict):
  return plan_lib.make_plan(tokens, block_q=block_q, block_k=block_k, strict=strict)


@functools.partial(jax.jit, static_argnums=(4,))
def _allowed(q_idx, k_idx, q_hash, k_hash, strict):
  return reference.allowed_mask(q_idx, k_idx, q_hash, k_hash, strict=strict)


def _check_plan(tokens, block_q, block_k, strict):
  plan = _make_plan(tokens, block_q, block_k, strict)
  any_allowed, all_allowed = _tile_truth(tokens, block_q, block_k, strict)
  for view in ("q", "k"):
    dense = np.asarray(plan.to_dense(view))
    assert dense.shape == any_allowed.shape
    assert not np.any(any_allowed & (dense == plan_lib.SKIP)), f"{view} view skips an allowed pair"
    assert not np.any((dense == plan_lib.FULL) & ~all_allowed), f"{view} view calls a partial tile full"
  # Ranges are well formed: start <= full_start <= full_end <= end.
  for lo, flo, fhi, hi in (
      (plan.start_n, plan.full_start_n, plan.full_end_n, plan.end_n),
      (plan.start_m, plan.full_start_m, plan.full_end_m, plan.end_m),
  ):
    assert bool(jnp.all((lo <= flo) & (flo <= fhi) & (fhi <= hi)))
  return plan, any_allowed, all_allowed


@st.composite
def _token_cases(draw):
  b, n = draw(st.integers(1, 2)), draw(st.integers(1, 2))
  t, s = draw(st.integers(1, 90)), draw(st.integers(1, 90))
  mode = draw(st.sampled_from(["hash", "qk", "raw"]))
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  if mode == "hash":
    nb = draw(st.integers(1, 6))
    tokens = sorting.by_bucket(
        jnp.asarray(rng.integers(0, nb, (b, t, n))), jnp.asarray(rng.integers(0, nb, (b, s, n)))
    )
  elif mode == "qk":
    rate = draw(st.sampled_from([0.0, 0.3, 0.9, 1.0]))
    tokens = sorting.by_keep_mask(
        jnp.asarray(rng.random((b, t, n)) >= rate), jnp.asarray(rng.random((b, s, n)) >= rate)
    )
  else:  # arbitrary (unsorted) order, padding anywhere, maybe hashed
    q_idx = np.where(rng.random((b, t, n)) < 0.2, -1, rng.integers(0, max(t, s), (b, t, n)))
    k_idx = np.where(rng.random((b, s, n)) < 0.2, 2**30, rng.integers(0, max(t, s), (b, s, n)))
    hashes = (rng.integers(0, 3, (b, t, n)), rng.integers(0, 3, (b, s, n))) if rng.random() < 0.5 else (None, None)
    tokens = sorting.presorted(*(None if x is None else jnp.asarray(x) for x in (q_idx, k_idx, *hashes)))
  block_q, block_k = draw(st.sampled_from([8, 16, 32])), draw(st.sampled_from([8, 16, 32]))
  return tokens, block_q, block_k, draw(st.booleans())


@hypothesis.settings(max_examples=15, deadline=None, derandomize=True)  # each new shape compiles: ~2.5 s
@hypothesis.given(_token_cases())
def test_plan_is_conservative_and_honest(case):
  plan, *_ = _check_plan(*case)
  tokens, block_q, block_k, strict = case
  if tokens.ordered:  # the binary-search plan is never looser than the bounding boxes
    boxes = _make_plan(dataclasses.replace(tokens, ordered=False), block_q, block_k, strict)
    for view in ("q", "k"):
      ours, theirs = (np.asarray(p.to_dense(view)) for p in (plan, boxes))
      assert np.sum(ours != plan_lib.SKIP) <= np.sum(theirs != plan_lib.SKIP)
      assert np.sum(ours == plan_lib.MASKED) <= np.sum(theirs == plan_lib.MASKED)


@pytest.mark.parametrize("strict", [False, True])
def test_plan_is_tight_on_causal_attention(strict):
  """All kept, tiles aligned: exactly the causal tile triangle, diagonal masked, rest full."""
  keep = jnp.ones((1, 256, 1), bool)
  plan, any_allowed, all_allowed = _check_plan(sorting.by_keep_mask(keep, keep), 64, 64, strict)
  dense = np.asarray(plan.to_dense())[0, 0]
  expected = np.tril(np.full((4, 4), plan_lib.FULL), -1) + np.diag(np.full(4, plan_lib.MASKED))
  np.testing.assert_array_equal(dense, expected)
  np.testing.assert_array_equal(np.asarray(plan.to_dense("k"))[0, 0], expected)
  assert plan.sparsity() == pytest.approx(6 / 16)


def test_plan_skips_other_buckets_when_sorted():
  """Two buckets of 128 sorted tokens each: no tile of one bucket visits the other."""
  buckets = jnp.asarray(np.repeat([[0, 1]], 128, axis=0).T.reshape(1, 256, 1))
  plan, *_ = _check_plan(sorting.by_bucket(buckets, buckets), 64, 64, False)
  dense = np.asarray(plan.to_dense())[0, 0]
  assert np.all(dense[:2, 2:] == plan_lib.SKIP) and np.all(dense[2:, :2] == plan_lib.SKIP)
  assert dense[1, 0] == dense[3, 2] == plan_lib.FULL
  assert "TilePlan(B=1, N=1, 4x4 tiles of 64x64" in str(plan)


def test_plan_views_are_exact_transposes_on_sorted_input():
  rng = np.random.default_rng(0)
  buckets = jnp.asarray(rng.integers(0, 4, (2, 300, 3)))
  plan, *_ = _check_plan(sorting.by_bucket(buckets, buckets), 32, 32, True)
  visited_q = np.asarray(plan.to_dense("q")) != plan_lib.SKIP
  visited_k = np.asarray(plan.to_dense("k")) != plan_lib.SKIP
  # Both views are conservative; on sorted tokens the k view may only add boundary tiles.
  assert visited_q.mean() < 0.5 and visited_k.mean() < 0.5


def test_by_bucket_sorts_by_bucket_then_position():
  rng = np.random.default_rng(1)
  qb = rng.integers(0, 5, (2, 77, 3))
  tokens = sorting.by_bucket(jnp.asarray(qb), jnp.asarray(qb))
  perm, h = np.asarray(tokens.q_perm), np.asarray(tokens.q_hash)
  for b in range(2):
    for n in range(3):
      order = np.lexsort((np.arange(77), qb[b, :, n]))  # by bucket, then position
      np.testing.assert_array_equal(perm[b, n], order)
      np.testing.assert_array_equal(h[b, n], qb[b, order, n])
  np.testing.assert_array_equal(tokens.q_idx, tokens.q_perm)


@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.int8, jnp.uint16, jnp.int16, jnp.int32])
def test_by_bucket_order_does_not_depend_on_the_bucket_dtype(dtype):
  """The sort key keeps the buckets' dtype (fewer radix passes when narrow): same order."""
  rng = np.random.default_rng(4)
  qb, kb = (jnp.asarray(rng.integers(0, 100, (2, 300, 3))) for _ in range(2))
  want = sorting.by_bucket(qb.astype(jnp.int32), kb.astype(jnp.int32))
  got = sorting.by_bucket(qb.astype(dtype), kb.astype(dtype))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert a.dtype == b.dtype == jnp.int32
    np.testing.assert_array_equal(a, b)


def test_by_keep_mask_compacts_in_time_order_with_pads():
  keep = jnp.asarray([[True, False, True, False, True]])[..., None]  # [1, 5, 1]
  tokens = sorting.by_keep_mask(keep, keep)
  np.testing.assert_array_equal(tokens.q_perm[0, 0], [0, 2, 4, 1, 3])
  np.testing.assert_array_equal(tokens.q_idx[0, 0], [0, 2, 4, sorting.Q_PAD, sorting.Q_PAD])
  np.testing.assert_array_equal(tokens.k_idx[0, 0], [0, 2, 4, sorting.K_PAD, sorting.K_PAD])


@pytest.mark.parametrize("s", [77, 50])
def test_each_side_sorts_by_its_own_keys_whether_sorted_together_or_not(s):
  """With T == S both sides share one sort (stacked along the batch); each side must still
  get exactly its own order, the same as when T != S sorts them apart."""
  rng = np.random.default_rng(5)
  qb, kb = rng.integers(0, 5, (2, 77, 3)), rng.integers(0, 5, (2, s, 3))
  q_keep, k_keep = rng.random((2, 77, 3)) < 0.5, rng.random((2, s, 3)) < 0.3
  hashed = sorting.by_bucket(jnp.asarray(qb), jnp.asarray(kb))
  dropped = sorting.by_keep_mask(jnp.asarray(q_keep), jnp.asarray(k_keep))
  for b, n in np.ndindex(2, 3):
    for keys, perm, hashes in ((qb, hashed.q_perm, hashed.q_hash), (kb, hashed.k_perm, hashed.k_hash)):
      order = np.argsort(keys[b, :, n], kind="stable")
      np.testing.assert_array_equal(perm[b, n], order)
      np.testing.assert_array_equal(hashes[b, n], keys[b, order, n])
    for keep, perm, idx, pad in (
        (q_keep, dropped.q_perm, dropped.q_idx, sorting.Q_PAD),
        (k_keep, dropped.k_perm, dropped.k_idx, sorting.K_PAD),
    ):
      order = np.argsort(~keep[b, :, n], kind="stable")
      np.testing.assert_array_equal(perm[b, n], order)
      np.testing.assert_array_equal(idx[b, n], np.where(keep[b, order, n], order, pad))


def test_one_array_for_both_sides_is_sorted_once():
  """Shared-QK buckets (or one keep mask) passed as the same array take one sort of [B, N, T],
  not a sort of both sides stacked, and give what two equal arrays give."""
  rng = np.random.default_rng(3)
  buckets, keep = jnp.asarray(rng.integers(0, 6, (2, 40, 3)), jnp.uint8), jnp.asarray(rng.random((2, 40, 3)) < 0.6)
  for sort, x in ((sorting.by_bucket, buckets), (sorting.by_keep_mask, keep)):
    sorts = [e for e in jax.make_jaxpr(lambda x: sort(x, x))(x).eqns if e.primitive.name == "sort"]
    assert [e.invars[0].aval.shape for e in sorts] == [(2, 3, 40)]
    shared, apart = sort(x, x), sort(x, jnp.array(x, copy=True))
    for a, b in zip(jax.tree.leaves(shared), jax.tree.leaves(apart), strict=True):
      np.testing.assert_array_equal(a, b)


def test_gather_and_scatter_rows_are_inverse():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 33, 3, 4)))
  tokens = sorting.by_bucket(jnp.asarray(rng.integers(0, 3, (2, 33, 3))), jnp.zeros((2, 5, 3), jnp.int32))
  np.testing.assert_array_equal(sorting.scatter_rows(sorting.gather_rows(x, tokens.q_perm), tokens.q_perm), x)


def test_plan_under_jit_matches_eager():
  rng = np.random.default_rng(3)
  buckets = jnp.asarray(rng.integers(0, 4, (1, 200, 2)))
  tokens = sorting.by_bucket(buckets, buckets)
  make = lambda t: plan_lib.make_plan(t, block_q=32, block_k=64, strict=True)
  eager, jitted = make(tokens), jax.jit(make)(tokens)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="view"):
    eager.to_dense("x")


def test_plans_built_together_equal_plans_built_alone():
  """make_plans batches the searches of several tile shapes: each plan is make_plan's."""
  rng = np.random.default_rng(7)
  for tokens in (
      sorting.by_bucket(jnp.asarray(rng.integers(0, 5, (2, 150, 2))), jnp.asarray(rng.integers(0, 5, (2, 97, 2)))),
      sorting.by_keep_mask(jnp.asarray(rng.random((2, 150, 2)) < 0.6), jnp.asarray(rng.random((2, 97, 2)) < 0.3)),
  ):
    shapes = [(32, 16), (16, 32), (32, 32)]
    together = plan_lib.make_plans(tokens, shapes, strict=True)
    one_view = plan_lib.make_plans(tokens, shapes, strict=True, views=["q", "k", "q"])
    for (block_q, block_k), plan, partial in zip(shapes, together, one_view, strict=True):
      alone = plan_lib.make_plan(tokens, block_q=block_q, block_k=block_k, strict=True)
      for a, b in zip(jax.tree.leaves(plan), jax.tree.leaves(alone), strict=True):
        np.testing.assert_array_equal(a, b)
      assert (partial.num_q_tiles, partial.num_k_tiles) == (alone.num_q_tiles, alone.num_k_tiles)
      for name in ("start", "end", "full_start", "full_end"):
        built, missing = ("n", "m") if partial.start_n is not None else ("m", "n")
        np.testing.assert_array_equal(getattr(partial, f"{name}_{built}"), getattr(alone, f"{name}_{built}"))
        assert getattr(partial, f"{name}_{missing}") is None
  with pytest.raises(ValueError, match="without its 'k' view"):
    one_view[0].to_dense("k")
  with pytest.raises(ValueError, match="views must hold"):
    plan_lib.make_plans(tokens, shapes, strict=True, views=["q"])


@pytest.mark.parametrize("total", [1, 2, 7, 64, 300, 1025])
def test_search_counts_the_pairs_before_each_needle(total):
  """The unrolled binary search against a count over every pair, used as `_ordered_plans`
  uses it: two sorted sides in one haystack (offsets 0 and `total`), a length and an
  `inclusive` per needle; needles inside, between, before and after the runs, on exact
  pairs, and lengths from 0 to a whole side."""
  rng = np.random.default_rng(total)
  b, n, m = 2, 3, 60

  def side():
    hashes = rng.integers(0, 4, (b, n, total))
    idx = np.stack([rng.choice(4 * total, total, replace=False) for _ in range(b * n)]).reshape(b, n, total)
    order = np.lexsort((idx, hashes), axis=-1)  # sorted by (hash, idx) per head
    return np.take_along_axis(hashes, order, -1), np.take_along_axis(idx, order, -1)

  (h0, i0), (h1, i1) = side(), side()
  hay_hash, hay_idx = np.concatenate([h0, h1], -1), np.concatenate([i0, i1], -1)
  on_second = np.arange(m) >= m // 2
  offset = np.where(on_second, total, 0).astype(np.int32)
  counts = rng.integers(0, total + 1, (b, n, 2))
  length = np.where(on_second, counts[..., 1:], counts[..., :1])
  inclusive = np.arange(m) % 3 == 0
  needle_hash = rng.integers(-1, 6, (b, n, m))
  needle_idx = rng.integers(-2, 4 * total + 2, (b, n, m))
  hits = offset[None, None, :] + rng.integers(0, total, (b, n, m))  # exact pairs of the own side
  exact = np.arange(m) % 2 == 0
  needle_hash = np.where(exact, np.take_along_axis(hay_hash, hits, -1), needle_hash)
  needle_idx = np.where(exact, np.take_along_axis(hay_idx, hits, -1), needle_idx)
  found = plan_lib._search(
      jnp.asarray(hay_hash), jnp.asarray(hay_idx), jnp.asarray(needle_hash), jnp.asarray(needle_idx),
      offset=offset, length=jnp.asarray(length), inclusive=inclusive, max_length=total,
  )  # fmt: skip
  slots = np.arange(2 * total)
  own = (slots >= offset[:, None]) & (slots < offset[:, None] + length[..., None])  # [B, N, M, 2T]
  h, i = hay_hash[..., None, :], hay_idx[..., None, :]
  nh, ni = needle_hash[..., None], needle_idx[..., None]
  before = (h < nh) | ((h == nh) & ((i < ni) | (inclusive[:, None] & (i == ni))))
  np.testing.assert_array_equal(np.asarray(found), np.sum(before & own, axis=-1))
