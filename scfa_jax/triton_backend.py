"""Triton backend: host code for the kernels in `kernels/` (attention, tile plans, LSH).

Owns shapes, tile plans, grids and the per-head-dim tile table; the kernels own only
tile math. Two launchers run the same kernels: "triton" through jax-triton on a GPU,
and "interpret" through Triton's CPU interpreter inside a `jax.pure_callback` (for tests
on machines without a GPU). This is the only module that imports jax_triton, lazily:
`import jax_triton` fails on CPU-only jax.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import math
import os
import sys
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from scfa_jax import plan as plan_lib
from scfa_jax.sorting import SortedTokens

LOG2E = math.log2(math.e)
HEAD_DIMS = (16, 32, 64, 128)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelConfig:
  """Tile sizes and launch settings of the three kernels for one head dim."""

  block_m: int  # forward: queries per program
  block_n: int  # forward: keys per inner step
  block_m1: int  # dK/dV: queries per inner step
  block_n1: int  # dK/dV: keys per program
  block_m2: int  # dQ: queries per program
  block_n2: int  # dQ: keys per inner step
  num_warps: int = 4
  num_stages: int = 2
  bwd_num_warps: int = 4
  bwd_num_stages: int = 2
  one_loop: bool = False  # one pipelined loop per range that branches on full tiles, not three loops
  # Programs whose plan range is empty store their zero rows without reading q, k, v, dO or O:
  # QK mode's dropped tail, 70% of the rows at drop-70 (results/profile_h200_skip_empty.json).
  skip_empty_tiles: bool = True
  # Each tile loop reads the next tile's permutation one step ahead, so that Triton pipelines
  # the gathered rows' copies num_stages - 1 tiles ahead; False: read in the same step, which
  # leaves no copy in flight across a step (Nsight Compute, results/ncu_h200_16k_hash64_source.json).
  prefetch_rows: bool = True
  # Ordered tokens: masked tiles compare slot numbers with each own row's range of slots on the
  # other side (`RowRanges`: one more plan launch per forward, two with the backward), not the
  # streamed tile's idx and hash, whose loads wait in the loop (docs/design.md, "Masks from
  # row ranges").
  row_ranges: bool = False

  @property
  def kernel_tiles(self) -> dict[str, tuple[tuple[int, int], str]]:
    """Per kernel, its tile (query rows, key rows) and the view of the tile plan it reads:
    the forward and dQ stream key tiles past query tiles ("q"), dK/dV the reverse ("k")."""
    return {
        "fwd": ((self.block_m, self.block_n), "q"),
        "dkdv": ((self.block_m1, self.block_n1), "k"),
        "dq": ((self.block_m2, self.block_n2), "q"),
    }

  @property
  def switches(self) -> dict[str, bool]:
    """The constexprs that this config's switches set in every attention kernel (one place,
    for the launchers and for experiments/kernel_resources.py's builds)."""
    return dict(ONE_LOOP=self.one_loop, SKIP_EMPTY=self.skip_empty_tiles, PREFETCH=self.prefetch_rows)


# H100 / H200 (sm_90); why these tiles: docs/design.md, "The tile table". Two shapes
# of work: QK-sparse (and dense) ranges are long causal runs, best with 128-row forward
# tiles and three loops whose mask-free middle has no branch (Triton's tutorial backward
# tiles: dK/dV streams 32 queries past 128 keys; dQ 32 keys past 64 queries, which beat
# 128 queries: all kept 21.9 -> 20.8 ms, drop-70 2.84 -> 2.47 at T=16384). Hash-sparse
# ranges are short runs inside buckets: 64-row tiles and one software-pipelined loop
# (hash-64 at T=16384: kernels 5.8 -> 4.3 ms). Their programs are a few tiles long, so
# programs per SM (registers) beat pipeline depth: the forward's 64x32 tiles with 2 stages
# take 96 registers against 160 for 64x64 with 3 (5 programs per SM, not 3; Triton 3.9's
# sm_90 build, experiments/kernel_resources.py): hash-64 forward -20%, hash-16 -9%,
# hash-2 +6% at H=64 (results/profile_h200_occupancy.json).
# With prefetch_rows every kernel runs 3 stages: the row copies stay in flight across a step, and
# 5 backward stages would cost the hash dK/dV and the QK dQ a program per SM; the hash forward
# takes 3 too (94 registers, still 5 programs per SM), where 2 left no copy in flight. GPU ms at
# T=16384, prefetch off (5 backward stages, 2-stage hash forward) -> on with 3 everywhere: all
# kept 71.2 -> 67.9, hash-16 7.52 -> 6.86, hash-64 3.98 -> 3.73, drop-70 8.27 -> 7.70
# (results/profile_h200_16k_prefetch.json).
_QK_CONFIG = KernelConfig(
    block_m=128, block_n=64, block_m1=32, block_n1=128, block_m2=64, block_n2=32,
    num_warps=4, num_stages=3, bwd_num_warps=4, bwd_num_stages=3,
)  # fmt: skip
# Skipping the reads of empty tiles cut QK mode's GPU time (drop-70 -2.4% at T=16384, -6.5% at
# 4096; drop-90 -11 to -14%; all kept unchanged), but slowed the hash dQ kernel by 13% (hash-64,
# every length): hash tiles are rarely empty, and its short programs wait on the plan first.
# Row ranges: a third of hash tiles are masked, and the kernels ran 6-9% faster with them (H100,
# hash 16 at T=8192: 0.687 -> 0.644 ms at the model's B=4, N=12, 2.41 -> 2.21 at N=48), against
# 0.023 ms for the ranges at N=12; QK ranges are long and rarely masked: drop-50's kernels -1%,
# less than their ranges cost (results/profile_h100_8k_model16_row_ranges.json and the files
# docs/performance.md, "Masks from row ranges", names). Timed at H=64 without groups only.
_HASH_CONFIG = dataclasses.replace(
    _QK_CONFIG, block_m=64, block_n=32, block_n1=64, one_loop=True, skip_empty_tiles=False, row_ranges=True
)
# Other head dims, timed at T=16384 with N*H = 3072 (results/profile_h200_16k_head_dims.json).
# H=128 takes 4 warps everywhere, 64-row forward tiles and 64-key dK/dV tiles, and in QK mode
# 64-key dQ steps (a 64-key hash dQ was 9-17% slower); the 8-warp tiles held 1 program per SM
# and were 1.6-2.2x slower (GPU ms, all kept 115.5 -> 72.2, hash-16 15.1 -> 7.4). Its hash
# forward runs 1 stage (164 registers, 3 programs per SM). H=32 and H=16 take 64x64 QK
# forward tiles (forward, all kept: 30.0 -> 27.6 ms at H=32, 55.6 -> 49.4 at H=16; drop-70
# 4.09 -> 3.43 and 7.35 -> 6.19), which at H=64 were 4-7% slower (profile_h200_h64_tile_recheck.json).
_GPU_CONFIGS = {
    (h, hashed): _HASH_CONFIG if hashed else _QK_CONFIG for h in HEAD_DIMS for hashed in (False, True)
} | {
    (16, False): dataclasses.replace(_QK_CONFIG, block_m=64),
    (32, False): dataclasses.replace(_QK_CONFIG, block_m=64),
    # H=128 reads the permutation in the same step, as it was timed: its prefetching buffers
    # would cost programs per SM (QK dQ 2 -> 1, hash dQ 3 -> 2 in kernel_resources.py), not re-timed.
    (128, False): dataclasses.replace(
        _QK_CONFIG, block_m=64, num_stages=2, block_n1=64, block_n2=64, bwd_num_stages=3, prefetch_rows=False
    ),
    (128, True): dataclasses.replace(_HASH_CONFIG, num_stages=1, bwd_num_stages=3, prefetch_rows=False),
}
# The interpreter runs every program in numpy: small tiles keep tests fast and still
# give several tiles per head at test lengths; the loop structure follows the GPU's.
_INTERPRET_CONFIGS = {
    hashed: KernelConfig(
        block_m=16, block_n=16, block_m1=16, block_n1=32, block_m2=32, block_n2=16, one_loop=hashed, row_ranges=hashed
    )
    for hashed in (False, True)
}


# Grouped-query QK mode: the dK/dV program's loop over its group's query heads keeps more
# values live, and the tables' QK dK/dV tiles then spill at H=64 (32x128: 255 registers and
# 280 bytes of stack per thread against 8 without groups, 48 query heads on 8 kv heads) and
# H=128 (32x64: 24 bytes). Smaller tiles fit: 32x64 at H=64 (185 registers), 16x64 at H=128
# (239), as experiments/kernel_resources.py --kv_heads=8 builds them. Backward ms at T=16384,
# B=4, 48 query heads on 8 kv heads, H100: all kept 69.2 -> 60.1, drop-50 18.8 -> 15.6
# (results/bench_attention_gqa8_spilling_h100.json -> bench_attention_gqa8_h100.json; without
# groups, measured right after the latter on the same machine: 50.2 and 13.9,
# results/bench_attention_16k_h100.json). H=128's grouped tile is not timed.
_GROUPED_QK_DKDV = {64: dict(block_n1=64), 128: dict(block_m1=16)}


def kernel_config(implementation: str, head_dim: int, hashed: bool, grouped: bool = False) -> KernelConfig:
  """The tile table's entry: per head dim on GPUs, per mode (hashed or not), and for QK mode
  whether k and v have fewer heads than q (grouped)."""
  if implementation == "interpret":
    return _INTERPRET_CONFIGS[hashed]
  tiles = _GPU_CONFIGS[head_dim, hashed]
  if grouped and not hashed and head_dim in _GROUPED_QK_DKDV:
    tiles = dataclasses.replace(tiles, **_GROUPED_QK_DKDV[head_dim])
  return tiles


def _kernels(module: str = "attention"):
  """A Triton source module of kernels/ (importing it imports triton).

  An install maps `scfa_jax.kernels` to the top-level kernels/ folder (pyproject's
  package-dir); a source checkout used without installing (on PYTHONPATH, as on a machine
  the repository is only copied to) has no such package, so it is loaded from that folder.
  """
  try:
    return importlib.import_module(f"scfa_jax.kernels.{module}")
  except ModuleNotFoundError as e:
    source = Path(__file__).resolve().parents[1] / "kernels"
    if e.name != "scfa_jax.kernels" or not (source / "__init__.py").is_file():
      raise
  spec = importlib.util.spec_from_file_location(
      "scfa_jax.kernels", source / "__init__.py", submodule_search_locations=[str(source)]
  )
  package = importlib.util.module_from_spec(spec)
  sys.modules["scfa_jax.kernels"] = package
  spec.loader.exec_module(package)
  return importlib.import_module(f"scfa_jax.kernels.{module}")


_INTERPRETER_LOCK = threading.Lock()


@contextlib.contextmanager
def _interpreting():
  """Runs @triton.jit functions in Triton's CPU interpreter for the duration of the block.

  Triton picks the interpreter when it decorates a function, if TRITON_INTERPRET=1 was set
  before the import; that makes it a process-wide mode. Instead, the launcher wraps the
  kernel in an InterpretedFunction and, while it runs, lets every @triton.jit it calls
  (our helpers and triton.language's own, like tl.zeros) do the same. The compiler never
  uses JITFunction.__call__, so "triton" and "interpret" coexist in one process. The
  interpreter keeps global state: one launch at a time.
  """
  from triton.runtime import interpreter, jit  # noqa: PLC0415

  def call(self, *args, **kwargs):
    return _interpreted(self.fn)(*args, **kwargs)

  with _INTERPRETER_LOCK:
    original = jit.JITFunction.__call__
    jit.JITFunction.__call__ = call
    try:
      yield interpreter.InterpretedFunction
    finally:
      jit.JITFunction.__call__ = original


@functools.cache
def _interpreted(fn):
  from triton.runtime import interpreter  # noqa: PLC0415

  return interpreter.InterpretedFunction(fn)


@functools.cache
def import_jax_triton():
  """The jax_triton module, imported on first use (after `_define_tma_tf32`)."""
  _define_tma_tf32()
  import jax_triton  # noqa: PLC0415

  return jax_triton


def _define_tma_tf32() -> None:
  """jax-triton 0.4 imports `TMA_TF32` from triton.backends.nvidia.driver, which triton 3.6
  lacks, and on that ImportError swaps its whole CUDA backend for stubs (every launch then
  fails). The constant only tags host-side float32-as-TF32 TMA descriptors, which these
  kernels never build, so define it (as 0.4's own fallback does) where it is missing."""
  try:
    from triton.backends.nvidia import driver  # noqa: PLC0415
  except ImportError:  # no NVIDIA backend: nothing for jax-triton to stub out wrongly
    return
  if not hasattr(driver, "TMA_TF32"):
    driver.TMA_TF32 = 0


def default_available(q: jax.Array) -> bool:
  """Whether implementation=None should pick Triton for q: a GPU, jax_triton, a head dim we tile.

  On a GPU, falling back to XLA warns: its backend computes every score tile, so sparsity
  saves nothing there, and a missing jax-triton should not pass for slow kernels.
  """
  if jax.default_backend() != "gpu" or os.environ.get("TRITON_INTERPRET") == "1":
    return False
  if q.shape[-1] not in HEAD_DIMS:
    _warn_xla_on_gpu(f"the kernels take head dims {HEAD_DIMS}, got H={q.shape[-1]}")
    return False
  try:
    import_jax_triton()
  except ImportError as e:
    _warn_xla_on_gpu(f"jax-triton could not be imported ({e}; pip install 'scfa-jax[gpu]')")
    return False
  return True


def _warn_xla_on_gpu(reason: str) -> None:
  warnings.warn(
      f"scfa_jax: implementation=None runs the XLA backend on this GPU because {reason}. It computes every "
      "score tile and is many times slower than the Triton kernels; pass implementation='xla' to choose it "
      "explicitly.",
      RuntimeWarning,
      stacklevel=4,
  )


def check_supported(implementation: str, q: jax.Array) -> None:
  """Raises ValueError when `implementation` cannot run q here."""
  if q.shape[-1] not in HEAD_DIMS:
    raise ValueError(f"implementation={implementation!r} takes head dims H in {HEAD_DIMS}, got q.shape={q.shape}")
  if implementation == "interpret":
    if q.dtype == jnp.bfloat16:
      raise ValueError(
          "implementation='interpret' takes float32 or float16 (Triton's interpreter computes "
          f"bfloat16 dots wrongly), got q.dtype={q.dtype}"
      )
    try:
      import torch  # noqa: F401, PLC0415  (the interpreter's tensors)
      import triton  # noqa: F401, PLC0415
    except ImportError as e:
      raise ValueError(f"implementation='interpret' needs triton and torch (pip install 'scfa-jax[test]'): {e}") from e
    return
  if jax.default_backend() != "gpu":
    raise ValueError(f"implementation='triton' needs a CUDA GPU, but jax.default_backend()={jax.default_backend()!r}")
  if os.environ.get("TRITON_INTERPRET") == "1":
    raise ValueError("implementation='triton' cannot run with TRITON_INTERPRET=1 set")
  try:
    import_jax_triton()
  except ImportError as e:
    raise ValueError(
        f"implementation='triton' needs jax-triton (pip install 'scfa-jax[gpu]'), which failed to import: {e}"
    ) from e


def _launch(implementation, kernel, *, name, grid, inputs, out_shapes, num_warps, num_stages, zeroed=(), **meta):
  """Runs `kernel` on `grid` with `inputs` (arrays and int scalars) then outputs as pointers,
  and `meta` as constexprs; the outputs whose indices are in `zeroed` start as zeros."""
  if implementation == "triton":
    jt = import_jax_triton()
    # jax-triton 0.3 calls the output spec out_shape, 0.4 calls it out_type.
    spec = "out_shape" if "out_shape" in inspect.signature(jt.triton_call).parameters else "out_type"
    return jt.triton_call(
        *inputs, kernel=kernel, grid=grid, name=name, num_warps=num_warps, num_stages=num_stages,
        zeroed_outputs=zeroed, **{spec: out_shapes}, **meta,
    )  # fmt: skip

  is_array = [not isinstance(x, int) for x in inputs]

  def run_on_host(*arrays):
    import torch  # noqa: PLC0415

    tensors = iter(torch.from_numpy(np.array(a)) for a in arrays)
    args = [next(tensors) if array else x for x, array in zip(inputs, is_array, strict=True)]
    # Poisoned outputs (NaN, or the smallest integer): an element the kernel forgets to write fails every test.
    poison = lambda dtype: float("nan") if jnp.issubdtype(dtype, jnp.floating) else int(jnp.iinfo(dtype).min)
    outputs = [
        torch.full(s.shape, 0 if i in zeroed else poison(s.dtype), dtype=getattr(torch, str(s.dtype)))
        for i, s in enumerate(out_shapes)
    ]
    with _interpreting():
      _interpreted(kernel.fn)[grid](*args, *outputs, **meta)
    return tuple(o.numpy() for o in outputs)

  arrays = [x for x, array in zip(inputs, is_array, strict=True) if array]
  return jax.pure_callback(run_on_host, tuple(out_shapes), *arrays, vmap_method="sequential")


@dataclasses.dataclass(frozen=True)
class _Call:
  """What every launch shares: tiles, per-slot index arrays, lengths and constexprs."""

  tiles: KernelConfig
  bn: int  # batch * query heads: the forward's and dQ's programs per tile
  indices: tuple
  lengths: tuple[int, int, int, int]  # T, S (rows); LQ, LK (slots)
  meta: dict


def _tiles(config, head_dim: int, tokens: SortedTokens) -> KernelConfig:
  grouped = tokens.k_perm.shape[1] < tokens.q_perm.shape[1]  # K < N kv heads
  return config.kernel or kernel_config(config.implementation, head_dim, tokens.hashed, grouped)


def _hashes(tokens: SortedTokens) -> tuple[jax.Array, jax.Array]:
  """What the kernels read as buckets: the hashes, or the idx arrays when not HASHED (unread)."""
  return (tokens.q_hash, tokens.k_hash) if tokens.hashed else (tokens.q_idx, tokens.k_idx)


# jax.default_matmul_precision names that ask float32 products for less than float32.
_TF32_PRECISIONS = ("tensorfloat32", "high", "default", "bfloat16", "fastest", "bfloat16_3x")


def input_precision(dtype) -> str:
  """`tl.dot`'s input_precision for inputs of dtype: float32 inputs get IEEE float32
  products unless `jax.default_matmul_precision` asks for less ("tensorfloat32", "high",
  "default", ...: TF32, as XLA's float32 matmuls on these GPUs); 16-bit inputs multiply
  exactly either way (their products accumulate in float32)."""
  if jnp.dtype(dtype) != jnp.float32:
    return "tf32"
  return "tf32" if jax.config.jax_default_matmul_precision in _TF32_PRECISIONS else "ieee"


def _call(config, q, k, tokens: SortedTokens, rows: RowRanges | None = None) -> _Call:
  """With `rows`, the masks compare slots with the row ranges, which take the places of the idx
  and hash arrays: the query slots' in those of q_idx and q_hash, the key slots' in k's."""
  b, t, n, h = q.shape
  hashes = _hashes(tokens)
  meta = dict(
      QK_SCALE=config.scale * LOG2E, N=n, K=k.shape[2], H=h, HASHED=tokens.hashed, STRICT=config.strict,
      CHECK_PADS=not tokens.ordered,  # our sorts' positions lie in [0, T): pads fail the causal test
      PRECISION=input_precision(q.dtype),
      WIDE=max(q.size, k.size) >= 2**31,  # 64-bit element offsets; 32-bit ones cost fewer instructions
  )  # fmt: skip
  lengths = (t, k.shape[1], tokens.q_perm.shape[-1], tokens.k_perm.shape[-1])  # rows, then slots
  tiles = _tiles(config, h, tokens)
  meta["ALIGNED"] = all(x % 16 == 0 for x in lengths)
  meta |= tiles.switches
  indices = (tokens.q_perm, tokens.k_perm, tokens.q_idx, tokens.k_idx, *hashes)
  meta["ROW_RANGES"] = rows is not None
  if rows is not None:
    either = lambda x, other: other if x is None else x  # a side not built is not read
    indices = (
        tokens.q_perm, tokens.k_perm, either(rows.q_lo, rows.k_lo), either(rows.k_lo, rows.q_lo),
        either(rows.q_hi, rows.k_hi), either(rows.k_hi, rows.q_hi),
    )  # fmt: skip
  return _Call(tiles, b * n, indices, lengths, meta)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowRanges:
  """Of ordered tokens, per sorted slot the slots [lo, hi) of the other side it may pair
  with: one run, as `plan.py`'s rules say (a plan of 1 x 1 tiles). q_lo, q_hi [B, N, LQ]:
  each query slot's keys; k_lo, k_hi [B, N, LK]: each key slot's queries of each query
  head. None where not built."""

  q_lo: jax.Array | None
  q_hi: jax.Array | None
  k_lo: jax.Array | None
  k_hi: jax.Array | None


def row_ranges(implementation, tokens: SortedTokens, *, strict: bool, views: str) -> RowRanges:
  """The row ranges of `views` ("q", "k" or "qk"): one plan kernel launch each."""
  q_lo = q_hi = k_lo = k_hi = None
  if "q" in views:
    rows = plan_view(implementation, tokens, 1, 1, strict=strict, view="q")
    q_lo, q_hi = rows.start_n, rows.end_n
  if "k" in views:
    rows = plan_view(implementation, tokens, 1, 1, strict=strict, view="k")
    k_lo, k_hi = rows.start_m, rows.end_m
  return RowRanges(q_lo, q_hi, k_lo, k_hi)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Plans:
  """The tile plans of the three kernels (each has its own tile shape) and the row ranges
  their masks read (`KernelConfig.row_ranges`, ordered tokens); None where not built."""

  fwd: plan_lib.TilePlan
  dkdv: plan_lib.TilePlan | None
  dq: plan_lib.TilePlan | None
  rows: RowRanges | None = None


_PLAN_TILES = 128  # tiles per plan program: one per thread of 4 warps


def plan_view(implementation, tokens: SortedTokens, block_q: int, block_k: int, *, strict: bool, view: str):
  """One view of the tile plan of ordered tokens (`plan.make_plan`'s rules), in one launch
  of `kernels/plan.py`: "q" for the forward and dQ kernels, "k" for the dK/dV kernel."""
  if not tokens.ordered:
    raise ValueError("plan_view takes ordered tokens (by_bucket, by_keep_mask); use plan.make_plan for others")
  if view not in ("q", "k"):
    raise ValueError(f"view must be 'q' or 'k', got {view=}")
  q_hash, k_hash = _hashes(tokens)
  sides = [(tokens.q_idx, q_hash, block_q), (tokens.k_idx, k_hash, block_k)]
  (own_idx, own_hash, block), (other_idx, other_hash, other_block) = sides if view == "q" else sides[::-1]
  (b, n), length = tokens.q_idx.shape[:2], own_idx.shape[-1]  # one plan per query head, both views
  num_tiles = -(-length // block)
  per_program = min(_PLAN_TILES, max(16, 1 << (num_tiles - 1).bit_length()))
  ranges = _launch(
      implementation, _kernels("plan").scfa_plan, name=f"scfa_plan_{view}", grid=(-(-num_tiles // per_program), b * n),
      inputs=(own_idx, own_hash, other_idx, other_hash, length, other_idx.shape[-1]),
      out_shapes=[jax.ShapeDtypeStruct((b, n, num_tiles), jnp.int32)] * 4, num_warps=4, num_stages=1,
      BLOCK=block, OTHER_BLOCK=other_block, QUERY_MAJOR=view == "q", STRICT=strict, HASHED=tokens.hashed,
      TILES=per_program, LOG_LENGTH=max(length, other_idx.shape[-1]).bit_length(),
      GROUP=n // tokens.k_idx.shape[1], SHARED=tokens.shared and block_q == block_k == 1,
  )  # fmt: skip
  empty = (None,) * 4
  return plan_lib.TilePlan(
      *(ranges if view == "q" else empty), *(empty if view == "q" else ranges), block_q=block_q, block_k=block_k,
      num_q_tiles=-(-tokens.q_idx.shape[-1] // block_q), num_k_tiles=-(-tokens.k_idx.shape[-1] // block_k),
  )  # fmt: skip


def make_plans(config, q, tokens: SortedTokens, *, backward: bool) -> Plans:
  """The forward plan, and with `backward` the dQ and dK/dV plans too, each with the one
  view its kernel reads, and the row ranges where the tile table asks for them (ordered
  tokens; the query side's, and with `backward` the key side's). Ordered tokens take one
  plan kernel launch per distinct view; other orders plan.py's jnp."""
  tiles = _tiles(config, q.shape[-1], tokens)
  kernels = ("fwd", "dkdv", "dq") if backward else ("fwd",)  # `Plans`' field order
  shapes, views = zip(*(tiles.kernel_tiles[k] for k in kernels))
  if not tokens.ordered:
    plans = plan_lib.make_plans(tokens, shapes, strict=config.strict, views=views)
  else:
    built = {}
    for shape, view in zip(shapes, views, strict=True):
      if (shape, view) not in built:  # the hash table's forward and dQ tiles coincide
        built[shape, view] = plan_view(config.implementation, tokens, *shape, strict=config.strict, view=view)
    plans = [built[shape, view] for shape, view in zip(shapes, views, strict=True)]
  rows = None
  if tiles.row_ranges and tokens.ordered:
    rows = row_ranges(config.implementation, tokens, strict=config.strict, views="qk" if backward else "q")
  return Plans(*plans, rows=rows) if backward else Plans(plans[0], None, None, rows=rows)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Residuals:
  """What the backward needs from the forward besides q, k, v, O and the tokens: the plans
  and the base-2 lse per slot."""

  plans: Plans
  lse: jax.Array


def fwd_kernel(config, q, k, v, tokens: SortedTokens, plan: plan_lib.TilePlan, rows: RowRanges | None = None):
  """O [B, T, N, H] at original rows and the base-2 lse [B, N, LQ] of each sorted query slot."""
  c = _call(config, q, k, tokens, rows)
  b, n, t = tokens.q_perm.shape
  return _launch(
      config.implementation, _kernels().scfa_fwd, name="scfa_fwd", grid=(plan.num_q_tiles, c.bn),
      inputs=(q, k, v, *c.indices, plan.start_n, plan.end_n, plan.full_start_n, plan.full_end_n, *c.lengths),
      out_shapes=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, t), jnp.float32)),
      num_warps=c.tiles.num_warps, num_stages=c.tiles.num_stages,
      BLOCK_M=c.tiles.block_m, BLOCK_N=c.tiles.block_n,
      SCALE_AFTER_MAX=config.scale > 0, **c.meta,
  )  # fmt: skip


def _bwd_launch(config, c: _Call, kernel, plan_ranges, *, name, grid, operands, out_shapes, block_m, block_n):
  return _launch(
      config.implementation, kernel, name=name, grid=grid,
      inputs=(*operands[:4], *c.indices, *operands[4:], *plan_ranges, *c.lengths), out_shapes=out_shapes,
      num_warps=c.tiles.bwd_num_warps, num_stages=c.tiles.bwd_num_stages,
      SM_SCALE=config.scale, BLOCK_M=block_m, BLOCK_N=block_n, **c.meta,
  )  # fmt: skip


def dq_kernel(config, q, k, v, tokens, o, lse, do, plan: plan_lib.TilePlan, rows: RowRanges | None = None):
  """dQ [B, T, N, H] at original rows, and delta = rowsum(dO * O) [B, N, LQ] per sorted slot."""
  c = _call(config, q, k, tokens, rows)
  b, n, t = tokens.q_perm.shape
  return _bwd_launch(
      config, c, _kernels().scfa_bwd_dq, (plan.start_n, plan.end_n, plan.full_start_n, plan.full_end_n),
      name="scfa_bwd_dq", grid=(plan.num_q_tiles, c.bn), operands=(q, k, v, do, lse, o),
      out_shapes=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, t), jnp.float32)),
      block_m=c.tiles.block_m2, block_n=c.tiles.block_n2,
  )  # fmt: skip


def dkdv_kernel(config, q, k, v, tokens, lse, delta, do, plan: plan_lib.TilePlan, rows: RowRanges | None = None):
  """dK, dV [B, S, K, H] at original rows; one program per key tile of a kv head, summing
  over the query heads of its group."""
  c = _call(config, q, k, tokens, rows)
  return _bwd_launch(
      config, c, _kernels().scfa_bwd_dkdv, (plan.start_m, plan.end_m, plan.full_start_m, plan.full_end_m),
      name="scfa_bwd_dkdv", grid=(plan.num_k_tiles, k.shape[0] * k.shape[2]),  # batch * kv heads
      operands=(q, k, v, do, lse, delta),
      out_shapes=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
      block_m=c.tiles.block_m1, block_n=c.tiles.block_n1,
  )  # fmt: skip


def forward(config, q, k, v, tokens: SortedTokens, *, differentiating: bool = False):
  """O [B, T, N, H] and the `Residuals`; the backward's plans are built only when `differentiating`."""
  plans = make_plans(config, q, tokens, backward=differentiating)
  o, lse = fwd_kernel(config, q, k, v, tokens, plans.fwd, plans.rows)
  return o, Residuals(plans, lse)


def backward(config, q, k, v, tokens: SortedTokens, o, residuals: Residuals, do):
  plans = residuals.plans
  dq, delta = dq_kernel(config, q, k, v, tokens, o, residuals.lse, do, plans.dq, plans.rows)
  dk, dv = dkdv_kernel(config, q, k, v, tokens, residuals.lse, delta, do, plans.dkdv, plans.rows)
  return dq, dk, dv


@dataclasses.dataclass(frozen=True, kw_only=True)
class LshTiles:
  """Launch settings of the LSH kernel (`kernels/lsh.py`)."""

  block_t: int  # tokens per program
  num_warps: int = 4
  num_stages: int = 1
  publish_inclusive: bool = True  # False: each look-back walks to the first tile (tests)


_LSH_TILES = {"triton": LshTiles(block_t=128), "interpret": LshTiles(block_t=16)}


def centered_buckets(implementation, x, rotations, segment_ids, out_dtype, tiles: LshTiles | None = None):
  """`lsh.centered_buckets` in one launch of `kernels/lsh.py`: bucket ids [B, T, N] of out_dtype.

  x: [B, T, N, H]; rotations [N, H, R]; segment_ids int [B, T] or None.
  """
  b, t, n, h = x.shape
  r = rotations.shape[-1]
  if t == 0:  # no tile to launch
    return jnp.zeros((b, 0, n), out_dtype)
  tiles = tiles or _LSH_TILES[implementation]
  num_tiles = -(-t // tiles.block_t)
  segments = segment_ids is not None
  buckets, *_published = _launch(
      implementation, _kernels("lsh").scfa_lsh, name="scfa_lsh", grid=(b * n, num_tiles),
      inputs=(x, rotations.astype(jnp.float32), segment_ids.astype(jnp.int32) if segments else jnp.zeros((1,), jnp.int32), t),
      out_shapes=(
          jax.ShapeDtypeStruct((b, t, n), out_dtype),
          jax.ShapeDtypeStruct((b * n, num_tiles, 2, r), jnp.float32),  # each tile's aggregate and inclusive sums
          jax.ShapeDtypeStruct((b * n, num_tiles, 2), jnp.int32),  # and their document starts
          jax.ShapeDtypeStruct((b * n, num_tiles), jnp.int32),  # flags, zeroed
      ),
      zeroed=(3,), num_warps=tiles.num_warps, num_stages=tiles.num_stages,
      N=n, H=h, R=r, RP=max(16, 1 << (r - 1).bit_length()), BLOCK_T=tiles.block_t, SEGMENTS=segments,
      PRECISION=input_precision(jnp.float32), PUBLISH_INCLUSIVE=tiles.publish_inclusive,
  )  # fmt: skip
  return buckets
