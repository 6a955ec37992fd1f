"""The tile plan: which (query tile, key tile) pairs a kernel visits, and which need masks.

Tokens are sorted per (batch, head) by (hash, idx) (see `sorting.py`), so for every
query tile the key tiles that can hold an allowed pair form one contiguous range,
`[start_n, end_n)`, and for every key tile the query tiles form `[start_m, end_m)`.
Inside each range a sub-range `[full_start_*, full_end_*)` holds tiles where every
pair is allowed, which the kernels run without mask arithmetic.

Two builders give plans with the same guarantees: a visited range may contain tiles
without an allowed pair (the in-tile mask handles them), but a tile holding an allowed
pair is never skipped, and a tile is called full only when all its pairs are allowed.

- Ordered tokens (`SortedTokens.ordered`: our own sorts, real tokens first): the keys a
  query may attend are one run of the sorted key order, so each tile's range comes from
  binary searches for its first and last token: O(num_tiles * log L) per head, one
  batched search for all the plans a backend needs.
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

  Attributes (int32, B batch, N query heads, one entry per tile; with grouped-query keys a
  query head's plan pairs its queries with the keys of its kv head):
    start_n, end_n: [B, N, num_q_tiles]: key tiles `[start_n, end_n)` a query tile visits.
    full_start_n, full_end_n: the sub-range of those that needs no mask.
    start_m, end_m: [B, N, num_k_tiles]: query tiles `[start_m, end_m)` a key tile visits.
    full_start_m, full_end_m: the sub-range of those that needs no mask.
    block_q, block_k, num_q_tiles, num_k_tiles: tile sizes and counts (static).

  A view that was not asked for (`make_plans`'s `views`) holds None: each kernel reads one.
  """

  start_n: jax.Array | None
  end_n: jax.Array | None
  full_start_n: jax.Array | None
  full_end_n: jax.Array | None
  start_m: jax.Array | None
  end_m: jax.Array | None
  full_start_m: jax.Array | None
  full_end_m: jax.Array | None
  block_q: int = dataclasses.field(metadata=dict(static=True))
  block_k: int = dataclasses.field(metadata=dict(static=True))
  num_q_tiles: int = dataclasses.field(metadata=dict(static=True))
  num_k_tiles: int = dataclasses.field(metadata=dict(static=True))

  def to_dense(self, view: str = "q") -> jax.Array:
    """int8 [B, N, num_q_tiles, num_k_tiles] of SKIP / MASKED / FULL.

    view="q" is what the forward and dQ kernels visit (ranges per query tile),
    view="k" what the dK/dV kernel visits (ranges per key tile).
    """
    if view not in ("q", "k"):
      raise ValueError(f"view must be 'q' or 'k', got {view=}")
    if (self.start_n if view == "q" else self.start_m) is None:
      raise ValueError(f"this plan was built without its {view!r} view (make_plans(views=...))")
    if view == "q":
      return _dense(self.start_n, self.end_n, self.full_start_n, self.full_end_n, self.num_k_tiles)
    dense = _dense(self.start_m, self.end_m, self.full_start_m, self.full_end_m, self.num_q_tiles)
    return jnp.swapaxes(dense, -1, -2)

  def sparsity(self) -> float:
    """Fraction of the num_q_tiles x num_k_tiles rectangle the plan skips (q view, else k)."""
    start, end, other = (
        (self.start_n, self.end_n, self.num_k_tiles) if self.start_n is not None else
        (self.start_m, self.end_m, self.num_q_tiles)
    )  # fmt: skip
    return float(1.0 - jnp.sum(end - start) / (start.size * other))

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
  return make_plans(tokens, [(block_q, block_k)], strict=strict)[0]


def make_plans(tokens: SortedTokens, shapes, *, strict: bool, views=None) -> list[TilePlan]:
  """One plan per (block_q, block_k) in `shapes`.

  `views` names, per shape, the views to build: "q" (query-major: the forward and dQ
  kernels), "k" (key-major: the dK/dV kernel) or "qk" (both, the default). For ordered
  tokens all the plans share one batched binary search: on a GPU each of its log2(L)
  steps is one small kernel, whatever the number of plans, and each skipped view saves
  a third of its needles. Bounding-box plans always hold both views.
  """
  tokens = _per_query_head(tokens)
  views = ["qk"] * len(shapes) if views is None else list(views)
  if len(views) != len(shapes) or not set(views) <= {"q", "k", "qk"}:
    raise ValueError(f"views must hold 'q', 'k' or 'qk' for each of the {len(shapes)} shapes, got {views=}")
  q_hash, k_hash = (
      (tokens.q_hash, tokens.k_hash)
      if tokens.hashed
      else (jnp.zeros_like(tokens.q_idx), jnp.zeros_like(tokens.k_idx))
  )
  if tokens.ordered:
    return _ordered_plans(tokens, q_hash, k_hash, list(zip(shapes, views, strict=True)), strict)
  return [_box_plan(tokens, q_hash, k_hash, block_q, block_k, strict) for block_q, block_k in shapes]


def _per_query_head(tokens: SortedTokens) -> SortedTokens:
  """Grouped-query tokens (keys of K heads, K dividing the N query heads) with each kv head's
  per-key idx and hash repeated for the N // K query heads of its group: a plan pairs query
  head n with kv head n // (N // K). Only these int32 vectors are repeated, never rows;
  the plan kernel (kernels/plan.py) reads the kv head's own vectors instead."""
  heads, kv_heads = tokens.q_idx.shape[1], tokens.k_idx.shape[1]
  if heads == kv_heads:
    return tokens
  repeat = lambda x: None if x is None else jnp.repeat(x, heads // kv_heads, axis=1)
  return dataclasses.replace(
      tokens, k_perm=repeat(tokens.k_perm), k_idx=repeat(tokens.k_idx), k_hash=repeat(tokens.k_hash)
  )


def _box_plan(tokens, q_hash, k_hash, block_q, block_k, strict) -> TilePlan:
  """The plan from per-tile bounding boxes of (hash, idx), for tokens in any order."""
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
      block_q=block_q, block_k=block_k, num_q_tiles=visit.shape[-2], num_k_tiles=visit.shape[-1],
  )  # fmt: skip


def _search(hay_hash, hay_idx, needle_hash, needle_idx, *, offset, length, inclusive, max_length) -> jax.Array:
  """How many of the `length` (at most `max_length`) sorted (hash, idx) pairs at `offset`
  in the haystack ([B, N, L] arrays) come before each needle (or equal, where `inclusive`):
  a binary search for [B, N, M] needles at once, unrolled into log2(max_length) gather steps."""
  total = hay_hash.shape[-1]
  count = jnp.zeros(needle_hash.shape, jnp.int32)
  step = 1 << (max_length.bit_length() - 1)
  while step:
    candidate = count + step
    at = jnp.clip(offset + jnp.minimum(candidate, length) - 1, 0, total - 1)
    h, i = jnp.take_along_axis(hay_hash, at, axis=-1), jnp.take_along_axis(hay_idx, at, axis=-1)
    before = (h < needle_hash) | ((h == needle_hash) & ((i < needle_idx) | (inclusive & (i == needle_idx))))
    count = jnp.where((candidate <= length) & before, candidate, count)
    step //= 2
  return count


@dataclasses.dataclass(frozen=True)
class _TileEnds:
  """The first and last real token of each tile of one side; [B, N, num_tiles]."""

  any_real: jax.Array
  all_real: jax.Array
  first_hash: jax.Array
  first_idx: jax.Array
  last_hash: jax.Array
  last_idx: jax.Array


def _tile_ends(hashes: jax.Array, idx: jax.Array, count: jax.Array, block: int) -> _TileEnds:
  """Tile ends when the `count` [B, N] real tokens are the first slots."""
  length = idx.shape[-1]
  first = jnp.arange(0, length, block, dtype=jnp.int32)
  last = jnp.minimum(first + block, count[..., None]) - 1
  at = lambda x, slot: jnp.take_along_axis(x, jnp.broadcast_to(jnp.clip(slot, 0, length - 1), last.shape), -1)
  return _TileEnds(
      any_real=first < count[..., None],
      all_real=first + block <= count[..., None],
      first_hash=at(hashes, first),
      first_idx=at(idx, first),
      last_hash=at(hashes, last),
      last_idx=at(idx, last),
  )


def _ordered_plans(tokens, q_hash, k_hash, requests, strict) -> list[TilePlan]:
  """Plans from binary searches, for tokens whose real slots come first, in (hash, idx) order.

  A query (h, t) may attend exactly the keys in [(h, -inf), (h, t)] (or below (h, t) when
  strict), one run of the key order; a key (h, s) is attended by the queries in
  [(h, s), (h, +inf)] (or above (h, s)). A tile's range is the hull of its first and last
  token's runs. It is full when the tile is all real and of one bucket, over the whole
  tiles of its least permissive token's run, which hold real tokens only, since they
  lie below a count of real tokens.
  """
  q_count = jnp.sum(tokens.q_idx >= 0, axis=-1, dtype=jnp.int32)
  k_count = jnp.sum(tokens.k_idx < K_PAD, axis=-1, dtype=jnp.int32)
  num_keys = tokens.k_idx.shape[-1]
  q_blocks = dict.fromkeys(bq for (bq, _), views in requests if "q" in views)
  k_blocks = dict.fromkeys(bk for (_, bk), views in requests if "k" in views)
  q_ends = {bq: _tile_ends(q_hash, tokens.q_idx, q_count, bq) for bq in q_blocks}
  k_ends = {bk: _tile_ends(k_hash, tokens.k_idx, k_count, bk) for bk in k_blocks}
  small = lambda x: jnp.full_like(x, _SMALL)
  big = lambda x: jnp.full_like(x, _BIG)

  # Every search at once: query tiles search the keys (haystack slots [0, LK)), key
  # tiles the queries (slots [LK, LK + LQ)). Keyed (side, block, bound): (hash, idx) per tile.
  needles = {}
  for bq, e in q_ends.items():
    needles["q", bq, "lo"] = (e.first_hash, small(e.first_idx))  # the first query's bucket start
    needles["q", bq, "hi"] = (e.last_hash, e.last_idx)  # the last query's last key
    needles["q", bq, "full_hi"] = (e.first_hash, e.first_idx)  # the first query's last key
  for bk, e in k_ends.items():
    needles["k", bk, "lo"] = (e.first_hash, e.first_idx)  # the first key's first query
    needles["k", bk, "full_lo"] = (e.first_hash, e.last_idx)  # the last key's first query
    needles["k", bk, "hi"] = (e.last_hash, big(e.last_idx))  # the last key's bucket end
  sizes = [h.shape[-1] for h, _ in needles.values()]
  on_keys = np.concatenate([np.full(m, name[0] == "q") for name, m in zip(needles, sizes, strict=True)])
  found = _search(
      jnp.concatenate([k_hash, q_hash], -1),
      jnp.concatenate([tokens.k_idx, tokens.q_idx], -1),
      jnp.concatenate([h for h, _ in needles.values()], -1),
      jnp.concatenate([i for _, i in needles.values()], -1),
      offset=np.where(on_keys, 0, num_keys).astype(np.int32),
      length=jnp.where(on_keys, k_count[..., None], q_count[..., None]),
      inclusive=on_keys != strict,  # queries include keys at their own position unless strict
      max_length=max(num_keys, tokens.q_idx.shape[-1]),
  )
  bounds = dict(zip(needles, jnp.split(found, np.cumsum(sizes)[:-1], axis=-1), strict=True))

  def view(lo, hi, full_lo, full_hi, ends, block):
    """Tile ranges from slot bounds on the other side, cut in tiles of `block`."""
    visit = ends.any_real & (hi > lo)
    start, end = jnp.where(visit, lo // block, 0), jnp.where(visit, -(-hi // block), 0)
    full_start, full_end = -(-full_lo // block), full_hi // block
    full = visit & ends.all_real & (ends.first_hash == ends.last_hash) & (full_end > full_start)
    return start, end, jnp.where(full, full_start, start), jnp.where(full, full_end, start)

  plans = []
  for (bq, bk), views in requests:
    q = lambda name: bounds["q", bq, name]
    k = lambda name: bounds["k", bk, name]
    q_view = view(q("lo"), q("hi"), q("lo"), q("full_hi"), q_ends[bq], bk) if "q" in views else (None,) * 4
    k_view = view(k("lo"), k("hi"), k("full_lo"), k("hi"), k_ends[bk], bq) if "k" in views else (None,) * 4
    tiles = dict(num_q_tiles=-(-tokens.q_idx.shape[-1] // bq), num_k_tiles=-(-num_keys // bk))
    plans.append(TilePlan(*q_view, *k_view, block_q=bq, block_k=bk, **tiles))
  return plans
