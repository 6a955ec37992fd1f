"""Causally centered angular LSH (Triton source only).

`scfa_jax/lsh.py` states the hash and keeps the jnp version (`centered_buckets`), the
oracle these kernels are tested against. A token's bucket is the argmax over [c, -c] of
c = p[t] - mean(p[s] for the earlier s of its run), p = (x / |x|) R, where a run is the
whole row or, with SEGMENTS, one document of it. XLA runs that as several passes over
float32 copies of x; here each chunk of CHUNK tokens of one (batch, head) is one program
that reads x once per launch:

  1. `scfa_lsh_chunk_sums`: the chunk's sum of p (with SEGMENTS: the sum since the
     chunk's last document start, and that start), [B, N, C, R] and [B, N, C];
  2. the host scans those sums across chunks (a few hundred values per head);
  3. `scfa_lsh_buckets`: p again, its running sum inside the chunk plus the carried one,
     the centering and the argmax; stores one bucket id per token at [B, T, N].

x is [B, T, N, H] (rows of H contiguous elements), rotations [N, H, R] float32, whose R
columns are read into RP >= 16 (tl.dot's smallest width; the padding columns are 0 and
never win the argmax). Element offsets are int64: the kernels are memory-bound.
"""

import triton
import triton.language as tl


@triton.jit
def _rotations(rot_ptr, n, H: tl.constexpr, R: tl.constexpr, RP: tl.constexpr):
  rows = tl.arange(0, H)[:, None]
  cols = tl.arange(0, RP)[None, :]
  return tl.load(rot_ptr + (n * H + rows) * R + cols, mask=cols < R, other=0.0)


@triton.jit
def _projections(x_ptr, rot, b, n, rows, T, N: tl.constexpr, H: tl.constexpr, PRECISION: tl.constexpr):
  """p = (x / |x|) R for the rows of one (batch, head), float32 [BLOCK_T, RP]; 0 past T."""
  offsets = ((b * T + rows).to(tl.int64) * N + n) * H
  x = tl.load(x_ptr + offsets[:, None] + tl.arange(0, H)[None, :], mask=(rows < T)[:, None], other=0.0)
  x = x.to(tl.float32)
  unit = x / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-12)[:, None]
  return tl.dot(unit, rot, input_precision=PRECISION)


@triton.jit
def _run_starts(seg_ptr, b, rows, T):
  """Where a document starts: the first row, or a segment id unlike the row before."""
  valid = rows < T
  seg = tl.load(seg_ptr + b * T + rows, mask=valid, other=0)
  before = tl.load(seg_ptr + b * T + rows - 1, mask=valid & (rows > 0), other=0)
  return valid & ((rows == 0) | (seg != before))


@triton.jit
def _carry_on(carry, p, rows, starts):
  """The run's sum of p after this tile (it restarts at the tile's last start), and that start (-1: none)."""
  last = tl.max(tl.where(starts, rows, -1), axis=0)
  tail = tl.sum(tl.where((rows >= last)[:, None], p, 0.0), axis=0)
  return tl.where(last >= 0, 0.0, carry) + tail, last


@triton.jit
def _segmented_add(flag_a, value_a, flag_b, value_b):
  return flag_a | flag_b, tl.where(flag_b != 0, value_b, value_a + value_b)


@triton.jit
def _maximum(a, b):
  return tl.maximum(a, b)


@triton.jit
def _signed_argmax(c, R: tl.constexpr, RP: tl.constexpr):
  """jnp.argmax(concatenate([c, -c], -1), -1) per row: the largest |c_r|, as r where
  c_r >= 0 and R + r where not; ties go to the smaller index, as argmax's first one."""
  cols = tl.arange(0, RP)[None, :]
  magnitude = tl.where(cols < R, tl.abs(c), -1.0)
  index = tl.where(c >= 0, cols, cols + R)
  best = tl.max(magnitude, axis=1)
  return tl.min(tl.where(magnitude == best[:, None], index, 2 * RP), axis=1)


@triton.jit
def scfa_lsh_chunk_sums(
    x_ptr, rot_ptr, seg_ptr, T, sums_ptr, starts_ptr,
    N: tl.constexpr, H: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_T: tl.constexpr, SEGMENTS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
  """Per chunk: sums [B, N, C, R] of p over the chunk (with SEGMENTS, over its tail from
  its last document start) and starts [B, N, C], that start's row or -1."""
  chunk, bn = tl.program_id(0), tl.program_id(1)
  b, n = bn // N, bn % N
  rot = _rotations(rot_ptr, n, H, R, RP)
  carry = tl.zeros([RP], tl.float32)
  last = tl.full([], -1, tl.int32)
  for i in tl.range(0, CHUNK, BLOCK_T):
    rows = chunk * CHUNK + i + tl.arange(0, BLOCK_T)
    p = _projections(x_ptr, rot, b, n, rows, T, N, H, PRECISION)
    if SEGMENTS:
      carry, tile_last = _carry_on(carry, p, rows, _run_starts(seg_ptr, b, rows, T))
      last = tl.maximum(last, tile_last)
    else:
      carry += tl.sum(p, axis=0)
  cols = tl.arange(0, RP)
  tl.store(sums_ptr + (bn * tl.num_programs(0) + chunk) * R + cols, carry, mask=cols < R)
  tl.store(starts_ptr + bn * tl.num_programs(0) + chunk, last)


@triton.jit
def scfa_lsh_buckets(
    x_ptr, rot_ptr, seg_ptr, carry_ptr, run_start_ptr, T, buckets_ptr,
    N: tl.constexpr, H: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_T: tl.constexpr, SEGMENTS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
  """Bucket ids [B, T, N] of one chunk, given carry [B, N, C, R], the run's sum of p
  before the chunk, and (with SEGMENTS) run_start [B, C], the row its run starts at."""
  chunk, bn = tl.program_id(0), tl.program_id(1)
  b, n = bn // N, bn % N
  rot = _rotations(rot_ptr, n, H, R, RP)
  cols = tl.arange(0, RP)
  carry = tl.load(carry_ptr + (bn * tl.num_programs(0) + chunk) * R + cols, mask=cols < R, other=0.0)
  if SEGMENTS:
    run_start = tl.load(run_start_ptr + b * tl.num_programs(0) + chunk)
  for i in tl.range(0, CHUNK, BLOCK_T):
    rows = chunk * CHUNK + i + tl.arange(0, BLOCK_T)
    p = _projections(x_ptr, rot, b, n, rows, T, N, H, PRECISION)
    if SEGMENTS:
      starts = _run_starts(seg_ptr, b, rows, T)
      flags = tl.broadcast_to(starts.to(tl.int32)[:, None], (BLOCK_T, RP))
      _, running = tl.associative_scan((flags, p), 0, _segmented_add)
      # Rows before the tile's first start continue the run carried in.
      continues = tl.cumsum(starts.to(tl.int32), axis=0) == 0
      earlier = running - p + tl.where(continues[:, None], carry[None, :], 0.0)
      count = rows - tl.maximum(tl.associative_scan(tl.where(starts, rows, -1), 0, _maximum), run_start)
      carry, tile_last = _carry_on(carry, p, rows, starts)
      run_start = tl.maximum(run_start, tile_last)
    else:
      earlier = carry[None, :] + tl.cumsum(p, axis=0) - p
      count = rows
      carry += tl.sum(p, axis=0)
    centered = p - earlier / tl.maximum(count.to(tl.float32), 1.0)[:, None]
    bucket = _signed_argmax(centered, R, RP)
    offsets = (b * T + rows).to(tl.int64) * N + n
    tl.store(buckets_ptr + offsets, bucket.to(buckets_ptr.dtype.element_ty), mask=rows < T)
