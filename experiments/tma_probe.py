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
would use for the scratch; jax-triton launches through jaxlib, not that launcher).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

CASES = ("pointers", "descriptor", "descriptor_allocator")
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

  return copy_block


def run(case: str) -> str:
  """One case in this process: 'ok' when the block arrives intact, else what went wrong."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import jax_triton as jt  # noqa: PLC0415

  if case == "descriptor_allocator":
    import triton  # noqa: PLC0415

    buffers = []

    def allocate(size, alignment, stream):
      del stream
      buffers.append(jnp.zeros(size + alignment, jnp.uint8))
      return buffers[-1].unsafe_buffer_pointer()

    triton.set_allocator(allocate)
  x = jnp.arange(BLOCK * 2 * BLOCK, dtype=jnp.float32).reshape(BLOCK, 2 * BLOCK).astype(jnp.bfloat16)
  y = jt.triton_call(
      x, kernel=_kernel(), grid=(1,), out_shape=jax.ShapeDtypeStruct((BLOCK, BLOCK), x.dtype),
      ROWS=BLOCK, COLS=2 * BLOCK, BLOCK=BLOCK, DESCRIPTOR=case != "pointers",
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
