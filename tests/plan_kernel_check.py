"""The plan kernel (kernels/plan.py) against the jnp plan: cases and check shared by the
interpreter tests and the GPU tests (no hypothesis here: the GPU machine may lack it)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from scfa_jax import plan as plan_lib
from scfa_jax import sorting


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _jnp_plan(tokens, block_q, block_k, strict):
  return plan_lib.make_plan(tokens, block_q=block_q, block_k=block_k, strict=strict)


def plan_kernel_cases(long: int):
  """Ordered tokens for `check_plan_kernel`, many heads per case (each head its own mix):
  1 to 6 buckets or keep rates from 0 (empty rows) to 1 (dense causal), odd lengths,
  T != S, whole tiles, skewed buckets, one empty side, one-slot sides, and one side
  `long` slots long (several programs per head at 16-slot tiles). Queries and keys share
  positions, so searches land on exact (hash, idx) pairs at tile boundaries, where strict
  and inclusive differ."""
  rng = np.random.default_rng(11)

  def buckets(b, length, n):
    skewed = np.where(rng.random((b, length, n)) < 0.9, 0, rng.integers(1, 50, (b, length, n)))
    mixed = rng.integers(0, np.arange(1, n + 1) % 6 + 1, (b, length, n))
    return jnp.asarray(np.where(np.arange(n) % 7 == 6, skewed, mixed))

  def keep(b, length, n):
    return jnp.asarray(rng.random((b, length, n)) < np.linspace(0, 1, n))

  def segments(b, length):  # runs of 1 to 40 tokens, a fifth of them padding (negative ids)
    ids = np.repeat(np.arange(length), rng.integers(1, 40, length))[:length]
    return jnp.asarray(np.where(ids % 5 == 4, -1, ids)[None].repeat(b, 0), jnp.int32)

  return [
      sorting.by_bucket(buckets(2, 100, 14), buckets(2, 83, 14)),
      sorting.by_bucket(buckets(1, 64, 14), buckets(1, 96, 14)),  # whole tiles
      sorting.by_keep_mask(keep(2, 90, 12), keep(2, 77, 12)),
      sorting.by_keep_mask(keep(1, 64, 12), keep(1, 64, 12)),
      sorting.by_bucket(buckets(1, long, 1), buckets(1, 61, 1)),
      sorting.by_keep_mask(keep(1, 61, 2), keep(1, long, 2)),
      # One side empty, the other not; one-slot sides.
      sorting.by_keep_mask(jnp.zeros((1, 37, 1), bool), jnp.ones((1, 50, 1), bool)),
      sorting.by_keep_mask(jnp.ones((1, 37, 1), bool), jnp.zeros((1, 50, 1), bool)),
      sorting.by_bucket(buckets(1, 1, 3), buckets(1, 40, 3)),
      sorting.by_bucket(buckets(1, 40, 3), buckets(1, 1, 3)),
      # Segment ids (packed documents) with padding: hashes that are segment keys, pads last.
      # The first case's shapes, so that its jnp plans are compiled once.
      sorting.by_bucket(buckets(2, 100, 14).astype(jnp.uint8), buckets(2, 83, 14).astype(jnp.uint8),
                        segments(2, 100), segments(2, 83)),  # fmt: skip
      # One sequence on both sides (`shared`: one sort of one array), with and without documents;
      # the last `long`, so that its row ranges take several plan programs per head.
      *[sorting.by_bucket(x, x) for x in [buckets(2, 100, 14)]],
      *[sorting.by_bucket(x, x, ids, ids) for x, ids in [(buckets(2, 100, 14).astype(jnp.uint8), segments(2, 100))]],
      *[sorting.by_keep_mask(x, x) for x in [keep(2, 90, 12)]],
      *[sorting.by_keep_mask(x, x, ids, ids) for x, ids in [(keep(1, long, 3), segments(1, long))]],
  ]


def check_plan_kernel(implementation: str, tokens, shapes, strict: bool):
  """The plan kernel (`triton_backend.plan_view`) gives the jnp plan's ranges exactly, for
  every tile shape of `shapes`. One jit per call, not one per shape and view: on a GPU each
  is an XLA compile."""
  from scfa_jax import triton_backend  # noqa: PLC0415

  @jax.jit
  def plans(tokens):
    return [
        (_jnp_plan(tokens, block_q, block_k, strict),
         [triton_backend.plan_view(implementation, tokens, block_q, block_k, strict=strict, view=view) for view in "qk"])
        for block_q, block_k in shapes
    ]  # fmt: skip

  for (block_q, block_k), (expected, views) in zip(shapes, plans(tokens), strict=True):
    for built, side in zip(views, "nm", strict=True):
      assert (built.num_q_tiles, built.num_k_tiles) == (expected.num_q_tiles, expected.num_k_tiles)
      for name in ("start", "end", "full_start", "full_end"):
        np.testing.assert_array_equal(
            getattr(built, f"{name}_{side}"), getattr(expected, f"{name}_{side}"),
            err_msg=f"{name}_{side}, blocks {block_q}x{block_k}, strict={strict}",
        )  # fmt: skip
