"""SCFA forward and backward kernels (Triton source only).

One forward kernel and one backward family serve both modes: the HASHED and STRICT
constexprs pick the mask rule. Every kernel reads rows of q, k, v, dO through the sort
permutation (`q_perm`, `k_perm`: rows of H contiguous elements in [B, T, N, H]) and
stores O, dQ, dK, dV straight at the original rows, so the host never gathers,
transposes or scatters them. Per-slot vectors (q_idx, k_idx, hashes, lse, delta) are
head-major [B, N, LQ] / [B, N, LK] in sorted order; LQ >= T slots hold the T query rows
and slots with perm -1 hold none (padding that aligns buckets to tiles), likewise LK >= S
for keys. Lengths are runtime scalars, so one compiled kernel serves every length.

Each program walks the contiguous tile range `[start, end)` that the tile plan gives
it; only tiles outside the plan's full sub-range `[full_start, full_end)` pay for mask
arithmetic. Either the range runs as three loops (masked, full, masked) or, with
ONE_LOOP, as one software-pipelined loop that branches on the tile index. The log-sum-exp is kept
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
def _row_offsets(perm_ptr, slot, in_bounds, b, n, ROWS, N: tl.constexpr, H: tl.constexpr):
  """(element offsets, holds a row) of the rows of head (b, n) that slots `slot` read
  through perm; ROWS is the length of the row axis (T or S)."""
  row = tl.load(perm_ptr + slot, mask=in_bounds, other=-1)
  return ((b * ROWS + tl.maximum(row, 0)).to(tl.int64) * N + n) * H, row >= 0


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
def _masked(x, fill, own_idx, own_hash, other_idx_ptr, other_hash_ptr, slot, in_bounds,
            QUERY_ROWS: tl.constexpr, HASHED: tl.constexpr, STRICT: tl.constexpr,
            CHECK_PADS: tl.constexpr):  # fmt: skip
  """x with disallowed pairs set to `fill`. The rows of x are the program's own tokens
  (queries if QUERY_ROWS, else keys); its columns are the streamed tile's, at `slot`."""
  if QUERY_ROWS:
    k_idx, k_hash = _token_keys(other_idx_ptr, other_hash_ptr, slot, in_bounds, K_PAD, HASHED)
    allowed = _allowed(own_idx[:, None], k_idx[None, :], own_hash[:, None], k_hash[None, :], HASHED, STRICT, CHECK_PADS)
  else:
    q_idx, q_hash = _token_keys(other_idx_ptr, other_hash_ptr, slot, in_bounds, -1, HASHED)
    allowed = _allowed(q_idx[None, :], own_idx[:, None], q_hash[None, :], own_hash[:, None], HASHED, STRICT, CHECK_PADS)
  return tl.where(allowed, x, fill)


@triton.jit
def _mask_tile(x, fill, tile, full_lo, full_hi, own_idx, own_hash, other_idx_ptr, other_hash_ptr, slot, in_bounds,
               QUERY_ROWS: tl.constexpr, HASHED: tl.constexpr, STRICT: tl.constexpr, CHECK_PADS: tl.constexpr,
               MASKED: tl.constexpr, BRANCH: tl.constexpr):  # fmt: skip
  """The in-tile mask where the plan asks for it: every tile of a masked loop, or with
  BRANCH (one loop over the whole range) the tiles outside [full_lo, full_hi)."""
  if MASKED:
    if BRANCH:
      if (tile < full_lo) | (tile >= full_hi):
        x = _masked(
            x, fill, own_idx, own_hash, other_idx_ptr, other_hash_ptr, slot, in_bounds,
            QUERY_ROWS, HASHED, STRICT, CHECK_PADS,
        )  # fmt: skip
    else:
      x = _masked(
          x, fill, own_idx, own_hash, other_idx_ptr, other_hash_ptr, slot, in_bounds,
          QUERY_ROWS, HASHED, STRICT, CHECK_PADS,
      )  # fmt: skip
  return x


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
    k_ptr, v_ptr, k_perm_ptr, k_idx_ptr, k_hash_ptr, b, n, S, LK, lo, hi, full_lo, full_hi,
    QK_SCALE: tl.constexpr, N: tl.constexpr, H: tl.constexpr, BLOCK_N: tl.constexpr,
    HASHED: tl.constexpr, STRICT: tl.constexpr, CHECK_PADS: tl.constexpr, PRECISION: tl.constexpr,
    MASKED: tl.constexpr, BRANCH: tl.constexpr,
):  # fmt: skip
  for j in range(lo, hi):
    slot = j * BLOCK_N + tl.arange(0, BLOCK_N)
    in_bounds = slot < LK
    k_offset, k_valid = _row_offsets(k_perm_ptr, slot, in_bounds, b, n, S, N, H)
    k = _load_rows(k_ptr, k_offset, k_valid, H)
    v = _load_rows(v_ptr, k_offset, k_valid, H)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * QK_SCALE
    s = _mask_tile(
        s, float("-inf"), j, full_lo, full_hi, q_idx, q_hash, k_idx_ptr, k_hash_ptr, slot, in_bounds,
        True, HASHED, STRICT, CHECK_PADS, MASKED, BRANCH,
    )  # fmt: skip
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    m_i = m_new
  return acc, m_i, l_i


@triton.jit
def scfa_fwd(
    q_ptr, k_ptr, v_ptr, q_perm_ptr, k_perm_ptr, q_idx_ptr, k_idx_ptr, q_hash_ptr, k_hash_ptr,
    start_n_ptr, end_n_ptr, full_start_n_ptr, full_end_n_ptr, T, S, LQ, LK,
    o_ptr, lse_ptr,
    QK_SCALE: tl.constexpr, N: tl.constexpr, H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HASHED: tl.constexpr, STRICT: tl.constexpr, CHECK_PADS: tl.constexpr, PRECISION: tl.constexpr,
    ONE_LOOP: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
  """One program per (query tile, batch * head): O and lse for BLOCK_M sorted query slots."""
  LQ = _multiple_of_16(LQ, ALIGNED)
  LK = _multiple_of_16(LK, ALIGNED)
  pid_m = tl.program_id(0)
  bh = tl.program_id(1)
  b = bh // N
  n = bh % N
  slot = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
  in_bounds = slot < LQ
  q_offset, q_valid = _row_offsets(q_perm_ptr + bh * LQ, slot, in_bounds, b, n, T, N, H)
  q = _load_rows(q_ptr, q_offset, q_valid, H)
  q_idx, q_hash = _token_keys(q_idx_ptr + bh * LQ, q_hash_ptr + bh * LQ, slot, in_bounds, -1, HASHED)
  tile = bh * tl.num_programs(0) + pid_m

  m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
  l_i = tl.zeros([BLOCK_M], tl.float32)
  acc = tl.zeros([BLOCK_M, H], tl.float32)
  for part in tl.static_range(3 - 2 * ONE_LOOP):
    lo, hi, full_lo, full_hi = _parts(start_n_ptr, end_n_ptr, full_start_n_ptr, full_end_n_ptr, tile, part, ONE_LOOP)
    acc, m_i, l_i = _fwd_tiles(
        acc, m_i, l_i, q, q_idx, q_hash,
        k_ptr, v_ptr, k_perm_ptr + bh * LK, k_idx_ptr + bh * LK, k_hash_ptr + bh * LK, b, n, S, LK,
        lo, hi, full_lo, full_hi, QK_SCALE, N, H, BLOCK_N, HASHED, STRICT, CHECK_PADS, PRECISION, part != 1, ONE_LOOP,
    )  # fmt: skip

  has_key = l_i > 0.0
  o = acc / tl.where(has_key, l_i, 1.0)[:, None]
  lse = tl.where(has_key, m_i + tl.math.log2(tl.where(has_key, l_i, 1.0)), float("inf"))
  tl.store(o_ptr + q_offset[:, None] + tl.arange(0, H)[None, :], o.to(o_ptr.dtype.element_ty), mask=q_valid[:, None])
  tl.store(lse_ptr + bh * LQ + slot, lse, mask=in_bounds)


# Polls of a semaphore before giving up (about 0.2 s): far longer than any program runs.
_MAX_SPINS = 1 << 18
# Polls with acquire loads until the count at $1 reaches $2 (or _MAX_SPINS polls); $0 is the
# last count read. Labels inside { } are local, so the asm may be inlined many times.
_POLL = tl.constexpr(f"""{{
    .reg .pred again;
    .reg .b32 spins;
    mov.b32 $0, 0;
    mov.b32 spins, 0;
    setp.gt.s32 again, $2, 0;
    @!again bra DONE;
    POLL:
    ld.acquire.gpu.global.b32 $0, [$1];
    add.s32 spins, spins, 1;
    setp.lt.s32 again, $0, $2;
    setp.lt.and.s32 again, spins, {_MAX_SPINS}, again;
    @again bra POLL;
    DONE:
    }}""")
# Adds 1 to the count at $1 after this thread's earlier stores ($0 is a dummy).
_RELEASE = tl.constexpr("""{
    mov.b32 $0, 0;
    red.release.gpu.global.add.s32 [$1], 1;
    }""")


@triton.jit
def _wait_turn(sem_ptr, count, SPIN: tl.constexpr):
  """The count at sem_ptr once it reaches `count` (other programs' releases).

  SPIN: every thread polls (acquire) and later releases (`_release`) on its own, in PTX:
  a barrier or a Triton loop inside the tile loop would stop its software pipelining. A
  count still short after _MAX_SPINS polls comes back as it is and the caller poisons its
  dQ: a broken order shows up as NaN, never as a hang. Without SPIN (the interpreter,
  which runs one program at a time in launch order) the turn must have come: one read."""
  if SPIN:
    seen = tl.inline_asm_elementwise(_POLL, "=r,l,r", [sem_ptr.to(tl.int64), count], dtype=tl.int32, is_pure=False,
                                     pack=1)  # fmt: skip
  else:
    seen = tl.atomic_add(sem_ptr, 0, sem="acquire")
  return seen


@triton.jit
def _release(sem_ptr, SPIN: tl.constexpr):
  """Counts this program's turn as done: every thread adds 1 after its own stores (SPIN),
  or the one interpreted program adds 1."""
  if SPIN:
    tl.inline_asm_elementwise(_RELEASE, "=r,l", [sem_ptr.to(tl.int64)], dtype=tl.int32, is_pure=False, pack=1)
  else:
    tl.atomic_add(sem_ptr, 1, sem="release")


@triton.jit
def _add_dq_in_turn(dq, tile, slot, in_bounds, q_offset, q_valid, dq_ptr, acc_ptr, sem_ptr, top_ptr, bottom_ptr, before,
                    SM_SCALE: tl.constexpr, H: tl.constexpr, SPIN: tl.constexpr, RELEASES: tl.constexpr):  # fmt: skip
  """Adds this key tile's share of query tile `tile`'s dQ, in a fixed order: the key tiles
  that visit a query tile add in descending order, so the sum is the same on every run.

  `before` counts the non-empty key tiles below this one; `top` and `bottom` (per query
  tile, `plan.accumulation_order`) count those whose range starts / ends at or below the
  query tile. So `top - 1 - before` key tiles add before this one, and it is the last when
  `before == bottom`. The first stores its share in the f32 scratch `acc` (sorted slots),
  the next ones add to it, each once the tile's semaphore counts the previous ones'
  RELEASES releases each; the last stores dQ at the original rows instead, scaled and in
  the output dtype. Masks use tl.where: the interpreter rejects `mask & scalar`."""
  rank = tl.load(top_ptr + tile) - 1 - before
  bottom = tl.load(bottom_ptr + tile)
  last = before == bottom
  turn = _wait_turn(sem_ptr + tile, rank * RELEASES, SPIN) == rank * RELEASES
  acc_offset = slot.to(tl.int64)[:, None] * H + tl.arange(0, H)[None, :]
  # The mask depends on the poll, so the load cannot be issued before it; .cg reads L2,
  # where the previous program's stores are, not a stale L1 line.
  dq += tl.load(acc_ptr + acc_offset, mask=tl.where(turn & (rank > 0), in_bounds[:, None], False), other=0.0,
                cache_modifier=".cg")  # fmt: skip
  dq = tl.where(turn, dq, float("nan"))
  tl.store(dq_ptr + q_offset[:, None] + tl.arange(0, H)[None, :], (dq * SM_SCALE).to(dq_ptr.dtype.element_ty),
           mask=tl.where(last, q_valid[:, None], False))  # fmt: skip
  tl.store(acc_ptr + acc_offset, dq, mask=tl.where(last, False, in_bounds[:, None]))
  _release(sem_ptr + tile, SPIN)


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v, k_idx, k_hash,
    q_ptr, do_ptr, q_perm_ptr, q_idx_ptr, q_hash_ptr, lse_ptr, delta_ptr, b, n, T, LQ, lo, hi, full_lo, full_hi,
    dq_ptr, acc_ptr, sem_ptr, top_ptr, bottom_ptr, before,
    SM_SCALE: tl.constexpr, QK_SCALE: tl.constexpr, N: tl.constexpr, H: tl.constexpr, BLOCK_M: tl.constexpr,
    HASHED: tl.constexpr, STRICT: tl.constexpr, CHECK_PADS: tl.constexpr, PRECISION: tl.constexpr,
    MASKED: tl.constexpr, BRANCH: tl.constexpr, FUSED_DQ: tl.constexpr, SPIN: tl.constexpr, RELEASES: tl.constexpr,
):  # fmt: skip
  for i in range(lo, hi):
    slot = i * BLOCK_M + tl.arange(0, BLOCK_M)
    in_bounds = slot < LQ
    q_offset, q_valid = _row_offsets(q_perm_ptr, slot, in_bounds, b, n, T, N, H)
    q = _load_rows(q_ptr, q_offset, q_valid, H)
    do = _load_rows(do_ptr, q_offset, q_valid, H)
    lse = tl.load(lse_ptr + slot, mask=in_bounds, other=float("inf"))
    delta = tl.load(delta_ptr + slot, mask=in_bounds, other=0.0)
    # Key-major like Triton's tutorial: only loaded tiles get transposed, never computed ones.
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * QK_SCALE  # [BLOCK_N, BLOCK_M]
    p_t = tl.math.exp2(s_t - lse[None, :])
    p_t = _mask_tile(
        p_t, 0.0, i, full_lo, full_hi, k_idx, k_hash, q_idx_ptr, q_hash_ptr, slot, in_bounds,
        False, HASHED, STRICT, CHECK_PADS, MASKED, BRANCH,
    )  # fmt: skip
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
    dk += tl.dot(ds_t, q, input_precision=PRECISION)
    if FUSED_DQ:
      _add_dq_in_turn(
          tl.dot(tl.trans(ds_t), k, input_precision=PRECISION), i, slot, in_bounds, q_offset, q_valid,
          dq_ptr, acc_ptr, sem_ptr, top_ptr, bottom_ptr, before, SM_SCALE, H, SPIN, RELEASES,
      )  # fmt: skip
  return dk, dv


@triton.jit
def _dkdv_program(
    q_ptr, k_ptr, v_ptr, do_ptr, q_perm_ptr, k_perm_ptr, q_idx_ptr, k_idx_ptr, q_hash_ptr, k_hash_ptr,
    lse_ptr, delta_ptr, start_m_ptr, end_m_ptr, full_start_m_ptr, full_end_m_ptr, T, S, LQ, LK,
    dk_ptr, dv_ptr, dq_ptr, acc_ptr, sem_ptr, top_ptr, bottom_ptr, before_ptr,
    SM_SCALE: tl.constexpr, QK_SCALE: tl.constexpr, N: tl.constexpr, H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HASHED: tl.constexpr, STRICT: tl.constexpr, CHECK_PADS: tl.constexpr, PRECISION: tl.constexpr,
    ONE_LOOP: tl.constexpr, ALIGNED: tl.constexpr, FUSED_DQ: tl.constexpr, SPIN: tl.constexpr,
    RELEASES: tl.constexpr,
):  # fmt: skip
  LQ = _multiple_of_16(LQ, ALIGNED)
  LK = _multiple_of_16(LK, ALIGNED)
  pid_n = tl.program_id(0)
  if FUSED_DQ:  # key tiles launch top down: the tiles a program waits for started before it
    pid_n = tl.num_programs(0) - 1 - pid_n
  bh = tl.program_id(1)
  b = bh // N
  n = bh % N
  slot = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
  in_bounds = slot < LK
  k_offset, k_valid = _row_offsets(k_perm_ptr + bh * LK, slot, in_bounds, b, n, S, N, H)
  k = _load_rows(k_ptr, k_offset, k_valid, H)
  v = _load_rows(v_ptr, k_offset, k_valid, H)
  k_idx, k_hash = _token_keys(k_idx_ptr + bh * LK, k_hash_ptr + bh * LK, slot, in_bounds, K_PAD, HASHED)
  tile = bh * tl.num_programs(0) + pid_n
  q_tiles = bh * tl.cdiv(LQ, BLOCK_M)  # the first of this head's query tiles
  before = 0
  if FUSED_DQ:
    before = tl.load(before_ptr + tile)

  dk = tl.zeros([BLOCK_N, H], tl.float32)
  dv = tl.zeros([BLOCK_N, H], tl.float32)
  for part in tl.static_range(3 - 2 * ONE_LOOP):
    lo, hi, full_lo, full_hi = _parts(start_m_ptr, end_m_ptr, full_start_m_ptr, full_end_m_ptr, tile, part, ONE_LOOP)
    dk, dv = _dkdv_tiles(
        dk, dv, k, v, k_idx, k_hash,
        q_ptr, do_ptr, q_perm_ptr + bh * LQ, q_idx_ptr + bh * LQ, q_hash_ptr + bh * LQ, lse_ptr + bh * LQ,
        delta_ptr + bh * LQ, b, n, T, LQ, lo, hi, full_lo, full_hi,
        dq_ptr, acc_ptr + (bh * LQ).to(tl.int64) * H, sem_ptr + q_tiles, top_ptr + q_tiles, bottom_ptr + q_tiles,
        before, SM_SCALE, QK_SCALE, N, H, BLOCK_M, HASHED, STRICT, CHECK_PADS, PRECISION, part != 1, ONE_LOOP,
        FUSED_DQ, SPIN, RELEASES,
    )  # fmt: skip

  offsets = k_offset[:, None] + tl.arange(0, H)[None, :]
  tl.store(dk_ptr + offsets, (dk * SM_SCALE).to(dk_ptr.dtype.element_ty), mask=k_valid[:, None])
  tl.store(dv_ptr + offsets, dv.to(dv_ptr.dtype.element_ty), mask=k_valid[:, None])


@triton.jit
def scfa_bwd_dkdv(
    q_ptr, k_ptr, v_ptr, do_ptr, q_perm_ptr, k_perm_ptr, q_idx_ptr, k_idx_ptr, q_hash_ptr, k_hash_ptr,
    lse_ptr, delta_ptr, start_m_ptr, end_m_ptr, full_start_m_ptr, full_end_m_ptr, T, S, LQ, LK,
    dk_ptr, dv_ptr,
    SM_SCALE: tl.constexpr, QK_SCALE: tl.constexpr, N: tl.constexpr, H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HASHED: tl.constexpr, STRICT: tl.constexpr, CHECK_PADS: tl.constexpr, PRECISION: tl.constexpr,
    ONE_LOOP: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
  """One program per (key tile, batch * head): dK and dV of BLOCK_N sorted key slots.

  delta = rowsum(dO * O) per sorted query slot, [B, N, LQ], as `scfa_bwd_dq` stores it.
  """
  _dkdv_program(
      q_ptr, k_ptr, v_ptr, do_ptr, q_perm_ptr, k_perm_ptr, q_idx_ptr, k_idx_ptr, q_hash_ptr, k_hash_ptr,
      lse_ptr, delta_ptr, start_m_ptr, end_m_ptr, full_start_m_ptr, full_end_m_ptr, T, S, LQ, LK,
      dk_ptr, dv_ptr, dk_ptr, dk_ptr, dk_ptr, dk_ptr, dk_ptr, dk_ptr,  # no dQ: unread
      SM_SCALE, QK_SCALE, N, H, BLOCK_M, BLOCK_N, HASHED, STRICT, CHECK_PADS, PRECISION, ONE_LOOP, ALIGNED,
      False, False, 1,
  )  # fmt: skip


@triton.jit
def scfa_bwd_dkdv_dq(
    q_ptr, k_ptr, v_ptr, do_ptr, q_perm_ptr, k_perm_ptr, q_idx_ptr, k_idx_ptr, q_hash_ptr, k_hash_ptr,
    lse_ptr, delta_ptr, top_ptr, bottom_ptr, before_ptr, dq_in_ptr, sem_in_ptr,
    start_m_ptr, end_m_ptr, full_start_m_ptr, full_end_m_ptr, T, S, LQ, LK,
    dk_ptr, dv_ptr, dq_ptr, acc_ptr, sem_ptr,
    SM_SCALE: tl.constexpr, QK_SCALE: tl.constexpr, N: tl.constexpr, H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HASHED: tl.constexpr, STRICT: tl.constexpr, CHECK_PADS: tl.constexpr, PRECISION: tl.constexpr,
    ONE_LOOP: tl.constexpr, ALIGNED: tl.constexpr, SPIN: tl.constexpr, RELEASES: tl.constexpr,
):  # fmt: skip
  """`scfa_bwd_dkdv` that also accumulates dQ: 5 matmuls per tile instead of the 4 here
  and 3 in a separate dQ kernel, which recomputes QK^T and dO V^T.

  Needs key-major ranges whose non-empty ones start and end in ascending order (ordered
  tokens' plans), `plan.accumulation_order`'s counts, and `scfa_bwd_prep`'s outputs:
  delta, dQ (aliased as dq_in/dq: the rows no key tile visits already hold zeros) and the
  zeroed semaphore per query tile (sem_in/sem). `acc` is f32 scratch [B, N, LQ, H].
  """
  _dkdv_program(
      q_ptr, k_ptr, v_ptr, do_ptr, q_perm_ptr, k_perm_ptr, q_idx_ptr, k_idx_ptr, q_hash_ptr, k_hash_ptr,
      lse_ptr, delta_ptr, start_m_ptr, end_m_ptr, full_start_m_ptr, full_end_m_ptr, T, S, LQ, LK,
      dk_ptr, dv_ptr, dq_ptr, acc_ptr, sem_ptr, top_ptr, bottom_ptr, before_ptr,
      SM_SCALE, QK_SCALE, N, H, BLOCK_M, BLOCK_N, HASHED, STRICT, CHECK_PADS, PRECISION, ONE_LOOP, ALIGNED,
      True, SPIN, RELEASES,
  )  # fmt: skip


@triton.jit
def scfa_bwd_prep(
    o_ptr, do_ptr, q_perm_ptr, top_ptr, bottom_ptr, T, LQ,
    delta_ptr, dq_ptr, sem_ptr,
    N: tl.constexpr, H: tl.constexpr, BLOCK_M: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
  """One program per (query tile of `scfa_bwd_dkdv_dq`, batch * head): delta = rowsum(dO * O)
  of its sorted slots, zero dQ rows when no key tile visits the tile (top == bottom), and
  the tile's semaphore set to 0."""
  LQ = _multiple_of_16(LQ, ALIGNED)
  pid_m = tl.program_id(0)
  bh = tl.program_id(1)
  b = bh // N
  n = bh % N
  slot = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
  in_bounds = slot < LQ
  q_offset, q_valid = _row_offsets(q_perm_ptr + bh * LQ, slot, in_bounds, b, n, T, N, H)
  do = _load_rows(do_ptr, q_offset, q_valid, H).to(tl.float32)
  tl.store(delta_ptr + bh * LQ + slot, tl.sum(do * _load_rows(o_ptr, q_offset, q_valid, H).to(tl.float32), 1),
           mask=in_bounds)  # fmt: skip
  tile = bh * tl.num_programs(0) + pid_m
  unvisited = tl.load(top_ptr + tile) == tl.load(bottom_ptr + tile)
  zeros = tl.zeros([BLOCK_M, H], dq_ptr.dtype.element_ty)
  tl.store(dq_ptr + q_offset[:, None] + tl.arange(0, H)[None, :], zeros, mask=tl.where(unvisited, q_valid[:, None], False))
  tl.store(sem_ptr + tile, 0)


@triton.jit
def _dq_tiles(
    dq, q, do, lse, delta, q_idx, q_hash,
    k_ptr, v_ptr, k_perm_ptr, k_idx_ptr, k_hash_ptr, b, n, S, LK, lo, hi, full_lo, full_hi,
    QK_SCALE: tl.constexpr, N: tl.constexpr, H: tl.constexpr, BLOCK_N: tl.constexpr,
    HASHED: tl.constexpr, STRICT: tl.constexpr, CHECK_PADS: tl.constexpr, PRECISION: tl.constexpr,
    MASKED: tl.constexpr, BRANCH: tl.constexpr,
):  # fmt: skip
  for j in range(lo, hi):
    slot = j * BLOCK_N + tl.arange(0, BLOCK_N)
    in_bounds = slot < LK
    k_offset, k_valid = _row_offsets(k_perm_ptr, slot, in_bounds, b, n, S, N, H)
    k = _load_rows(k_ptr, k_offset, k_valid, H)
    v = _load_rows(v_ptr, k_offset, k_valid, H)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * QK_SCALE
    p = tl.math.exp2(s - lse[:, None])
    p = _mask_tile(
        p, 0.0, j, full_lo, full_hi, q_idx, q_hash, k_idx_ptr, k_hash_ptr, slot, in_bounds,
        True, HASHED, STRICT, CHECK_PADS, MASKED, BRANCH,
    )  # fmt: skip
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
  return dq


@triton.jit
def scfa_bwd_dq(
    q_ptr, k_ptr, v_ptr, do_ptr, q_perm_ptr, k_perm_ptr, q_idx_ptr, k_idx_ptr, q_hash_ptr, k_hash_ptr,
    lse_ptr, o_ptr, start_n_ptr, end_n_ptr, full_start_n_ptr, full_end_n_ptr, T, S, LQ, LK,
    dq_ptr, delta_ptr,
    SM_SCALE: tl.constexpr, QK_SCALE: tl.constexpr, N: tl.constexpr, H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HASHED: tl.constexpr, STRICT: tl.constexpr, CHECK_PADS: tl.constexpr, PRECISION: tl.constexpr,
    ONE_LOOP: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
  """One program per (query tile, batch * head): dQ of BLOCK_M sorted query slots.

  Also stores delta = rowsum(dO * O) per sorted slot for `scfa_bwd_dkdv`, which runs
  after it: the rows are loaded here anyway, so delta costs no pass of its own.
  """
  LQ = _multiple_of_16(LQ, ALIGNED)
  LK = _multiple_of_16(LK, ALIGNED)
  pid_m = tl.program_id(0)
  bh = tl.program_id(1)
  b = bh // N
  n = bh % N
  slot = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
  in_bounds = slot < LQ
  q_offset, q_valid = _row_offsets(q_perm_ptr + bh * LQ, slot, in_bounds, b, n, T, N, H)
  q = _load_rows(q_ptr, q_offset, q_valid, H)
  do = _load_rows(do_ptr, q_offset, q_valid, H)
  delta = tl.sum(do.to(tl.float32) * _load_rows(o_ptr, q_offset, q_valid, H).to(tl.float32), 1)
  tl.store(delta_ptr + bh * LQ + slot, delta, mask=in_bounds)
  lse = tl.load(lse_ptr + bh * LQ + slot, mask=in_bounds, other=float("inf"))
  q_idx, q_hash = _token_keys(q_idx_ptr + bh * LQ, q_hash_ptr + bh * LQ, slot, in_bounds, -1, HASHED)
  tile = bh * tl.num_programs(0) + pid_m

  dq = tl.zeros([BLOCK_M, H], tl.float32)
  for part in tl.static_range(3 - 2 * ONE_LOOP):
    lo, hi, full_lo, full_hi = _parts(start_n_ptr, end_n_ptr, full_start_n_ptr, full_end_n_ptr, tile, part, ONE_LOOP)
    dq = _dq_tiles(
        dq, q, do, lse, delta, q_idx, q_hash,
        k_ptr, v_ptr, k_perm_ptr + bh * LK, k_idx_ptr + bh * LK, k_hash_ptr + bh * LK, b, n, S, LK,
        lo, hi, full_lo, full_hi, QK_SCALE, N, H, BLOCK_N, HASHED, STRICT, CHECK_PADS, PRECISION, part != 1, ONE_LOOP,
    )  # fmt: skip
  offsets = q_offset[:, None] + tl.arange(0, H)[None, :]
  tl.store(dq_ptr + offsets, (dq * SM_SCALE).to(dq_ptr.dtype.element_ty), mask=q_valid[:, None])
