"""SCFA forward and backward kernels (Triton source only).

One forward kernel and one backward family serve both modes: the HASHED and STRICT
constexprs pick the mask rule. Every kernel reads rows of q, k, v, dO through the sort
permutation (`q_perm`, `k_perm`: rows of H contiguous elements in [B, T, N, H]) and
stores O, dQ, dK, dV straight at the original rows, so the host never gathers,
transposes or scatters them. Per-slot vectors (q_idx, k_idx, hashes, lse) are
head-major [B, N, T] in sorted order.

Each program walks the contiguous tile range that the tile plan gives it in three
parts: masked tiles, full tiles (no mask arithmetic), masked tiles. The log-sum-exp
is kept in base 2 of the scaled logits; a row with no allowed key stores +inf, which
turns every probability of the backward into exactly 0.
"""

import triton
import triton.language as tl

K_PAD = tl.constexpr(2**30)


@triton.jit
def _allowed(qi, kj, qh, kh, HASHED: tl.constexpr, STRICT: tl.constexpr):
  """The SCFA rule on broadcast views: qi, qh as [M, 1] and kj, kh as [1, N] give a
  query-major tile, the transposed views a key-major one."""
  if STRICT:
    ok = qi > kj
  else:
    ok = qi >= kj
  ok = ok & (qi >= 0) & (kj < K_PAD)
  if HASHED:
    ok = ok & (qh == kh)
  return ok


@triton.jit
def _row_offsets(perm_ptr, slot, in_bounds, b, n, L: tl.constexpr, N: tl.constexpr, H: tl.constexpr):
  """Element offsets of the rows of head (b, n) that sorted slots `slot` read through perm."""
  row = tl.load(perm_ptr + slot, mask=in_bounds, other=0)
  return ((b * L + row).to(tl.int64) * N + n) * H


@triton.jit
def _load_rows(ptr, offset, in_bounds, H: tl.constexpr):
  """The [BLOCK, H] rows at `offset` (H contiguous elements each); 0 out of bounds."""
  return tl.load(ptr + offset[:, None] + tl.arange(0, H)[None, :], mask=in_bounds[:, None], other=0.0)


@triton.jit
def _token_keys(idx_ptr, hash_ptr, slot, in_bounds, PAD: tl.constexpr, HASHED: tl.constexpr):
  """Causal index and bucket of sorted slots (the bucket is the index when not HASHED)."""
  idx = tl.load(idx_ptr + slot, mask=in_bounds, other=PAD)
  hashes = idx
  if HASHED:
    hashes = tl.load(hash_ptr + slot, mask=in_bounds, other=0)
  return idx, hashes


@triton.jit
def _plan_part(start_ptr, end_ptr, full_start_ptr, full_end_ptr, tile, PART: tl.constexpr):
  """Bounds of part PART of a tile's range: 0 masked, 1 full (no mask), 2 masked."""
  if PART == 0:
    lo = tl.load(start_ptr + tile)
    hi = tl.load(full_start_ptr + tile)
  elif PART == 1:
    lo = tl.load(full_start_ptr + tile)
    hi = tl.load(full_end_ptr + tile)
  else:
    lo = tl.load(full_end_ptr + tile)
    hi = tl.load(end_ptr + tile)
  return lo, hi


@triton.jit
def _fwd_tiles(
    acc, m_i, l_i, q, q_idx, q_hash,
    k_ptr, v_ptr, k_perm_ptr, k_idx_ptr, k_hash_ptr, bh, b, n, lo, hi,
    QK_SCALE: tl.constexpr, S: tl.constexpr, N: tl.constexpr, H: tl.constexpr, BLOCK_N: tl.constexpr,
    HASHED: tl.constexpr, STRICT: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
  for j in range(lo, hi):
    slot = j * BLOCK_N + tl.arange(0, BLOCK_N)
    in_bounds = slot < S
    k_offset = _row_offsets(k_perm_ptr + bh * S, slot, in_bounds, b, n, S, N, H)
    k = _load_rows(k_ptr, k_offset, in_bounds, H)
    v = _load_rows(v_ptr, k_offset, in_bounds, H)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * QK_SCALE
    if MASKED:
      k_idx, k_hash = _token_keys(k_idx_ptr + bh * S, k_hash_ptr + bh * S, slot, in_bounds, K_PAD, HASHED)
      allowed = _allowed(q_idx[:, None], k_idx[None, :], q_hash[:, None], k_hash[None, :], HASHED, STRICT)
      s = tl.where(allowed, s, float("-inf"))
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
    start_n_ptr, end_n_ptr, full_start_n_ptr, full_end_n_ptr,
    o_ptr, lse_ptr,
    QK_SCALE: tl.constexpr, T: tl.constexpr, S: tl.constexpr, N: tl.constexpr, H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HASHED: tl.constexpr, STRICT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
  """One program per (query tile, batch * head): O and lse for BLOCK_M sorted queries."""
  pid_m = tl.program_id(0)
  bh = tl.program_id(1)
  b = bh // N
  n = bh % N
  slot = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
  in_bounds = slot < T
  q_offset = _row_offsets(q_perm_ptr + bh * T, slot, in_bounds, b, n, T, N, H)
  q = _load_rows(q_ptr, q_offset, in_bounds, H)
  q_idx, q_hash = _token_keys(q_idx_ptr + bh * T, q_hash_ptr + bh * T, slot, in_bounds, -1, HASHED)

  tile = bh * tl.num_programs(0) + pid_m

  m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
  l_i = tl.zeros([BLOCK_M], tl.float32)
  acc = tl.zeros([BLOCK_M, H], tl.float32)
  # Masked tiles, full tiles without mask arithmetic, masked tiles.
  for part in tl.static_range(3):
    lo, hi = _plan_part(start_n_ptr, end_n_ptr, full_start_n_ptr, full_end_n_ptr, tile, part)
    acc, m_i, l_i = _fwd_tiles(
        acc, m_i, l_i, q, q_idx, q_hash,
        k_ptr, v_ptr, k_perm_ptr, k_idx_ptr, k_hash_ptr, bh, b, n, lo, hi,
        QK_SCALE, S, N, H, BLOCK_N, HASHED, STRICT, part != 1, PRECISION,
    )  # fmt: skip

  has_key = l_i > 0.0
  o = acc / tl.where(has_key, l_i, 1.0)[:, None]
  lse = tl.where(has_key, m_i + tl.math.log2(tl.where(has_key, l_i, 1.0)), float("inf"))
  tl.store(o_ptr + q_offset[:, None] + tl.arange(0, H)[None, :], o.to(o_ptr.dtype.element_ty), mask=in_bounds[:, None])
  tl.store(lse_ptr + bh * T + slot, lse, mask=in_bounds)


@triton.jit
def _probabilities(
    q, k, q_idx, k_idx, q_hash, k_hash, lse, QK_SCALE: tl.constexpr,
    HASHED: tl.constexpr, STRICT: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
  """Recomputed softmax P [BLOCK_M, BLOCK_N] of one tile from the saved base-2 lse."""
  s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * QK_SCALE
  p = tl.math.exp2(s - lse[:, None])
  if MASKED:
    p = tl.where(_allowed(q_idx[:, None], k_idx[None, :], q_hash[:, None], k_hash[None, :], HASHED, STRICT), p, 0.0)
  return p


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v, k_idx, k_hash,
    q_ptr, do_ptr, q_perm_ptr, q_idx_ptr, q_hash_ptr, lse_ptr, delta_ptr, bh, b, n, lo, hi,
    QK_SCALE: tl.constexpr, T: tl.constexpr, N: tl.constexpr, H: tl.constexpr, BLOCK_M: tl.constexpr,
    HASHED: tl.constexpr, STRICT: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
  for i in range(lo, hi):
    slot = i * BLOCK_M + tl.arange(0, BLOCK_M)
    in_bounds = slot < T
    q_offset = _row_offsets(q_perm_ptr + bh * T, slot, in_bounds, b, n, T, N, H)
    q = _load_rows(q_ptr, q_offset, in_bounds, H)
    do = _load_rows(do_ptr, q_offset, in_bounds, H)
    lse = tl.load(lse_ptr + bh * T + slot, mask=in_bounds, other=float("inf"))
    delta = tl.load(delta_ptr + q_offset // H, mask=in_bounds, other=0.0)
    q_idx, q_hash = _token_keys(q_idx_ptr + bh * T, q_hash_ptr + bh * T, slot, in_bounds, -1, HASHED)
    # Key-major like Triton's tutorial: only loaded tiles get transposed, never computed ones.
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * QK_SCALE  # [BLOCK_N, BLOCK_M]
    p_t = tl.math.exp2(s_t - lse[None, :])
    if MASKED:
      allowed = _allowed(q_idx[None, :], k_idx[:, None], q_hash[None, :], k_hash[:, None], HASHED, STRICT)
      p_t = tl.where(allowed, p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
  return dk, dv


@triton.jit
def scfa_bwd_dkdv(
    q_ptr, k_ptr, v_ptr, do_ptr, q_perm_ptr, k_perm_ptr, q_idx_ptr, k_idx_ptr, q_hash_ptr, k_hash_ptr,
    lse_ptr, delta_ptr, start_m_ptr, end_m_ptr, full_start_m_ptr, full_end_m_ptr,
    dk_ptr, dv_ptr,
    SM_SCALE: tl.constexpr, QK_SCALE: tl.constexpr, T: tl.constexpr, S: tl.constexpr, N: tl.constexpr,
    H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HASHED: tl.constexpr, STRICT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
  """One program per (key tile, batch * head): dK and dV of BLOCK_N sorted keys.

  delta = rowsum(dO * O) comes in the original [B, T, N] layout.
  """
  pid_n = tl.program_id(0)
  bh = tl.program_id(1)
  b = bh // N
  n = bh % N
  slot = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
  in_bounds = slot < S
  k_offset = _row_offsets(k_perm_ptr + bh * S, slot, in_bounds, b, n, S, N, H)
  k = _load_rows(k_ptr, k_offset, in_bounds, H)
  v = _load_rows(v_ptr, k_offset, in_bounds, H)
  k_idx, k_hash = _token_keys(k_idx_ptr + bh * S, k_hash_ptr + bh * S, slot, in_bounds, K_PAD, HASHED)

  tile = bh * tl.num_programs(0) + pid_n

  dk = tl.zeros([BLOCK_N, H], tl.float32)
  dv = tl.zeros([BLOCK_N, H], tl.float32)
  for part in tl.static_range(3):
    lo, hi = _plan_part(start_m_ptr, end_m_ptr, full_start_m_ptr, full_end_m_ptr, tile, part)
    dk, dv = _dkdv_tiles(
        dk, dv, k, v, k_idx, k_hash,
        q_ptr, do_ptr, q_perm_ptr, q_idx_ptr, q_hash_ptr, lse_ptr, delta_ptr, bh, b, n, lo, hi,
        QK_SCALE, T, N, H, BLOCK_M, HASHED, STRICT, part != 1, PRECISION,
    )  # fmt: skip

  offsets = k_offset[:, None] + tl.arange(0, H)[None, :]
  tl.store(dk_ptr + offsets, (dk * SM_SCALE).to(dk_ptr.dtype.element_ty), mask=in_bounds[:, None])
  tl.store(dv_ptr + offsets, dv.to(dv_ptr.dtype.element_ty), mask=in_bounds[:, None])


@triton.jit
def _dq_tiles(
    dq, q, do, lse, delta, q_idx, q_hash,
    k_ptr, v_ptr, k_perm_ptr, k_idx_ptr, k_hash_ptr, bh, b, n, lo, hi,
    QK_SCALE: tl.constexpr, S: tl.constexpr, N: tl.constexpr, H: tl.constexpr, BLOCK_N: tl.constexpr,
    HASHED: tl.constexpr, STRICT: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
  for j in range(lo, hi):
    slot = j * BLOCK_N + tl.arange(0, BLOCK_N)
    in_bounds = slot < S
    k_offset = _row_offsets(k_perm_ptr + bh * S, slot, in_bounds, b, n, S, N, H)
    k = _load_rows(k_ptr, k_offset, in_bounds, H)
    v = _load_rows(v_ptr, k_offset, in_bounds, H)
    k_idx, k_hash = _token_keys(k_idx_ptr + bh * S, k_hash_ptr + bh * S, slot, in_bounds, K_PAD, HASHED)
    p = _probabilities(q, k, q_idx, k_idx, q_hash, k_hash, lse, QK_SCALE, HASHED, STRICT, MASKED, PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
  return dq


@triton.jit
def scfa_bwd_dq(
    q_ptr, k_ptr, v_ptr, do_ptr, q_perm_ptr, k_perm_ptr, q_idx_ptr, k_idx_ptr, q_hash_ptr, k_hash_ptr,
    lse_ptr, delta_ptr, start_n_ptr, end_n_ptr, full_start_n_ptr, full_end_n_ptr,
    dq_ptr,
    SM_SCALE: tl.constexpr, QK_SCALE: tl.constexpr, T: tl.constexpr, S: tl.constexpr, N: tl.constexpr,
    H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HASHED: tl.constexpr, STRICT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
  """One program per (query tile, batch * head): dQ of BLOCK_M sorted queries."""
  pid_m = tl.program_id(0)
  bh = tl.program_id(1)
  b = bh // N
  n = bh % N
  slot = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
  in_bounds = slot < T
  q_offset = _row_offsets(q_perm_ptr + bh * T, slot, in_bounds, b, n, T, N, H)
  q = _load_rows(q_ptr, q_offset, in_bounds, H)
  do = _load_rows(do_ptr, q_offset, in_bounds, H)
  lse = tl.load(lse_ptr + bh * T + slot, mask=in_bounds, other=float("inf"))
  delta = tl.load(delta_ptr + q_offset // H, mask=in_bounds, other=0.0)
  q_idx, q_hash = _token_keys(q_idx_ptr + bh * T, q_hash_ptr + bh * T, slot, in_bounds, -1, HASHED)

  tile = bh * tl.num_programs(0) + pid_m

  dq = tl.zeros([BLOCK_M, H], tl.float32)
  for part in tl.static_range(3):
    lo, hi = _plan_part(start_n_ptr, end_n_ptr, full_start_n_ptr, full_end_n_ptr, tile, part)
    dq = _dq_tiles(
        dq, q, do, lse, delta, q_idx, q_hash,
        k_ptr, v_ptr, k_perm_ptr, k_idx_ptr, k_hash_ptr, bh, b, n, lo, hi,
        QK_SCALE, S, N, H, BLOCK_N, HASHED, STRICT, part != 1, PRECISION,
    )  # fmt: skip
  offsets = q_offset[:, None] + tl.arange(0, H)[None, :]
  tl.store(dq_ptr + offsets, (dq * SM_SCALE).to(dq_ptr.dtype.element_ty), mask=in_bounds[:, None])
