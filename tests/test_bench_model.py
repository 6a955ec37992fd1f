"""experiments/bench_model.py: its baselines compute what they claim (the timings need a GPU)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from tests.scripts import load_script, run_script

bench = load_script("bench_model.py")
TOKENS = np.random.default_rng(0).integers(0, 257, size=4096, dtype=np.uint16)


def test_no_attention_layers_return_v_projected():
  """The ceiling's layers must skip attention whatever path the layer's call takes."""
  def layer(mode):
    step = bench.make_step(mode, 32, 2, 10, TOKENS, remat=False, preset_name="cpu_tiny", positions="rope")
    return step.trainer.model().blocks[0].attn

  attn = layer("no_attention")
  x = jax.random.normal(jax.random.key(0), (2, 32, attn.wq.shape[0]))
  _, _, v = attn._project(x, jnp.arange(32))
  np.testing.assert_array_equal(attn(x), attn._out(v))
  assert not np.allclose(layer("dense")(x), attn._out(v), atol=1e-3)


def test_smoke_run_writes_rows_with_ratios(tmp_path):
  out = tmp_path / "bench.json"
  run_script(
      "bench_model.py", "--preset=cpu_tiny", "--cases=32x2", "--modes=dense,hash16,no_attention,plain_dense",
      "--steps=1", "--warmup=1", f"--out={out}",
  )  # fmt: skip
  rows = {row["mode"]: row for row in json.loads(out.read_text())["results"]}
  assert set(rows) == {"dense", "hash16", "no_attention", "plain_dense"}
  assert rows["dense"]["speedup_vs_dense"] == 1.0
  assert rows["hash16"]["buckets"]["pair_share"] > 0
  for row in rows.values():
    assert row["step_ms"] > 0 and np.isfinite(row["losses"]).all()
