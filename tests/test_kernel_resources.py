"""experiments/kernel_resources.py's occupancy rule (the sm_90 limits it names)."""

import pytest

from experiments.kernel_resources import programs_per_sm


@pytest.mark.parametrize(
    ("registers", "shared", "warps", "expected"),
    [
        (96, 24576, 4, 5),  # registers: 96 x 128 threads = 12288 per program
        (160, 41216, 4, 3),  # 160 rounds to 5120 per warp
        (152, 41728, 4, 3),
        (128, 24576, 4, 4),
        (100, 0, 4, 4),  # 3200 registers per warp round up to 3328: 4, not 5
        (24, 0, 4, 16),  # 64 warps per SM (registers alone would allow 21)
        (32, 0, 1, 32),  # 32 programs per SM (registers and warps alone would allow 64)
        (64, 100 * 1024, 4, 2),  # shared memory, with 1 KiB reserved per program
        (216, 98816, 8, 1),
    ],
)
def test_programs_per_sm(registers, shared, warps, expected):
  assert programs_per_sm(registers, shared, warps) == expected
