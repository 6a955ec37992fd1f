"""SCFA forward and backward kernels (Triton source only).

One forward kernel and one backward family serve both modes: the HASHED and STRICT
constexprs pick the mask rule. Every kernel reads rows of q, k, v, dO through the sort
permutation (`q_perm`, `k_perm`: rows of H contiguous elements in [B, T, N, H]) and
stores O, dQ, dK, dV straight at the original rows, so the host never gathers,
transposes or scatters them. Grouped-query attention: k and v have K heads, K dividing the
N query heads, and query head n reads kv head n // (N // K) through its row offsets and
its slot offset `(b * K + n // (N // K)) * LK`, so k and v are never repeated. The dK/dV
kernel runs one program per key tile of a kv head and loops over the query heads of its
group, accumulating in registers. Per-slot vectors (q_idx, k_idx, hashes, lse, delta) are
head-major [B, N, LQ] / [B, K, LK] in sorted order, one slot per row: the slot counts LQ
and LK equal the row counts T and S, and only they are declared multiples of 16 (ALIGNED).
Slots past the end read no row. Lengths are runtime scalars, so one compiled kernel serves
every length. With ROW_RANGES (ordered tokens) the four idx and hash pointers carry row
ranges instead (`triton_backend.RowRanges`): each query slot's range [lo, hi) of key slots,
[B, N, LQ], and each key slot's range of query slots per query head, [B, N, LK]; a kernel
reads its own side's, and a masked tile compares slot numbers: no load in the loop.

Each program walks the contiguous tile range `[start, end)` that the tile plan gives
it; only tiles outside the plan's full sub-range `[full_start, full_end)` pay for mask
arithmetic. Either the range runs as three loops (masked, full, masked) or, with
ONE_LOOP, as one software-pipelined loop that branches on the tile index; with PREFETCH
each loop reads the next tile's permutation a step ahead, so the rows' copies stay in
flight across steps. A loop over an empty range is not entered: it would still read its
first tile's permutation and wait for its pipeline's prologue. The log-sum-exp is kept
in base 2 of the scaled logits; a row with no allowed key stores +inf, which turns
every probability of the backward into exactly 0.
"""

import triton
import triton.language as tl

K_PAD = tl.constexpr(2**30)


@triton.jit
def _allowed(qi, kj, qh, kh, HASHED: tl.constexpr, STRICT: tl.constexpr, CHECK_PADS: tl.constexpr):
  """The SCFA rule on broadcast views: qi, qh as [M, 1] and kj, kh as [1, N] give a
  query-major tile, the transposed views a key-major one.

  Without CHECK_PADS the causal comparison alone rules padding out: right when every real
  position lies in [0, K_PAD), as our own sorts' do, so that Q_PAD = -1 precedes every key
  and K_PAD follows every query. A caller's positions may lie anywhere: CHECK_PADS."""
  if STRICT:
    ok = qi > kj
  else:
    ok = qi >= kj
  if CHECK_PADS:
    ok = ok & (qi >= 0) & (kj < K_PAD)
  if HASHED:
    ok = ok & (qh == kh)
  return ok


@triton.jit
def _multiple_of_16(x, ALIGNED: tl.constexpr):
  """x, declared a multiple of 16 when ALIGNED. jax-triton passes int arguments without the
  divisibility specialization Triton's own launcher gives them; without it the per-slot
  loads at `bh * LQ` lose their vector width and most of their software pipelining."""
  if ALIGNED:  # tl.multiple_of does not reach function arguments; a product with 16 does
    x = (x // 16) * 16
  return x


@triton.jit
def _row_offsets(perm_ptr, slot, in_bounds, b, n, ROWS, N: tl.constexpr, H: tl.constexpr, WIDE: tl.constexpr):
  """(element offsets, holds a row) of the rows of head (b, n) that slots `slot` read
  through perm; ROWS is the length of the row axis (T or S). Offsets are 32-bit unless
  WIDE (an array of 2**31 elements or more): 64-bit math costs the inner loops about ten
  integer instructions per gathered row. Slots past the end (row -1) get offsets too, never
  dereferenced: every load and store through them is masked by `holds a row`."""
  row = tl.load(perm_ptr + slot, mask=in_bounds, other=-1)
  if WIDE:
    offset = ((b * ROWS + row).to(tl.int64) * N + n) * H
  else:
    offset = ((b * ROWS + row) * N + n) * H
  return offset, row >= 0


@triton.jit
def _tile_rows(perm_ptr, tile, LENGTH, b, n, ROWS, BLOCK: tl.constexpr, N: tl.constexpr, H: tl.constexpr,
               WIDE: tl.constexpr):  # fmt: skip
  """`_row_offsets` of the BLOCK slots of tile `tile` (LENGTH slots in all)."""
  slot = tile * BLOCK + tl.arange(0, BLOCK)
  return _row_offsets(perm_ptr, slot, slot < LENGTH, b, n, ROWS, N, H, WIDE)


@triton.jit
def _streamed_rows(offset, valid, perm_ptr, tile, LENGTH, b, n, ROWS, BLOCK: tl.constexpr, N: tl.constexpr,
                   H: tl.constexpr, WIDE: tl.constexpr, PREFETCH: tl.constexpr):  # fmt: skip
  """(this tile's row offsets and validity, the values to carry to the next step) of a tile
  loop. With PREFETCH, `offset` and `valid` were loaded one step ahead, and this step loads
  the next tile's: the rows this step reads then take their addresses from a loop-carried
  value, so Triton pipelines their copies like plain loads, num_stages - 1 tiles ahead. Read
  in the same step, the permutation sits in front of every copy, and each step waits for all
  of its copies before its first product (no copy in flight across the step)."""
  if PREFETCH:
    next_offset, next_valid = _tile_rows(perm_ptr, tile + 1, LENGTH, b, n, ROWS, BLOCK, N, H, WIDE)
  else:
    offset, valid = _tile_rows(perm_ptr, tile, LENGTH, b, n, ROWS, BLOCK, N, H, WIDE)
    next_offset, next_valid = offset, valid
  return offset, valid, next_offset, next_valid


@triton.jit
def _load_rows(ptr, offset, valid, H: tl.constexpr):
  """The [BLOCK, H] rows at `offset` (H contiguous elements each); 0 where not valid."""
  return tl.load(ptr + offset[:, None] + tl.arange(0, H)[None, :], mask=valid[:, None], other=0.0)


@triton.jit
def _token_keys(idx_ptr, hash_ptr, slot, in_bounds, PAD: tl.constexpr, HASHED: tl.constexpr):
  """Causal index and bucket of sorted slots (the bucket is the index when not HASHED)."""
  idx = tl.load(idx_ptr + slot, mask=in_bounds, other=PAD)
  hashes = idx
  if HASHED:
    hashes = tl.load(hash_ptr + slot, mask=in_bounds, other=0)
  return idx, hashes


@triton.jit
def _own_keys(idx_ptr, hash_ptr, slot, in_bounds, PAD: tl.constexpr, HASHED: tl.constexpr,
              ROW_RANGES: tl.constexpr):  # fmt: skip
  """What the mask needs of the program's own slots: with ROW_RANGES the range
  [lo, hi) of other-side slots each may pair with (empty past the end), else
  `_token_keys`."""
  if ROW_RANGES:
    lo = tl.load(idx_ptr + slot, mask=in_bounds, other=0)
    hi = tl.load(hash_ptr + slot, mask=in_bounds, other=0)
    return lo, hi
  else:
    return _token_keys(idx_ptr, hash_ptr, slot, in_bounds, PAD, HASHED)


@triton.jit
def _masked(x, fill, own_idx, own_hash, other_idx_ptr, other_hash_ptr, slot, in_bounds,
            QUERY_ROWS: tl.constexpr, HASHED: tl.constexpr, STRICT: tl.constexpr,
            CHECK_PADS: tl.constexpr, ROW_RANGES: tl.constexpr):  # fmt: skip
  """x with disallowed pairs set to `fill`. The rows of x are the program's own tokens
  (queries if QUERY_ROWS, else keys); its columns are the streamed tile's, at `slot`.
  With ROW_RANGES own_idx and own_hash are each own slot's range [lo, hi) of streamed
  slots (`_own_keys`): a comparison of slot numbers, with no load."""
  if ROW_RANGES:
    allowed = (slot[None, :] >= own_idx[:, None]) & (slot[None, :] < own_hash[:, None])
  elif QUERY_ROWS:
    k_idx, k_hash = _token_keys(other_idx_ptr, other_hash_ptr, slot, in_bounds, K_PAD, HASHED)
    allowed = _allowed(own_idx[:, None], k_idx[None, :], own_hash[:, None], k_hash[None, :], HASHED, STRICT, CHECK_PADS)
  else:
    q_idx, q_hash = _token_keys(other_idx_ptr, other_hash_ptr, slot, in_bounds, -1, HASHED)
    allowed = _allowed(q_idx[None, :], own_idx[:, None], q_hash[None, :], own_hash[:, None], HASHED, STRICT, CHECK_PADS)
  return tl.where(allowed, x, fill)


@triton.jit
def _mask_tile(x, fill, tile, full_lo, full_hi, own_idx, own_hash, other_idx_ptr, other_hash_ptr, slot, in_bounds,
               QUERY_ROWS: tl.constexpr, HASHED: tl.constexpr, STRICT: tl.constexpr, CHECK_PADS: tl.constexpr,
               ROW_RANGES: tl.constexpr, MASKED: tl.constexpr, BRANCH: tl.constexpr):  # fmt: skip
  """The in-tile mask where the plan asks for it: every tile of a masked loop, or with
  BRANCH (one loop over the whole range) the tiles outside [full_lo, full_hi)."""
  if MASKED:
    if BRANCH:
      if (tile < full_lo) | (tile >= full_hi):
        x = _masked(
            x, fill, own_idx, own_hash, other_idx_ptr, other_hash_ptr, slot, in_bounds,
            QUERY_ROWS, HASHED, STRICT, CHECK_PADS, ROW_RANGES,
        )  # fmt: skip
    else:
      x = _masked(
          x, fill, own_idx, own_hash, other_idx_ptr, other_hash_ptr, slot, in_bounds,
          QUERY_ROWS, HASHED, STRICT, CHECK_PADS, ROW_RANGES,
      )  # fmt: skip
  return x


@triton.jit
def _rows_to_read(valid, start_ptr, end_ptr, tile, tile_stride, GROUP: tl.constexpr,
                  SKIP_EMPTY: tl.constexpr):  # fmt: skip
  """The rows of a tile worth reading: with SKIP_EMPTY none when the tile's range is empty.
  Such a tile (QK mode's dropped tail: most of them at high drop rates) only stores zeros.
  A kv head's key tile serves GROUP query heads, whose ranges lie tile_stride apart: it is
  read when any of them is not empty."""
  if SKIP_EMPTY:
    work = tl.load(end_ptr + tile) - tl.load(start_ptr + tile)
    if GROUP > 1:
      for g in range(1, GROUP):
        at = tile + g * tile_stride
        work = tl.maximum(work, tl.load(end_ptr + at) - tl.load(start_ptr + at))
    valid = tl.where(work > 0, valid, False)  # `&` breaks the interpreter
  return valid


@triton.jit
def _parts(start_ptr, end_ptr, full_start_ptr, full_end_ptr, tile, PART: tl.constexpr, ONE_LOOP: tl.constexpr):
  """(lo, hi, full_lo, full_hi) of loop PART over a tile's range.

  ONE_LOOP: one part, the whole range, with the full sub-range in it. Otherwise part 0 is
  the masked head, part 1 the full middle, part 2 the masked tail.
  """
  lo = tl.load(start_ptr + tile)
  hi = tl.load(end_ptr + tile)
  full_lo = tl.load(full_start_ptr + tile)
  full_hi = tl.load(full_end_ptr + tile)
  if not ONE_LOOP:
    if PART == 0:
      hi = full_lo
      full_hi = full_lo
    elif PART == 1:
      lo = full_lo
      hi = full_hi
    else:
      lo = full_hi
      full_lo = full_hi
  return lo, hi, full_lo, full_hi


@triton.jit
def _fwd_tiles(
    acc, m_i, l_i, q, q_idx, q_hash,
    k_ptr, v_ptr, k_perm_ptr, k_idx_ptr, k_hash_ptr, b, kv, S, LK, lo, hi, full_lo, full_hi,
    QK_SCALE: tl.constexpr, K: tl.constexpr, H: tl.constexpr, BLOCK_N: tl.constexpr,
    HASHED: tl.constexpr, STRICT: tl.constexpr, CHECK_PADS: tl.constexpr, ROW_RANGES: tl.constexpr,
    PRECISION: tl.constexpr, WIDE: tl.constexpr, SCALE_AFTER_MAX: tl.constexpr, MASKED: tl.constexpr,
    BRANCH: tl.constexpr, PREFETCH: tl.constexpr,
):  # fmt: skip
  k_offset, k_valid = _tile_rows(k_perm_ptr, lo, LK, b, kv, S, BLOCK_N, K, H, WIDE)
  for j in range(lo, hi):
    slot = j * BLOCK_N + tl.arange(0, BLOCK_N)
    in_bounds = slot < LK
    k_offset, k_valid, next_offset, next_valid = _streamed_rows(
        k_offset, k_valid, k_perm_ptr, j, LK, b, kv, S, BLOCK_N, K, H, WIDE, PREFETCH
    )
    k = _load_rows(k_ptr, k_offset, k_valid, H)
    v = _load_rows(v_ptr, k_offset, k_valid, H)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if not SCALE_AFTER_MAX:
      s = s * QK_SCALE
    s = _mask_tile(
        s, float("-inf"), j, full_lo, full_hi, q_idx, q_hash, k_idx_ptr, k_hash_ptr, slot, in_bounds,
        True, HASHED, STRICT, CHECK_PADS, ROW_RANGES, MASKED, BRANCH,
    )  # fmt: skip
    if SCALE_AFTER_MAX:  # max(c s) = c max(s) for c > 0: one multiply per row, not per score
      m_new = tl.maximum(m_i, tl.max(s, 1) * QK_SCALE)
    else:
      m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
    alpha = tl.math.exp2(m_i - m_safe)
    if SCALE_AFTER_MAX:
      s = s * QK_SCALE  # fused with the subtraction below into one FFMA
    p = tl.math.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    m_i = m_new
    k_offset, k_valid = next_offset, next_valid
  return acc, m_i, l_i


@triton.jit
def scfa_fwd(
    q_ptr, k_ptr, v_ptr, q_perm_ptr, k_perm_ptr, q_idx_ptr, k_idx_ptr, q_hash_ptr, k_hash_ptr,
    start_n_ptr, end_n_ptr, full_start_n_ptr, full_end_n_ptr, T, S, LQ, LK,
    o_ptr, lse_ptr,
    QK_SCALE: tl.constexpr, N: tl.constexpr, K: tl.constexpr, H: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HASHED: tl.constexpr, STRICT: tl.constexpr, CHECK_PADS: tl.constexpr, ROW_RANGES: tl.constexpr,
    PRECISION: tl.constexpr, ONE_LOOP: tl.constexpr, ALIGNED: tl.constexpr, WIDE: tl.constexpr,
    SKIP_EMPTY: tl.constexpr, PREFETCH: tl.constexpr, SCALE_AFTER_MAX: tl.constexpr,
):  # fmt: skip
  """One program per (query tile, batch * query head): O and lse for BLOCK_M sorted query slots."""
  LQ = _multiple_of_16(LQ, ALIGNED)
  LK = _multiple_of_16(LK, ALIGNED)
  pid_m = tl.program_id(0)
  bh = tl.program_id(1)
  b = bh // N
  n = bh % N
  kv_bh = bh // (N // K)  # b * K + the kv head of query head n
  slot = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
  in_bounds = slot < LQ
  q_offset, q_valid = _row_offsets(q_perm_ptr + bh * LQ, slot, in_bounds, b, n, T, N, H, WIDE)
  tile = bh * tl.num_programs(0) + pid_m
  q = _load_rows(q_ptr, q_offset, _rows_to_read(q_valid, start_n_ptr, end_n_ptr, tile, 0, 1, SKIP_EMPTY), H)
  q_idx, q_hash = _own_keys(q_idx_ptr + bh * LQ, q_hash_ptr + bh * LQ, slot, in_bounds, -1, HASHED, ROW_RANGES)

  m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
  l_i = tl.zeros([BLOCK_M], tl.float32)
  acc = tl.zeros([BLOCK_M, H], tl.float32)
  for part in tl.static_range(3 - 2 * ONE_LOOP):
    lo, hi, full_lo, full_hi = _parts(start_n_ptr, end_n_ptr, full_start_n_ptr, full_end_n_ptr, tile, part, ONE_LOOP)
    if lo < hi:
      acc, m_i, l_i = _fwd_tiles(
          acc, m_i, l_i, q, q_idx, q_hash,
          k_ptr, v_ptr, k_perm_ptr + kv_bh * LK, k_idx_ptr + kv_bh * LK, k_hash_ptr + kv_bh * LK,
          b, kv_bh % K, S, LK, lo, hi, full_lo, full_hi, QK_SCALE, K, H, BLOCK_N, HASHED, STRICT, CHECK_PADS,
          ROW_RANGES, PRECISION, WIDE, SCALE_AFTER_MAX, part != 1, ONE_LOOP, PREFETCH,
      )  # fmt: skip

  has_key = l_i > 0.0
  o = acc / tl.where(has_key, l_i, 1.0)[:, None]
  lse = tl.where(has_key, m_i + tl.math.log2(tl.where(has_key, l_i, 1.0)), float("inf"))
  tl.store(o_ptr + q_offset[:, None] + tl.arange(0, H)[None, :], o.to(o_ptr.dtype.element_ty), mask=q_valid[:, None])
  tl.store(lse_ptr + bh * LQ + slot, lse, mask=in_bounds)


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v, k_idx, k_hash,
    q_ptr, do_ptr, q_perm_ptr, q_idx_ptr, q_hash_ptr, lse_ptr, delta_ptr, b, n, T, LQ, lo, hi, full_lo, full_hi,
    QK_SCALE: tl.constexpr, N: tl.constexpr, H: tl.constexpr, BLOCK_M: tl.constexpr,
    HASHED: tl.constexpr, STRICT: tl.constexpr, CHECK_PADS: tl.constexpr, ROW_RANGES: tl.constexpr,
    PRECISION: tl.constexpr, WIDE: tl.constexpr, MASKED: tl.constexpr, BRANCH: tl.constexpr,
    PREFETCH: tl.constexpr,
):  # fmt: skip
  q_offset, q_valid = _tile_rows(q_perm_ptr, lo, LQ, b, n, T, BLOCK_M, N, H, WIDE)
  for i in range(lo, hi):
    slot = i * BLOCK_M + tl.arange(0, BLOCK_M)
    in_bounds = slot < LQ
    q_offset, q_valid, next_offset, next_valid = _streamed_rows(
        q_offset, q_valid, q_perm_ptr, i, LQ, b, n, T, BLOCK_M, N, H, WIDE, PREFETCH
    )
    q = _load_rows(q_ptr, q_offset, q_valid, H)
    do = _load_rows(do_ptr, q_offset, q_valid, H)
    lse = tl.load(lse_ptr + slot, mask=in_bounds, other=float("inf"))
    delta = tl.load(delta_ptr + slot, mask=in_bounds, other=0.0)
    # Key-major like Triton's tutorial: only loaded tiles get transposed, never computed ones.
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * QK_SCALE  # [BLOCK_N, BLOCK_M]
    p_t = tl.math.exp2(s_t - lse[None, :])
    p_t = _mask_tile(
        p_t, 0.0, i, full_lo, full_hi, k_idx, k_hash, q_idx_ptr, q_hash_ptr, slot, in_bounds,
        False, HASHED, STRICT, CHECK_PADS, ROW_RANGES, MASKED, BRANCH,
    )  # fmt: skip
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    q_offset, q_valid = next_offset, next_valid
  return dk, dv


@triton.jit
def _dkdv_head(
    dk, dv, k, v, k_idx, k_hash, bh, tile,
    q_ptr, do_ptr, q_perm_ptr, q_idx_ptr, q_hash_ptr, lse_ptr, delta_ptr,
    start_m_ptr, end_m_ptr, full_start_m_ptr, full_end_m_ptr, T, LQ,
    QK_SCALE: tl.constexpr, N: tl.constexpr, H: tl.constexpr, BLOCK_M: tl.constexpr,
    HASHED: tl.constexpr, STRICT: tl.constexpr, CHECK_PADS: tl.constexpr, ROW_RANGES: tl.constexpr,
    PRECISION: tl.constexpr, WIDE: tl.constexpr, ONE_LOOP: tl.constexpr, PREFETCH: tl.constexpr,
):  # fmt: skip
  """dK and dV of a key tile plus what the queries of query head bh (b * N + n) add to them:
  the query-tile range at `tile` of the plan's key view."""
  for part in tl.static_range(3 - 2 * ONE_LOOP):
    lo, hi, full_lo, full_hi = _parts(start_m_ptr, end_m_ptr, full_start_m_ptr, full_end_m_ptr, tile, part, ONE_LOOP)
    if lo < hi:
      dk, dv = _dkdv_tiles(
          dk, dv, k, v, k_idx, k_hash,
          q_ptr, do_ptr, q_perm_ptr + bh * LQ, q_idx_ptr + bh * LQ, q_hash_ptr + bh * LQ, lse_ptr + bh * LQ,
          delta_ptr + bh * LQ, bh // N, bh % N, T, LQ,
          lo, hi, full_lo, full_hi, QK_SCALE, N, H, BLOCK_M, HASHED, STRICT, CHECK_PADS, ROW_RANGES, PRECISION,
          WIDE, part != 1, ONE_LOOP, PREFETCH,
      )  # fmt: skip
  return dk, dv


@triton.jit
def scfa_bwd_dkdv(
    q_ptr, k_ptr, v_ptr, do_ptr, q_perm_ptr, k_perm_ptr, q_idx_ptr, k_idx_ptr, q_hash_ptr, k_hash_ptr,
    lse_ptr, delta_ptr, start_m_ptr, end_m_ptr, full_start_m_ptr, full_end_m_ptr, T, S, LQ, LK,
    dk_ptr, dv_ptr,
    SM_SCALE: tl.constexpr, QK_SCALE: tl.constexpr, N: tl.constexpr, K: tl.constexpr, H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HASHED: tl.constexpr, STRICT: tl.constexpr, CHECK_PADS: tl.constexpr, ROW_RANGES: tl.constexpr,
    PRECISION: tl.constexpr, ONE_LOOP: tl.constexpr, ALIGNED: tl.constexpr, WIDE: tl.constexpr,
    SKIP_EMPTY: tl.constexpr, PREFETCH: tl.constexpr,
):  # fmt: skip
  """One program per (key tile, batch * kv head): dK and dV of BLOCK_N sorted key slots.

  The plan's key view holds one range per (query head, key tile) of [B, N, num_k_tiles]: the
  program walks the ranges of the N // K query heads of its kv head in turn, accumulating
  dK and dV in registers, so the group's sum takes no atomics, no partials in HBM and is
  summed in a fixed order (deterministic). delta = rowsum(dO * O) per sorted query slot,
  [B, N, LQ], as `scfa_bwd_dq` stores it.
  """
  GROUP: tl.constexpr = N // K
  LQ = _multiple_of_16(LQ, ALIGNED)
  LK = _multiple_of_16(LK, ALIGNED)
  pid_n = tl.program_id(0)
  kv_bh = tl.program_id(1)
  b = kv_bh // K
  slot = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
  in_bounds = slot < LK
  k_offset, k_valid = _row_offsets(k_perm_ptr + kv_bh * LK, slot, in_bounds, b, kv_bh % K, S, K, H, WIDE)
  num_tiles = tl.num_programs(0)
  first_tile = kv_bh * GROUP * num_tiles + pid_n  # the plan's tile of the group's first query head
  k_read = _rows_to_read(k_valid, start_m_ptr, end_m_ptr, first_tile, num_tiles, GROUP, SKIP_EMPTY)
  k = _load_rows(k_ptr, k_offset, k_read, H)
  v = _load_rows(v_ptr, k_offset, k_read, H)
  # One kv head's idx and hash serve its group, but row ranges are per query head ([B, N, LK]):
  # with groups, each head's are loaded in the loop below.
  PER_HEAD: tl.constexpr = ROW_RANGES and GROUP > 1
  if not PER_HEAD:
    k_idx, k_hash = _own_keys(k_idx_ptr + kv_bh * LK, k_hash_ptr + kv_bh * LK, slot, in_bounds, K_PAD, HASHED,
                              ROW_RANGES)  # fmt: skip

  dk = tl.zeros([BLOCK_N, H], tl.float32)
  dv = tl.zeros([BLOCK_N, H], tl.float32)
  head = (
      q_ptr, do_ptr, q_perm_ptr, q_idx_ptr, q_hash_ptr, lse_ptr, delta_ptr,
      start_m_ptr, end_m_ptr, full_start_m_ptr, full_end_m_ptr, T, LQ,
  )  # fmt: skip
  if GROUP == 1:  # no loop around the tile loops: the kernel without groups, as tuned
    dk, dv = _dkdv_head(
        dk, dv, k, v, k_idx, k_hash, kv_bh, first_tile, *head,
        QK_SCALE, N, H, BLOCK_M, HASHED, STRICT, CHECK_PADS, ROW_RANGES, PRECISION, WIDE, ONE_LOOP, PREFETCH,
    )  # fmt: skip
  else:
    for g in range(GROUP):
      bh = kv_bh * GROUP + g
      if PER_HEAD:
        k_idx, k_hash = _own_keys(k_idx_ptr + bh * LK, k_hash_ptr + bh * LK, slot, in_bounds, K_PAD, HASHED, True)
      dk, dv = _dkdv_head(
          dk, dv, k, v, k_idx, k_hash, bh, first_tile + g * num_tiles, *head,
          QK_SCALE, N, H, BLOCK_M, HASHED, STRICT, CHECK_PADS, ROW_RANGES, PRECISION, WIDE, ONE_LOOP, PREFETCH,
      )  # fmt: skip

  offsets = k_offset[:, None] + tl.arange(0, H)[None, :]
  tl.store(dk_ptr + offsets, (dk * SM_SCALE).to(dk_ptr.dtype.element_ty), mask=k_valid[:, None])
  tl.store(dv_ptr + offsets, dv.to(dv_ptr.dtype.element_ty), mask=k_valid[:, None])


@triton.jit
def _dq_tiles(
    dq, q, do, lse, delta, q_idx, q_hash,
    k_ptr, v_ptr, k_perm_ptr, k_idx_ptr, k_hash_ptr, b, kv, S, LK, lo, hi, full_lo, full_hi,
    QK_SCALE: tl.constexpr, K: tl.constexpr, H: tl.constexpr, BLOCK_N: tl.constexpr,
    HASHED: tl.constexpr, STRICT: tl.constexpr, CHECK_PADS: tl.constexpr, ROW_RANGES: tl.constexpr,
    PRECISION: tl.constexpr, WIDE: tl.constexpr, MASKED: tl.constexpr, BRANCH: tl.constexpr,
    PREFETCH: tl.constexpr,
):  # fmt: skip
  k_offset, k_valid = _tile_rows(k_perm_ptr, lo, LK, b, kv, S, BLOCK_N, K, H, WIDE)
  for j in range(lo, hi):
    slot = j * BLOCK_N + tl.arange(0, BLOCK_N)
    in_bounds = slot < LK
    k_offset, k_valid, next_offset, next_valid = _streamed_rows(
        k_offset, k_valid, k_perm_ptr, j, LK, b, kv, S, BLOCK_N, K, H, WIDE, PREFETCH
    )
    k = _load_rows(k_ptr, k_offset, k_valid, H)
    v = _load_rows(v_ptr, k_offset, k_valid, H)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * QK_SCALE
    p = tl.math.exp2(s - lse[:, None])
    p = _mask_tile(
        p, 0.0, j, full_lo, full_hi, q_idx, q_hash, k_idx_ptr, k_hash_ptr, slot, in_bounds,
        True, HASHED, STRICT, CHECK_PADS, ROW_RANGES, MASKED, BRANCH,
    )  # fmt: skip
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    k_offset, k_valid = next_offset, next_valid
  return dq


@triton.jit
def scfa_bwd_dq(
    q_ptr, k_ptr, v_ptr, do_ptr, q_perm_ptr, k_perm_ptr, q_idx_ptr, k_idx_ptr, q_hash_ptr, k_hash_ptr,
    lse_ptr, o_ptr, start_n_ptr, end_n_ptr, full_start_n_ptr, full_end_n_ptr, T, S, LQ, LK,
    dq_ptr, delta_ptr,
    SM_SCALE: tl.constexpr, QK_SCALE: tl.constexpr, N: tl.constexpr, K: tl.constexpr, H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HASHED: tl.constexpr, STRICT: tl.constexpr, CHECK_PADS: tl.constexpr, ROW_RANGES: tl.constexpr,
    PRECISION: tl.constexpr, ONE_LOOP: tl.constexpr, ALIGNED: tl.constexpr, WIDE: tl.constexpr,
    SKIP_EMPTY: tl.constexpr, PREFETCH: tl.constexpr,
):  # fmt: skip
  """One program per (query tile, batch * query head): dQ of BLOCK_M sorted query slots.

  Also stores delta = rowsum(dO * O) per sorted slot for `scfa_bwd_dkdv`, which runs
  after it: the rows are loaded here anyway, so delta costs no pass of its own.
  """
  LQ = _multiple_of_16(LQ, ALIGNED)
  LK = _multiple_of_16(LK, ALIGNED)
  pid_m = tl.program_id(0)
  bh = tl.program_id(1)
  b = bh // N
  n = bh % N
  kv_bh = bh // (N // K)  # b * K + the kv head of query head n
  slot = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
  in_bounds = slot < LQ
  q_offset, q_valid = _row_offsets(q_perm_ptr + bh * LQ, slot, in_bounds, b, n, T, N, H, WIDE)
  tile = bh * tl.num_programs(0) + pid_m
  q_read = _rows_to_read(q_valid, start_n_ptr, end_n_ptr, tile, 0, 1, SKIP_EMPTY)  # unread: O = 0, delta = 0
  q = _load_rows(q_ptr, q_offset, q_read, H)
  do = _load_rows(do_ptr, q_offset, q_read, H)
  delta = tl.sum(do.to(tl.float32) * _load_rows(o_ptr, q_offset, q_read, H).to(tl.float32), 1)
  tl.store(delta_ptr + bh * LQ + slot, delta, mask=in_bounds)
  lse = tl.load(lse_ptr + bh * LQ + slot, mask=in_bounds, other=float("inf"))
  q_idx, q_hash = _own_keys(q_idx_ptr + bh * LQ, q_hash_ptr + bh * LQ, slot, in_bounds, -1, HASHED, ROW_RANGES)

  dq = tl.zeros([BLOCK_M, H], tl.float32)
  for part in tl.static_range(3 - 2 * ONE_LOOP):
    lo, hi, full_lo, full_hi = _parts(start_n_ptr, end_n_ptr, full_start_n_ptr, full_end_n_ptr, tile, part, ONE_LOOP)
    if lo < hi:
      dq = _dq_tiles(
          dq, q, do, lse, delta, q_idx, q_hash,
          k_ptr, v_ptr, k_perm_ptr + kv_bh * LK, k_idx_ptr + kv_bh * LK, k_hash_ptr + kv_bh * LK,
          b, kv_bh % K, S, LK, lo, hi, full_lo, full_hi, QK_SCALE, K, H, BLOCK_N, HASHED, STRICT, CHECK_PADS,
          ROW_RANGES, PRECISION, WIDE, part != 1, ONE_LOOP, PREFETCH,
      )  # fmt: skip
  offsets = q_offset[:, None] + tl.arange(0, H)[None, :]
  tl.store(dq_ptr + offsets, (dq * SM_SCALE).to(dq_ptr.dtype.element_ty), mask=q_valid[:, None])
