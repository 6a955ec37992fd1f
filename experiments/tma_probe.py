"""Probe: can a Triton kernel launched through jax-triton use a TMA tensor descriptor?

Not used by the library. FlashAttention-3's dQ reduction (TMA adds from shared memory) is
what a 5-unit SCFA backward would need (docs/design.md, "The backward"). Triton 3.6 builds
device-side descriptors with `tl.make_tensor_descriptor`, which writes them into the global
scratch buffer that the launcher must allocate. Each case copies one [64, 64] block through
jax-triton, in its own process (an illegal address poisons the CUDA context):

  python experiments/tma_probe.py            # all cases, one line each
  python experiments/tma_probe.py --case=descriptor

Cases: "pointers" (plain loads, the control), "descriptor" (a device-side descriptor),
"descriptor_allocator" (the same after `triton.set_allocator`, which Triton's own launcher
would use for the scratch; jax-triton launches through jaxlib, not that launcher), and
"reduce_add" (two programs each add their float32 block into one zeroed output through a
descriptor's `atomic_add`: the TMA reduction a fused dQ would use).

jax_triton is imported through `scfa_jax.triton_backend.import_jax_triton`, so that the
probe meets the library's own launcher set-up (jax-triton 0.3 and 0.4 both work).
"""

from __future__ import annotations

import argparse
import inspect
import subprocess
import sys

CASES = ("pointers", "descriptor", "descriptor_allocator", "reduce_add")
BLOCK = 64


def _kernel():
  import triton  # noqa: PLC0415
  import triton.language as tl  # noqa: PLC0415

  @triton.jit
  def copy_block(
    x_ptr, y_ptr, ROWS: tl.constexpr, COLS: tl.constexpr, BLOCK: tl.constexpr, DESCRIPTOR: tl.constexpr
  ):
    offs = tl.arange(0, BLOCK)
    if DESCRIPTOR:
      desc = tl.make_tensor_descriptor(
        x_ptr, shape=[ROWS, COLS], strides=[COLS, 1], block_shape=[BLOCK, BLOCK]
      )
      block = desc.load([0, 0])
    else:
      block = tl.load(x_ptr + offs[:, None] * COLS + offs[None, :])
    tl.store(y_ptr + offs[:, None] * BLOCK + offs[None, :], block)

  @triton.jit
  def add_block(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    block = tl.load(x_ptr + offs[:, None] * BLOCK + offs[None, :])
    desc = tl.make_tensor_descriptor(
        y_ptr, shape=[BLOCK, BLOCK], strides=[BLOCK, 1], block_shape=[BLOCK, BLOCK]
    )
    desc.atomic_add([0, 0], block * (tl.program_id(0) + 1))

  return copy_block, add_block


def run(case: str) -> str:
  """One case in this process: 'ok' when the block arrives intact, else what went wrong."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from scfa_jax.triton_backend import import_jax_triton  # noqa: PLC0415

  jt = import_jax_triton()
  spec = "out_shape" if "out_shape" in inspect.signature(jt.triton_call).parameters else "out_type"

  if case == "descriptor_allocator":
    import triton  # noqa: PLC0415

    buffers = []

    def allocate(size, alignment, stream):
      del stream
      buffers.append(jnp.zeros(size + alignment, jnp.uint8))
      return buffers[-1].unsafe_buffer_pointer()

    triton.set_allocator(allocate)
  copy_block, add_block = _kernel()
  if case == "reduce_add":
    x = jnp.arange(BLOCK * BLOCK, dtype=jnp.float32).reshape(BLOCK, BLOCK)
    y = jt.triton_call(
        x, kernel=add_block, grid=(2,), zeroed_outputs=(0,), BLOCK=BLOCK,
        **{spec: jax.ShapeDtypeStruct((BLOCK, BLOCK), x.dtype)},
    )  # fmt: skip
    return "ok" if bool(jnp.array_equal(jax.block_until_ready(y), 3 * x)) else "wrong values"
  x = jnp.arange(BLOCK * 2 * BLOCK, dtype=jnp.float32).reshape(BLOCK, 2 * BLOCK).astype(jnp.bfloat16)
  y = jt.triton_call(
      x, kernel=copy_block, grid=(1,), ROWS=BLOCK, COLS=2 * BLOCK, BLOCK=BLOCK, DESCRIPTOR=case != "pointers",
      **{spec: jax.ShapeDtypeStruct((BLOCK, BLOCK), x.dtype)},
  )  # fmt: skip
  same = bool(jnp.array_equal(jax.block_until_ready(y), x[:, :BLOCK]))
  return "ok" if same else "wrong values"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--case", choices=CASES, default="")
  args = parser.parse_args()
  if args.case:
    print(f"{args.case}: {run(args.case)}", flush=True)
    return
  for case in CASES:
    done = subprocess.run(
      [sys.executable, __file__, f"--case={case}"], check=False, capture_output=True, text=True, timeout=300
    )
    lines = (done.stdout + done.stderr).strip().splitlines()
    raised = [line for line in lines if "Error: " in line]  # the exception, before the teardown's complaints
    last = lines[-1] if done.returncode == 0 and lines else (raised or lines or [""])[0]
    print(f"{case}: exit {done.returncode}: {last[:300]}", flush=True)


if __name__ == "__main__":
  main()
