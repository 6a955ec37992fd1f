"""Causally centered angular LSH in one pass (Triton source only).

`scfa_jax/lsh.py` states the hash and keeps the jnp version (`centered_buckets`), the
oracle this kernel is tested against. A token's bucket is the argmax over [c, -c] of
c = p[t] - mean(p[s] for the earlier s of its run), p = (x / |x|) R, where a run is the
whole row or, with SEGMENTS, one document of it. XLA runs that as several passes over
float32 copies of x; here each program reads one tile of BLOCK_T rows of one (batch,
head) once and stores its bucket ids at [B, T, N].

The running mean crosses tiles, so the programs of one (batch, head) scan their sums in
a single pass with decoupled look-back (Merrill and Garland, 2016): a program publishes
its tile's sum of p (flag 1), adds up its predecessors' published values, walking back
until it meets a tile that published its inclusive sum (flag 2) or, with SEGMENTS, one
whose document started inside it, then publishes its own inclusive sum (flag 2). The
grid runs (batch * head) fastest, so every tile's predecessors were launched before it:
a program only waits on programs that already run. A tile's published values are
(sum of p since its last document start, that start's row or -1); the flags are zeroed
before the launch.

x is [B, T, N, H] (rows of H contiguous elements), rotations [N, H, R] float32, whose R
columns are read into RP >= 16 (tl.dot's smallest width; the padding columns are 0 and
never win the argmax). Element offsets are int64: the kernel is memory-bound.
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
def _publish(sums_ptr, starts_ptr, flags_ptr, slot, total, start, FLAG: tl.constexpr, R: tl.constexpr, RP: tl.constexpr):
  """Stores a tile's (sum, start) as its aggregate (FLAG 1) or inclusive (FLAG 2) value, then
  the flag: every thread's stores come before the flag's release."""
  cols = tl.arange(0, RP)
  tl.store(sums_ptr + (slot * 2 + FLAG - 1) * R + cols, total, mask=cols < R)
  tl.store(starts_ptr + slot * 2 + FLAG - 1, start)
  tl.debug_barrier()
  tl.atomic_xchg(flags_ptr + slot, FLAG, sem="release")


@triton.jit
def scfa_lsh(
    x_ptr, rot_ptr, seg_ptr, T, buckets_ptr, sums_ptr, starts_ptr, flags_ptr,
    N: tl.constexpr, H: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, BLOCK_T: tl.constexpr,
    SEGMENTS: tl.constexpr, PRECISION: tl.constexpr, PUBLISH_INCLUSIVE: tl.constexpr,
):  # fmt: skip
  """Bucket ids [B, T, N] of one tile; sums [B * N, C, 2, R], starts [B * N, C, 2] and flags
  [B * N, C] (zeroed) are the tiles' published values. Without PUBLISH_INCLUSIVE only the
  first tile publishes an inclusive sum, so every look-back walks to it or to a document
  start: the walk that concurrent programs take, for the interpreter, which runs one at a time."""
  bn, tile = tl.program_id(0), tl.program_id(1)
  b, n = bn // N, bn % N
  slot = bn * tl.num_programs(1) + tile
  rows = tile * BLOCK_T + tl.arange(0, BLOCK_T)
  p = _projections(x_ptr, _rotations(rot_ptr, n, H, R, RP), b, n, rows, T, N, H, PRECISION)
  if SEGMENTS:
    starts = _run_starts(seg_ptr, b, rows, T)
    own, own_start = _carry_on(tl.zeros([RP], tl.float32), p, rows, starts)
  else:
    own, own_start = tl.sum(p, axis=0), tl.full([], -1, tl.int32)
  if tile == 0:
    _publish(sums_ptr, starts_ptr, flags_ptr, slot, own, own_start, 2, R, RP)
  else:
    _publish(sums_ptr, starts_ptr, flags_ptr, slot, own, own_start, 1, R, RP)

  # Look back: the run's sum of p before this tile, and the row it starts at.
  cols = tl.arange(0, RP)
  carry = tl.zeros([RP], tl.float32)
  run_start = tl.full([], -1, tl.int32)
  before = slot - 1
  looking = tile > 0
  while looking:
    flag = tl.atomic_add(flags_ptr + before, 0, sem="acquire")
    while flag == 0:
      flag = tl.atomic_add(flags_ptr + before, 0, sem="acquire")
    carry += tl.load(sums_ptr + (before * 2 + flag - 1) * R + cols, mask=cols < R, other=0.0)
    start = tl.load(starts_ptr + before * 2 + flag - 1)
    run_start = tl.maximum(run_start, start)
    looking = (flag == 1) & (start < 0) & (before > slot - tile)
    before -= 1
  if PUBLISH_INCLUSIVE and tile > 0:
    if own_start >= 0:
      _publish(sums_ptr, starts_ptr, flags_ptr, slot, own, own_start, 2, R, RP)
    else:
      _publish(sums_ptr, starts_ptr, flags_ptr, slot, carry + own, run_start, 2, R, RP)

  if SEGMENTS:
    flags = tl.broadcast_to(starts.to(tl.int32)[:, None], (BLOCK_T, RP))
    _, running = tl.associative_scan((flags, p), 0, _segmented_add)
    # Rows before the tile's first start continue the run carried in.
    continues = tl.cumsum(starts.to(tl.int32), axis=0) == 0
    earlier = running - p + tl.where(continues[:, None], carry[None, :], 0.0)
    count = rows - tl.maximum(tl.associative_scan(tl.where(starts, rows, -1), 0, _maximum), run_start)
  else:
    earlier = carry[None, :] + tl.cumsum(p, axis=0) - p
    count = rows
  centered = p - earlier / tl.maximum(count.to(tl.float32), 1.0)[:, None]
  bucket = _signed_argmax(centered, R, RP)
  tl.store(buckets_ptr + (b * T + rows).to(tl.int64) * N + n, bucket.to(buckets_ptr.dtype.element_ty), mask=rows < T)
