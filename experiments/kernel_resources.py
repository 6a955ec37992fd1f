"""Registers, shared memory and programs per SM of each SCFA kernel, from an sm_90 build.

No GPU needed: Triton compiles the kernels for sm_90 with the ptxas it ships, and its
cuobjdump reads the registers back. Short hash-mode programs (a few tiles each) are bound
by how many programs an SM holds, and registers usually decide that, so this explains the
tile table (`triton_backend._GPU_CONFIGS`) without a device. It uses the installed Triton,
whose register counts can differ from another version's by a few.

  python experiments/kernel_resources.py                      # the table's entries
  python experiments/kernel_resources.py --variants=hash_table+block_n=64+num_stages=3
  python experiments/kernel_resources.py --maxnreg=dkdv:128,dq:96   # Triton's register cap
  python experiments/kernel_resources.py --occupancy=96:24576:4      # the sm_90 rule alone
  python experiments/kernel_resources.py --kv_heads=8                 # grouped-query: 48 query heads, 8 kv heads
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

from experiments.profile_attention import BASES, variant  # noqa: E402

REGISTERS_PER_SM = 65536
SHARED_PER_SM = 228 * 1024  # sm_90, of which one program may take 227 KiB
MAX_PROGRAMS_PER_SM = 32
MAX_WARPS_PER_SM = 64
_BF16_PTRS = ("q_ptr", "k_ptr", "v_ptr", "do_ptr", "o_ptr", "dq_ptr", "dk_ptr", "dv_ptr")


def programs_per_sm(registers: int, shared: int, num_warps: int) -> int:
  """Resident programs per SM: registers are allocated per warp in units of 256."""
  per_warp = -(-registers * 32 // 256) * 256
  by_registers = REGISTERS_PER_SM // (per_warp * num_warps)
  by_shared = SHARED_PER_SM // (shared + 1024)  # the driver reserves 1 KiB per program
  return min(by_registers, by_shared, MAX_WARPS_PER_SM // num_warps, MAX_PROGRAMS_PER_SM)


def resources(kernel, constexprs: dict, num_warps: int, num_stages: int, maxnreg: int | None = None) -> dict:
  """Registers and shared bytes of `kernel` built for sm_90 with these constexprs."""
  import triton  # noqa: PLC0415
  from triton.backends.compiler import GPUTarget  # noqa: PLC0415
  from triton.compiler import ASTSource  # noqa: PLC0415

  signature, attrs = {}, {}
  for i, name in enumerate(inspect.signature(kernel.fn).parameters):
    if name in constexprs:
      signature[name] = "constexpr"
    elif name.endswith("_ptr"):
      is_f32 = name in ("lse_ptr", "delta_ptr")
      signature[name] = "*bf16" if name in _BF16_PTRS else "*fp32" if is_f32 else "*i32"
      attrs[(i,)] = [["tt.divisibility", 16]]  # as jax-triton's buffers are
    else:
      signature[name] = "i32"
  compiled = triton.compile(
      ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
      target=GPUTarget("cuda", 90, 32),
      options=dict(num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg),
  )
  cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
  with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
    f.write(compiled.asm["cubin"])
    f.flush()
    usage = subprocess.run(
        [cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
    )
    sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout
  registers = int(re.search(r"REG:(\d+)", usage.stdout).group(1))
  stack = int(re.search(r"STACK:(\d+)", usage.stdout).group(1))  # bytes per thread: spills
  shared = compiled.metadata.shared
  programs = programs_per_sm(registers, shared, num_warps)
  # The most async copy groups a wait leaves pending: 0 means every step waits for all of its
  # row copies before its first product (no copy in flight across a step; docs/design.md, "Row prefetch").
  pending = max((int(n, 16) for n in re.findall(r"DEPBAR\.LE SB0, 0x([0-9a-f]+)", sass)), default=0)
  return dict(registers=registers, stack=stack, shared=shared, programs_per_sm=programs, copies_pending=pending)


def kernel_rows(spec: str, head_dim: int, hashed: bool, maxnreg: dict | None = None, kv_heads: int = 48) -> list[dict]:
  """One row per kernel (forward, dQ, dK/dV) of variant `spec` (profile_attention's spelling),
  with 48 query heads and `kv_heads` kv heads."""
  from scfa_jax.kernels import attention  # noqa: PLC0415

  tiles = variant(spec)(head_dim, hashed, kv_heads < 48)
  base = dict(
      QK_SCALE=0.18,  # about 0.125 * log2(e); its value does not change the resources
      N=48, K=kv_heads, H=head_dim, HASHED=hashed, STRICT=False, CHECK_PADS=False, PRECISION="tf32", ALIGNED=True,
      WIDE=False, ROW_RANGES=tiles.row_ranges, **tiles.switches,
  )  # fmt: skip
  fwd_launch = (tiles.num_warps, tiles.num_stages, dict(SCALE_AFTER_MAX=True))  # a positive scale
  bwd_launch = (tiles.bwd_num_warps, tiles.bwd_num_stages, dict(SM_SCALE=0.125))
  kernels = (
      ("fwd", attention.scfa_fwd, *fwd_launch),
      ("dq", attention.scfa_bwd_dq, *bwd_launch),
      ("dkdv", attention.scfa_bwd_dkdv, *bwd_launch),
  )
  rows = []
  for name, kernel, warps, stages, extra in kernels:
    (block_m, block_n), _ = tiles.kernel_tiles[name]
    constexprs = dict(base, BLOCK_M=block_m, BLOCK_N=block_n, **extra)
    row = dict(variant=spec, head_dim=head_dim, hashed=hashed, kernel=name, tile=f"{block_m}x{block_n}")
    usage = resources(kernel, constexprs, warps, stages, (maxnreg or {}).get(name))
    rows.append(dict(row, warps=warps, stages=stages, **usage))
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variants", default="table", help=f"bases {list(BASES)} with +field=value overrides")
  parser.add_argument("--head_dims", default="64,128")
  parser.add_argument("--maxnreg", default="", help="register caps, e.g. dkdv:128,dq:96 (fwd, dq, dkdv)")
  parser.add_argument("--kv_heads", type=int, default=48, help="kv heads of the 48 query heads (grouped-query)")
  parser.add_argument(
      "--occupancy", default="",
      help="only print programs per SM for registers:shared_bytes:warps triples, e.g. 96:24576:4,160:41216:4",
  )  # fmt: skip
  args = parser.parse_args()
  if args.kv_heads < 1 or 48 % args.kv_heads:
    parser.error(f"--kv_heads must divide the 48 query heads, got {args.kv_heads}")
  if args.occupancy:
    triples = [item.split(":") for item in args.occupancy.split(",")]
    for fields in triples:
      if len(fields) != 3 or not all(f.isdigit() for f in fields) or int(fields[2]) == 0:
        parser.error(f"--occupancy: {':'.join(fields)!r} is not registers:shared_bytes:warps")
    print("registers shared warps programs/SM")
    for registers, shared, warps in (map(int, fields) for fields in triples):
      print(registers, shared, warps, programs_per_sm(registers, shared, warps))
    return
  maxnreg = {}
  for item in filter(None, args.maxnreg.split(",")):
    name, _, cap = item.partition(":")
    if name not in ("fwd", "dq", "dkdv") or not cap.isdigit():
      parser.error(f"--maxnreg: {item!r} is not kernel:registers with kernel in fwd, dq, dkdv")
    maxnreg[name] = int(cap)
  header = f"{'variant':40s} {'H':>3s} {'mode':4s} {'kernel':6s} {'tile':7s}"
  print(header, "warps stages registers stack shared programs/SM copies pending")
  for spec in args.variants.split(","):
    for head_dim in (int(h) for h in args.head_dims.split(",")):
      for hashed in (False, True):
        for r in kernel_rows(spec, head_dim, hashed, maxnreg, args.kv_heads):
          mode = "hash" if hashed else "qk"
          print(
              f"{spec:40s} {head_dim:3d} {mode:4s} {r['kernel']:6s} {r['tile']:7s} {r['warps']:5d} "
              f"{r['stages']:6d} {r['registers']:9d} {r['stack']:5d} {r['shared']:6d} "
              f"{r['programs_per_sm']:11d} {r['copies_pending']:14d}",
              flush=True,
          )


if __name__ == "__main__":
  main()
