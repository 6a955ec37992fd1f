"""The tile plan of ordered tokens in one kernel launch (Triton source only).

`scfa_jax/plan.py` states the rules and keeps the jnp version (`_ordered_plans`), the
oracle this kernel is tested against. In jnp each step of the binary searches is a small
XLA kernel of its own: about 40 launches per call, which the host issues one by one
before the first attention kernel can start. Here one program walks TILES tiles of one
(batch, head), with every search of those tiles unrolled in registers.

A program builds one view of one plan: QUERY_MAJOR gives a query tile's key range
`[start_n, end_n)` and full sub-range, otherwise a key tile's query range. Tokens are
ordered: real ones (positions in [0, K_PAD)) fill the first slots, in (hash, idx) order.
Lengths are runtime scalars, but the searches' step count LOG_LENGTH is a constexpr: one
compiled kernel per power-of-two range of lengths. Slot offsets are int32, as in
attention.py: B * N * length below 2**31.
"""

import triton
import triton.language as tl

from .attention import K_PAD

_SMALL = tl.constexpr(-(2**31))
_BIG = tl.constexpr(2**31 - 1)


@triton.jit
def _real_count(idx_ptr, LENGTH, LOG_LENGTH: tl.constexpr):
  """How many of the LENGTH slots hold real tokens: they come first, so a binary search."""
  count = 0
  for s in tl.static_range(LOG_LENGTH):
    candidate = count + (1 << (LOG_LENGTH - 1 - s))
    idx = tl.load(idx_ptr + tl.maximum(tl.minimum(candidate, LENGTH) - 1, 0))
    count = tl.where((candidate <= LENGTH) & (idx >= 0) & (idx < K_PAD), candidate, count)
  return count


@triton.jit
def _count_before(hash_ptr, idx_ptr, length, needle_hash, needle_idx, INCLUSIVE: tl.constexpr,
                  HASHED: tl.constexpr, LOG_LENGTH: tl.constexpr):  # fmt: skip
  """How many of the `length` sorted (hash, idx) slots come before each needle (or equal
  it, when INCLUSIVE): a binary search per lane. Without HASHED every hash is 0."""
  count = tl.zeros_like(needle_idx)
  for s in tl.static_range(LOG_LENGTH):
    candidate = count + (1 << (LOG_LENGTH - 1 - s))
    at = tl.maximum(tl.minimum(candidate, length) - 1, 0)
    idx = tl.load(idx_ptr + at)
    if INCLUSIVE:
      before = idx <= needle_idx
    else:
      before = idx < needle_idx
    if HASHED:
      slot_hash = tl.load(hash_ptr + at)
      before = (slot_hash < needle_hash) | ((slot_hash == needle_hash) & before)
    count = tl.where((candidate <= length) & before, candidate, count)
  return count


@triton.jit
def scfa_plan(
    own_idx_ptr, own_hash_ptr, other_idx_ptr, other_hash_ptr, OWN_LENGTH, OTHER_LENGTH,
    start_ptr, end_ptr, full_start_ptr, full_end_ptr,
    BLOCK: tl.constexpr, OTHER_BLOCK: tl.constexpr, QUERY_MAJOR: tl.constexpr, STRICT: tl.constexpr,
    HASHED: tl.constexpr, TILES: tl.constexpr, LOG_LENGTH: tl.constexpr, GROUP: tl.constexpr,
    SHARED: tl.constexpr,
):  # fmt: skip
  """One program per (TILES tiles of BLOCK own slots, batch * query head): each tile's range
  of OTHER_BLOCK tiles on the other side, and its full sub-range (empty at the start when
  none). "Own" is the query side when QUERY_MAJOR, else the key side; slot arrays are
  [B, N, LENGTH] for queries and [B, K, LENGTH] for keys, K = N // GROUP: query head n is
  paired with kv head n // GROUP. The outputs are [B, N, cdiv(OWN_LENGTH, BLOCK)], one plan
  per query head in both views.

  BLOCK = OTHER_BLOCK = 1 gives row ranges, each slot's run of other-side slots. SHARED (row
  ranges of one sequence on both sides, `SortedTokens.shared`) bounds each run by the row's
  own slot, where other tokens take a second search."""
  bh = tl.program_id(1)
  kv_bh = bh // GROUP  # b * K + the kv head of query head n, as bh = b * N + n
  own_bh, other_bh = (bh, kv_bh) if QUERY_MAJOR else (kv_bh, bh)
  num_tiles = tl.cdiv(OWN_LENGTH, BLOCK)
  own_idx_ptr += own_bh * OWN_LENGTH
  own_hash_ptr += own_bh * OWN_LENGTH
  other_idx_ptr += other_bh * OTHER_LENGTH
  other_hash_ptr += other_bh * OTHER_LENGTH
  own_count = _real_count(own_idx_ptr, OWN_LENGTH, LOG_LENGTH)
  other_count = _real_count(other_idx_ptr, OTHER_LENGTH, LOG_LENGTH)

  tile = tl.program_id(0) * TILES + tl.arange(0, TILES)
  first = tile * BLOCK
  last = tl.minimum(first + BLOCK, own_count) - 1
  any_real = first < own_count
  all_real = first + BLOCK <= own_count
  first_at = tl.minimum(first, OWN_LENGTH - 1)
  last_at = tl.minimum(tl.maximum(last, 0), OWN_LENGTH - 1)
  first_idx = tl.load(own_idx_ptr + first_at)
  last_idx = tl.load(own_idx_ptr + last_at)
  first_hash = tl.zeros_like(first_idx)
  last_hash = first_hash
  if HASHED:
    first_hash = tl.load(own_hash_ptr + first_at)
    last_hash = tl.load(own_hash_ptr + last_at)

  # A query (h, t) may attend the keys in [(h, -inf), (h, t)] (below (h, t) when STRICT);
  # a key (h, s) is attended by the queries in [(h, s), (h, +inf)] (above (h, s)). A tile's
  # range is the hull of its first and last token's runs; its full sub-range is the whole
  # tiles of its least permissive token's run.
  if QUERY_MAJOR:  # the first query's bucket start, its last key, the last query's last key
    lo_idx, full_idx, hi_idx = tl.full([TILES], _SMALL, tl.int32), first_idx, last_idx
  else:  # the first key's first query, the last key's first query, the last key's bucket end
    lo_idx, full_idx, hi_idx = first_idx, last_idx, tl.full([TILES], _BIG, tl.int32)
  # Queries attend the key at their own position unless STRICT: an inclusive key search.
  own = first + 1 if QUERY_MAJOR != STRICT else first  # of one sequence: the other side's bound at this slot
  if SHARED and not QUERY_MAJOR:
    lo = own
  else:
    lo = _count_before(other_hash_ptr, other_idx_ptr, other_count, first_hash, lo_idx, QUERY_MAJOR != STRICT,
                       HASHED, LOG_LENGTH)  # fmt: skip
  if SHARED and QUERY_MAJOR:
    hi = own
  else:
    hi = _count_before(other_hash_ptr, other_idx_ptr, other_count, last_hash, hi_idx, QUERY_MAJOR != STRICT,
                       HASHED, LOG_LENGTH)  # fmt: skip
  if BLOCK == 1:  # one token: the full bound is its own run's (row ranges)
    bound = hi if QUERY_MAJOR else lo
  else:
    bound = _count_before(other_hash_ptr, other_idx_ptr, other_count, first_hash, full_idx, QUERY_MAJOR != STRICT,
                          HASHED, LOG_LENGTH)  # fmt: skip
  if QUERY_MAJOR:
    full_lo, full_hi = lo, bound
  else:
    full_lo, full_hi = bound, hi

  visit = any_real & (hi > lo)
  start = tl.where(visit, lo // OTHER_BLOCK, 0)
  end = tl.where(visit, tl.cdiv(hi, OTHER_BLOCK), 0)
  full_start = tl.cdiv(full_lo, OTHER_BLOCK)
  full_end = full_hi // OTHER_BLOCK
  full = visit & all_real & (first_hash == last_hash) & (full_end > full_start)
  out = bh * num_tiles + tile
  in_bounds = tile < num_tiles
  tl.store(start_ptr + out, start, mask=in_bounds)
  tl.store(end_ptr + out, end, mask=in_bounds)
  tl.store(full_start_ptr + out, tl.where(full, full_start, start), mask=in_bounds)
  tl.store(full_end_ptr + out, tl.where(full, full_end, start), mask=in_bounds)
