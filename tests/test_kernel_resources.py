"""The tile table's switches, and experiments/kernel_resources.py's occupancy rule (the sm_90
limits it names), run as a script."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.scripts import run_script

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "kernel_resources.py"

OCCUPANCY = [  # registers, shared bytes, warps per program; programs per SM
    (96, 24576, 4, 5),  # registers: 96 x 128 threads = 12288 per program
    (160, 41216, 4, 3),  # 160 rounds to 5120 per warp
    (152, 41728, 4, 3),
    (128, 24576, 4, 4),
    (100, 0, 4, 4),  # 3200 registers per warp round up to 3328: 4, not 5
    (24, 0, 4, 16),  # 64 warps per SM (registers alone would allow 21)
    (32, 0, 1, 32),  # 32 programs per SM (registers and warps alone would allow 64)
    (64, 100 * 1024, 4, 2),  # shared memory, with 1 KiB reserved per program
    (216, 98816, 8, 1),
]


def test_programs_per_sm():
  triples = ",".join(f"{r}:{s}:{w}" for r, s, w, _ in OCCUPANCY)
  done = subprocess.run(
      [sys.executable, str(SCRIPT), f"--occupancy={triples}"], capture_output=True, text=True, timeout=300
  )
  assert done.returncode == 0, done.stderr
  printed = [tuple(map(int, line.split())) for line in done.stdout.splitlines()[1:]]
  assert printed == OCCUPANCY


def test_each_switch_sets_its_own_constexpr():
  """KernelConfig.switches, which the launchers and kernel_resources.py's builds share:
  flipping one field flips exactly its constexpr."""
  import dataclasses  # noqa: PLC0415

  from scfa_jax import triton_backend  # noqa: PLC0415

  table = triton_backend.kernel_config("triton", 64, False)
  base = table.switches
  fields = {"one_loop": "ONE_LOOP", "skip_empty_tiles": "SKIP_EMPTY", "prefetch_rows": "PREFETCH"}
  assert set(base) == set(fields.values())
  for field, constexpr in fields.items():
    flipped = dataclasses.replace(table, **{field: not getattr(table, field)}).switches
    assert {name for name in base if flipped[name] != base[name]} == {constexpr}, field


def test_every_switch_takes_both_values_in_the_tile_table():
  """A switch that no table entry turns is dead code in the kernels: the table must use both
  settings of each one (on GPUs or in the interpreter)."""
  import dataclasses  # noqa: PLC0415

  from scfa_jax import triton_backend  # noqa: PLC0415

  entries = [*triton_backend._GPU_CONFIGS.values(), *triton_backend._INTERPRET_CONFIGS.values()]
  switches = [f.name for f in dataclasses.fields(triton_backend.KernelConfig) if f.type in (bool, "bool")]
  assert switches == ["one_loop", "skip_empty_tiles", "prefetch_rows", "row_ranges"]
  for name in switches:
    assert {getattr(entry, name) for entry in entries} == {False, True}, name


def test_grouped_qk_dkdv_tiles_do_not_spill():
  """Grouped-query QK mode takes its own dK/dV tile where the table's spills registers to the
  stack (the loop over a group's query heads keeps more values live): its sm_90 build has
  no stack. Builds with the ptxas that Triton ships, in a fresh process: in a test worker
  that had run interpreter tests, an in-process build failed inside Triton's interpreter
  builder. No GPU."""
  pytest.importorskip("triton")
  done = run_script("kernel_resources.py", "--kv_heads=8", "--head_dims=64,128")
  stacks = {}
  for line in done.stdout.splitlines():
    fields = line.split()
    if fields[2:4] == ["qk", "dkdv"]:  # variant H mode kernel tile warps stages registers stack ...
      stacks[int(fields[1])] = int(fields[8])
  assert stacks == {64: 0, 128: 0}, done.stdout
