"""experiments/plan_efficiency.py, run as a script: its count of allowed pairs against a dense
mask, and the tiles it reports for a case small enough to count by hand."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "plan_efficiency.py"


def run(*args: str) -> str:
  done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  return done.stdout


def test_allowed_pairs_match_a_dense_mask():
  # 77 tokens: not a multiple of any tile, so padding slots are in every plan.
  out = run("--seq_len=77", "--batch=2", "--heads=3", "--cases=hash4,drop40", "--check")
  assert out.count("checked against the dense mask") == 2


def test_all_kept_plans_visit_the_causal_tiles(tmp_path):
  t = 256
  path = tmp_path / "plan_efficiency.json"
  run(f"--seq_len={t}", "--batch=1", "--heads=1", "--cases=all", "--head_dim=64", f"--out={path}")
  rows = {r["kernel"]: r for r in json.loads(path.read_text())["rows"]}
  # The forward's 128x64 tiles: 2 query tiles visiting 2 and 4 key tiles, the diagonal ones masked.
  assert rows["fwd"]["tiles_per_head"] == 6
  assert rows["fwd"]["pair_efficiency"] == pytest.approx(t * (t + 1) / 2 / (6 * 128 * 64))
  assert all(0.0 < r["masked_share"] < 1.0 for r in rows.values())
