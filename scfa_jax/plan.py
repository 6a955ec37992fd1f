"""The tile plan: which (query tile, key tile) pairs a kernel visits, and which need masks.

Tokens are sorted per (batch, head) by (hash, idx) (see `sorting.py`), so for every
query tile the key tiles that can hold an allowed pair form one contiguous range,
`[start_n, end_n)`, and for every key tile the query tiles form `[start_m, end_m)`.
Inside each range a sub-range `[full_start_*, full_end_*)` holds tiles where every
pair is allowed, which the kernels run without mask arithmetic.

The plan is built from per-tile bounding boxes of (hash, idx) and the lexicographic
min/max of (hash, idx). The tests are conservative for *any* token order: a visited
range may contain tiles without an allowed pair (the in-tile mask handles them), but
a tile holding an allowed pair is never skipped, and a tile is called full only when
all its pairs are allowed. Sortedness only makes the ranges tight.

Cost: O(B * N * num_q_tiles * num_k_tiles) comparisons on tiny tile summaries, which
is well under the cost of one pass over q at the tile sizes the kernels use.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from scfa_jax.sorting import K_PAD, SortedTokens

SKIP, MASKED, FULL = 0, 1, 2
"""Tile states in `TilePlan.to_dense()`."""

_BIG = np.iinfo(np.int32).max


@dataclasses.dataclass(frozen=True)
class _TileStats:
  """Per-tile summaries of the real tokens in each tile; int32 [B, N, num_tiles]."""

  any_real: jax.Array  # the tile holds at least one real token
  all_real: jax.Array  # every slot of the tile holds a real token
  idx_lo: jax.Array
  idx_hi: jax.Array
  hash_lo: jax.Array
  hash_hi: jax.Array
  lex_lo_idx: jax.Array  # smallest idx among the tokens whose hash is hash_lo
  lex_hi_idx: jax.Array  # largest idx among the tokens whose hash is hash_hi


def _tile_stats(idx: jax.Array, hashes: jax.Array, real: jax.Array, block: int) -> _TileStats:
  b, n, length = idx.shape
  pad = -length % block
  tiles = lambda x, fill: jnp.pad(x, ((0, 0), (0, 0), (0, pad)), constant_values=fill).reshape(
      b, n, -1, block
  )
  real = tiles(real, False)
  idx, hashes = tiles(idx, 0), tiles(hashes, 0)
  lo = lambda x, where: jnp.min(jnp.where(where, x, _BIG), axis=-1)
  hi = lambda x, where: jnp.max(jnp.where(where, x, -_BIG), axis=-1)
  hash_lo, hash_hi = lo(hashes, real), hi(hashes, real)
  return _TileStats(
      any_real=jnp.any(real, axis=-1),
      all_real=jnp.all(real, axis=-1),
      idx_lo=lo(idx, real),
      idx_hi=hi(idx, real),
      hash_lo=hash_lo,
      hash_hi=hash_hi,
      lex_lo_idx=lo(idx, real & (hashes == hash_lo[..., None])),
      lex_hi_idx=hi(idx, real & (hashes == hash_hi[..., None])),
  )


def _ranges(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """First and one-past-last True along the last axis; (0, 0) for an all-False row."""
  count = mask.shape[-1]
  anything = jnp.any(mask, axis=-1)
  first = jnp.argmax(mask, axis=-1)
  last = count - jnp.argmax(mask[..., ::-1], axis=-1)
  return (
      jnp.where(anything, first, 0).astype(jnp.int32),
      jnp.where(anything, last, 0).astype(jnp.int32),
  )


def _full_ranges(full: jax.Array, start: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The full sub-range, or an empty one at `start` when the full tiles are not contiguous."""
  lo, hi = _ranges(full)
  contiguous = jnp.any(full, axis=-1) & (jnp.sum(full, axis=-1) == hi - lo)
  return jnp.where(contiguous, lo, start), jnp.where(contiguous, hi, start)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TilePlan:
  """Per-tile visiting ranges for the forward (query-major) and backward (key-major) views.

  Attributes (int32, B batch, N heads, one entry per tile):
    start_n, end_n: [B, N, num_q_tiles]: key tiles `[start_n, end_n)` a query tile visits.
    full_start_n, full_end_n: the sub-range of those that needs no mask.
    start_m, end_m: [B, N, num_k_tiles]: query tiles `[start_m, end_m)` a key tile visits.
    full_start_m, full_end_m: the sub-range of those that needs no mask.
    block_q, block_k: tile sizes (static).
  """

  start_n: jax.Array
  end_n: jax.Array
  full_start_n: jax.Array
  full_end_n: jax.Array
  start_m: jax.Array
  end_m: jax.Array
  full_start_m: jax.Array
  full_end_m: jax.Array
  block_q: int = dataclasses.field(metadata=dict(static=True))
  block_k: int = dataclasses.field(metadata=dict(static=True))

  @property
  def num_q_tiles(self) -> int:
    return self.start_n.shape[-1]

  @property
  def num_k_tiles(self) -> int:
    return self.start_m.shape[-1]

  def to_dense(self, view: str = "q") -> jax.Array:
    """int8 [B, N, num_q_tiles, num_k_tiles] of SKIP / MASKED / FULL.

    view="q" is what the forward and dQ kernels visit (ranges per query tile),
    view="k" what the dK/dV kernel visits (ranges per key tile).
    """
    if view == "q":
      return _dense(self.start_n, self.end_n, self.full_start_n, self.full_end_n, self.num_k_tiles)
    if view == "k":
      dense = _dense(self.start_m, self.end_m, self.full_start_m, self.full_end_m, self.num_q_tiles)
      return jnp.swapaxes(dense, -1, -2)
    raise ValueError(f"view must be 'q' or 'k', got {view=}")

  def sparsity(self) -> float:
    """Fraction of the num_q_tiles x num_k_tiles rectangle the forward view skips."""
    visited = jnp.sum(self.end_n - self.start_n)
    return float(1.0 - visited / (self.start_n.size * self.num_k_tiles))

  def __str__(self) -> str:
    dense = np.asarray(self.to_dense())
    b, n, nq, nk = dense.shape
    lines = [
        f"TilePlan(B={b}, N={n}, {nq}x{nk} tiles of {self.block_q}x{self.block_k}, "
        f"sparsity={self.sparsity():.1%}); batch 0, head 0 ('#' full, 'm' masked, '.' skipped):"
    ]
    rows = dense[0, 0, :64, :64]
    lines += ["".join(".m#"[s] for s in row) for row in rows]
    if nq > 64 or nk > 64:
      lines.append("(first 64x64 tiles shown)")
    return "\n".join(lines)


def _dense(start, end, full_start, full_end, count) -> jax.Array:
  tile = jnp.arange(count)
  visited = (tile >= start[..., None]) & (tile < end[..., None])
  full = (tile >= full_start[..., None]) & (tile < full_end[..., None])
  return jnp.where(full, FULL, jnp.where(visited, MASKED, SKIP)).astype(jnp.int8)


def make_plan(tokens: SortedTokens, *, block_q: int, block_k: int, strict: bool) -> TilePlan:
  """Builds the plan for `tokens` cut into tiles of block_q queries and block_k keys."""
  q_hash, k_hash = (
      (tokens.q_hash, tokens.k_hash)
      if tokens.hashed
      else (jnp.zeros_like(tokens.q_idx), jnp.zeros_like(tokens.k_idx))
  )
  q = _tile_stats(tokens.q_idx, q_hash, tokens.q_idx >= 0, block_q)
  k = _tile_stats(tokens.k_idx, k_hash, tokens.k_idx < K_PAD, block_k)
  qx = lambda x: x[..., :, None]  # query tiles along rows
  kx = lambda x: x[..., None, :]  # key tiles along columns
  before = jnp.less if strict else jnp.less_equal

  # Some pair may be allowed: both tiles hold real tokens, the bucket ranges overlap,
  # the earliest key is causally before the latest query, and the lexicographically
  # smallest key (hash, idx) does not come after the largest query (hash, idx).
  lex_before = (kx(k.hash_lo) < qx(q.hash_hi)) | (
      (kx(k.hash_lo) == qx(q.hash_hi)) & before(kx(k.lex_lo_idx), qx(q.lex_hi_idx))
  )
  visit = (
      qx(q.any_real)
      & kx(k.any_real)
      & (kx(k.hash_lo) <= qx(q.hash_hi))
      & (kx(k.hash_hi) >= qx(q.hash_lo))
      & before(kx(k.idx_lo), qx(q.idx_hi))
      & lex_before
  )
  # Every pair allowed: no padding, one bucket on both sides, every key before every query.
  one_bucket = (
      (qx(q.hash_lo) == qx(q.hash_hi))
      & (kx(k.hash_lo) == kx(k.hash_hi))
      & (qx(q.hash_lo) == kx(k.hash_lo))
  )
  full = qx(q.all_real) & kx(k.all_real) & one_bucket & before(kx(k.idx_hi), qx(q.idx_lo))

  start_n, end_n = _ranges(visit)
  full_start_n, full_end_n = _full_ranges(full, start_n)
  visit_t, full_t = jnp.swapaxes(visit, -1, -2), jnp.swapaxes(full, -1, -2)
  start_m, end_m = _ranges(visit_t)
  full_start_m, full_end_m = _full_ranges(full_t, start_m)
  return TilePlan(
      start_n, end_n, full_start_n, full_end_n,
      start_m, end_m, full_start_m, full_end_m,
      block_q=block_q, block_k=block_k,
  )  # fmt: skip
