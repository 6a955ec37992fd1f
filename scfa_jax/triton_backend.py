"""Triton backend: host code for the kernels in `kernels/attention.py`.

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
import inspect
import math
import os
import threading

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


# H100 (sm_90). Tile shapes after Triton's fused-attention tutorial: the backward keeps
# the resident tile large (keys for dK/dV, queries for dQ) and streams small ones.
_GPU_CONFIGS = {
    h: KernelConfig(
        block_m=128, block_n=64, block_m1=32, block_n1=128, block_m2=128, block_n2=32,
        num_warps=8 if h == 128 else 4, num_stages=3,
        bwd_num_warps=8 if h == 128 else 4, bwd_num_stages=3 if h == 128 else 5,
    )
    for h in HEAD_DIMS
}  # fmt: skip
# The interpreter runs every program in numpy: small tiles keep tests fast and still
# give several tiles per head at test lengths.
_INTERPRET_CONFIG = KernelConfig(block_m=16, block_n=16, block_m1=16, block_n1=32, block_m2=32, block_n2=16)


def kernel_config(implementation: str, head_dim: int) -> KernelConfig:
  return _INTERPRET_CONFIG if implementation == "interpret" else _GPU_CONFIGS[head_dim]


def _kernels():
  from scfa_jax.kernels import attention  # noqa: PLC0415  (imports triton)

  return attention


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
def _jax_triton():
  import jax_triton  # noqa: PLC0415

  return jax_triton


def default_available(q: jax.Array) -> bool:
  """Whether implementation=None should pick Triton for q: a GPU, jax_triton, a head dim we tile."""
  if jax.default_backend() != "gpu" or q.shape[-1] not in HEAD_DIMS:
    return False
  if os.environ.get("TRITON_INTERPRET") == "1":
    return False
  try:
    _jax_triton()
  except ImportError:
    return False
  return True


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
    _jax_triton()
  except ImportError as e:
    raise ValueError(f"implementation='triton' needs jax-triton, which failed to import: {e}") from e


def _launch(implementation, kernel, *, name, grid, inputs, out_shapes, num_warps, num_stages, **meta):
  """Runs `kernel` on `grid` with `inputs` then outputs as pointers and `meta` as constexprs."""
  if implementation == "triton":
    jt = _jax_triton()
    # jax-triton 0.3 calls the output spec out_shape, 0.4 calls it out_type.
    spec = "out_shape" if "out_shape" in inspect.signature(jt.triton_call).parameters else "out_type"
    return jt.triton_call(
        *inputs, kernel=kernel, grid=grid, name=name, num_warps=num_warps, num_stages=num_stages,
        **{spec: out_shapes}, **meta,
    )  # fmt: skip

  def run_on_host(*arrays):
    import torch  # noqa: PLC0415

    tensors = [torch.from_numpy(np.array(a)) for a in arrays]
    # NaN-poisoned outputs: a row the kernel forgets to write fails every test.
    outputs = [torch.full(s.shape, float("nan"), dtype=getattr(torch, str(s.dtype))) for s in out_shapes]
    with _interpreting():
      _interpreted(kernel.fn)[grid](*tensors, *outputs, **meta)
    return tuple(o.numpy() for o in outputs)

  return jax.pure_callback(run_on_host, tuple(out_shapes), *inputs, vmap_method="sequential")


def _common(config, q, k, tokens: SortedTokens):
  b, t, n, h = q.shape
  s = k.shape[1]
  hashes = (tokens.q_hash, tokens.k_hash) if tokens.hashed else (tokens.q_idx, tokens.k_idx)
  meta = dict(
      QK_SCALE=config.scale * LOG2E, T=t, S=s, N=n, H=h, HASHED=tokens.hashed, STRICT=config.strict,
      PRECISION="ieee" if q.dtype == jnp.float32 else "tf32",
  )  # fmt: skip
  indices = (tokens.q_perm, tokens.k_perm, tokens.q_idx, tokens.k_idx, *hashes)
  return b * n, kernel_config(config.implementation, h), indices, meta


def forward(config, q, k, v, tokens: SortedTokens):
  """O [B, T, N, H] at original rows and the base-2 lse [B, N, T] of each sorted query slot."""
  bn, kc, indices, meta = _common(config, q, k, tokens)
  plan = plan_lib.make_plan(tokens, block_q=kc.block_m, block_k=kc.block_n, strict=config.strict)
  b, t, n, _ = q.shape
  return _launch(
      config.implementation, _kernels().scfa_fwd, name="scfa_fwd", grid=(plan.num_q_tiles, bn),
      inputs=(q, k, v, *indices, plan.start_n, plan.end_n, plan.full_start_n, plan.full_end_n),
      out_shapes=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, t), jnp.float32)),
      num_warps=kc.num_warps, num_stages=kc.num_stages,
      BLOCK_M=kc.block_m, BLOCK_N=kc.block_n, **meta,
  )  # fmt: skip


def backward(config, q, k, v, tokens: SortedTokens, o, lse, do):
  bn, kc, indices, meta = _common(config, q, k, tokens)
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # [B, T, N]
  operands = (q, k, v, do, *indices, lse, delta)
  launch = functools.partial(
      _launch, config.implementation, num_warps=kc.bwd_num_warps, num_stages=kc.bwd_num_stages,
      SM_SCALE=config.scale, **meta,
  )  # fmt: skip
  by_key = plan_lib.make_plan(tokens, block_q=kc.block_m1, block_k=kc.block_n1, strict=config.strict)
  dk, dv = launch(
      _kernels().scfa_bwd_dkdv, name="scfa_bwd_dkdv", grid=(by_key.num_k_tiles, bn),
      inputs=(*operands, by_key.start_m, by_key.end_m, by_key.full_start_m, by_key.full_end_m),
      out_shapes=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
      BLOCK_M=kc.block_m1, BLOCK_N=kc.block_n1,
  )  # fmt: skip
  by_query = plan_lib.make_plan(tokens, block_q=kc.block_m2, block_k=kc.block_n2, strict=config.strict)
  (dq,) = launch(
      _kernels().scfa_bwd_dq, name="scfa_bwd_dq", grid=(by_query.num_q_tiles, bn),
      inputs=(*operands, by_query.start_n, by_query.end_n, by_query.full_start_n, by_query.full_end_n),
      out_shapes=(jax.ShapeDtypeStruct(q.shape, q.dtype),),
      BLOCK_M=kc.block_m2, BLOCK_N=kc.block_n2,
  )  # fmt: skip
  return dq, dk, dv
