"""The tile plan: which (query tile, key tile) pairs a kernel visits, and which need masks.

Tokens are sorted per (batch, head) by (hash, idx) (see `sorting.py`), so for every
query tile the key tiles that can hold an allowed pair form one contiguous range,
`[start_n, end_n)`, and for every key tile the query tiles form `[start_m, end_m)`.
Inside each range a sub-range `[full_start_*, full_end_*)` holds tiles where every
pair is allowed, which the kernels run without mask arithmetic.

Two builders give plans with the same guarantees: a visited range may contain tiles
without an allowed pair (the in-tile mask handles them), but a tile holding an allowed
pair is never skipped, and a tile is called full only when all its pairs are allowed.

- Ordered tokens (`SortedTokens.ordered`: our own sorts): the keys a query may attend
  are one run of the sorted key order, so each tile's range comes from binary searches
  for its first and last real token: O(num_tiles * log L) per head.
- Any other order (a caller's `presorted` tokens): per-tile bounding boxes of
  (hash, idx), compared for every pair of tiles: O(num_q_tiles * num_k_tiles) per head,
  conservative for any order; sortedness only makes its ranges tight.
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
_SMALL = np.iinfo(np.int32).min


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
  if tokens.ordered:
    return _ordered_plan(tokens, q_hash, k_hash, block_q, block_k, strict)
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


def _filled_keys(idx: jax.Array, hashes: jax.Array, real: jax.Array):
  """The (hash, idx) key of every slot, with slots that hold no real token filled from
  the previous real slot (`before`) or the next one (`after`). Both stay sorted when
  the real tokens are, so binary searches can run over every slot: searches in
  `before` find real tokens from the left, searches in `after` from the right."""
  length = idx.shape[-1]
  slot = jnp.arange(length, dtype=jnp.int32)
  previous = jax.lax.cummax(jnp.where(real, slot, -1), axis=real.ndim - 1)
  following = jax.lax.cummin(jnp.where(real, slot, length), axis=real.ndim - 1, reverse=True)

  def fill(at, exists, missing):
    at = jnp.clip(at, 0, length - 1)
    pick = lambda x: jnp.where(exists, jnp.take_along_axis(x, at, axis=-1), missing)
    return pick(hashes), pick(idx)

  return fill(previous, previous >= 0, _SMALL), fill(following, following < length, _BIG)


def _count_before(keys, hashes: jax.Array, idx: jax.Array, inclusive: bool) -> jax.Array:
  """How many slots of sorted `keys` ([B, N, L] pairs) come before (hash, idx) [B, N, M]
  lexicographically (or equal, when inclusive): a binary search, unrolled."""
  key_hash, key_idx = keys
  length = key_hash.shape[-1]
  count = jnp.zeros(hashes.shape, jnp.int32)
  step = 1 << (length.bit_length() - 1)
  while step:
    candidate = count + step
    at = jnp.minimum(candidate, length) - 1
    h, i = jnp.take_along_axis(key_hash, at, axis=-1), jnp.take_along_axis(key_idx, at, axis=-1)
    before = (h < hashes) | ((h == hashes) & ((i <= idx) if inclusive else (i < idx)))
    count = jnp.where((candidate <= length) & before, candidate, count)
    step //= 2
  return count


def _tile_ends(real: jax.Array, block: int):
  """Per tile: first and last slot holding a real token (-1 when none), all slots real."""
  length = real.shape[-1]
  pad = -length % block
  real = jnp.pad(real, ((0, 0), (0, 0), (0, pad))).reshape(real.shape[:2] + (-1, block))
  slot = jnp.arange(length + pad, dtype=jnp.int32).reshape(-1, block)
  first = jnp.min(jnp.where(real, slot, _BIG), axis=-1)
  last = jnp.max(jnp.where(real, slot, -1), axis=-1)
  return jnp.where(last >= 0, first, -1), last, jnp.all(real, axis=-1)


def _ordered_plan(tokens, q_hash, k_hash, block_q, block_k, strict) -> TilePlan:
  """The plan from binary searches, for tokens whose real slots are in (hash, idx) order.

  A query (h, t) may attend exactly the real keys with key in [(h, -inf), (h, t)] (or
  below (h, t) when strict), one run of the key order; a key (h, s) is attended by the
  real queries in [(h, s), (h, +inf)] (or above (h, s)). A tile's range is the hull of
  its first and last real token's runs; it is full when the tile is all real and of one
  bucket and the run of its least permissive token covers whole tiles, all real.
  """
  q_real, k_real = tokens.q_idx >= 0, tokens.k_idx < K_PAD
  q_keys, k_keys = _filled_keys(tokens.q_idx, q_hash, q_real), _filled_keys(tokens.k_idx, k_hash, k_real)

  def view(lo, hi, full_lo, full_hi, uniform, any_real, other, block):
    """Tile ranges from slot bounds on the other side, whose tiles (of size `block`)
    are all real where `other` is True."""
    visit = any_real & (hi > lo)
    start, end = jnp.where(visit, lo // block, 0), jnp.where(visit, -(-hi // block), 0)
    full_start, full_end = -(-full_lo // block), full_hi // block
    whole = jnp.concatenate([jnp.zeros_like(other[..., :1], jnp.int32), jnp.cumsum(other, -1, dtype=jnp.int32)], -1)
    at = lambda x: jnp.take_along_axis(whole, jnp.clip(x, 0, whole.shape[-1] - 1), axis=-1)
    full = visit & uniform & (full_end > full_start) & (at(full_end) - at(full_start) == full_end - full_start)
    return start, end, jnp.where(full, full_start, start), jnp.where(full, full_end, start)

  def ends(hashes, idx, first, last):
    at = lambda x, slot: jnp.take_along_axis(x, jnp.maximum(slot, 0), axis=-1)
    return at(hashes, first), at(idx, first), at(hashes, last), at(idx, last)

  q_first, q_last, q_all = _tile_ends(q_real, block_q)
  k_first, k_last, k_all = _tile_ends(k_real, block_k)
  qh0, qi0, qh1, qi1 = ends(q_hash, tokens.q_idx, q_first, q_last)
  kh0, ki0, kh1, ki1 = ends(k_hash, tokens.k_idx, k_first, k_last)
  filled = lambda x, value: jnp.full_like(x, value)
  keys_before, keys_after = k_keys
  queries_before, queries_after = q_keys

  # Query tiles: keys from the first bucket's start to the last query's last key; full
  # when every key up to the first query's last key is in whole, real tiles.
  q_view = view(
      lo=_count_before(keys_before, qh0, filled(qh0, _SMALL), inclusive=False),
      hi=_count_before(keys_after, qh1, qi1, inclusive=not strict),
      full_lo=_count_before(keys_before, qh0, filled(qh0, _SMALL), inclusive=False),
      full_hi=_count_before(keys_after, qh0, qi0, inclusive=not strict),
      uniform=q_all & (qh0 == qh1), any_real=q_last >= 0, other=k_all, block=block_k,
  )  # fmt: skip
  # Key tiles: queries from the first key's first query to the last key's bucket end;
  # full when every query from the last key's first query to the bucket end is.
  k_view = view(
      lo=_count_before(queries_before, kh0, ki0, inclusive=strict),
      hi=_count_before(queries_after, kh1, filled(kh1, _BIG), inclusive=True),
      full_lo=_count_before(queries_before, kh0, ki1, inclusive=strict),
      full_hi=_count_before(queries_after, kh1, filled(kh1, _BIG), inclusive=True),
      uniform=k_all & (kh0 == kh1), any_real=k_last >= 0, other=q_all, block=block_q,
  )  # fmt: skip
  return TilePlan(*q_view, *k_view, block_q=block_q, block_k=block_k)
