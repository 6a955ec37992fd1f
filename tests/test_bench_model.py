"""experiments/bench_model.py: its baselines compute what they claim (the timings need a GPU)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from tests.scripts import load_script, run_script

bench = load_script("bench_model.py")
TOKENS = np.random.default_rng(0).integers(0, 257, size=4096, dtype=np.uint16)


def _step(mode):
  return bench.make_step(mode, 32, 2, 10, TOKENS, remat=False, preset_name="cpu_tiny", positions="rope")


def test_no_attention_layers_skip_attention_and_read_q_k_v():
  """The ceiling's layers must skip attention whatever path the layer's call takes."""
  attn = _step("no_attention").trainer.model().blocks[0].attn
  x = jax.random.normal(jax.random.key(0), (2, 32, attn.wq.shape[0]))
  q, k, v = attn._project(x, jnp.arange(32))
  np.testing.assert_array_equal(attn(x), attn._out(q + k + v))
  dense = _step("dense").trainer.model().blocks[0].attn
  assert not np.allclose(dense(x), attn._out(q + k + v), atol=1e-3)


def test_no_attention_step_keeps_the_query_projection():
  """A free attention core still needs its inputs: the compiled no-attention step does every
  matmul of the q/k/v projections that the dense step does (with out = v, XLA dropped the
  query projection, forward and backward, as dead code)."""

  def projection_dots(mode):
    hlo = _step(mode).compiled().as_text()
    return sum(" dot(" in line and "qkv_projection" in line for line in hlo.splitlines())

  assert projection_dots("no_attention") == projection_dots("dense") > 0


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


def test_bench_cross_entropy_times_both_losses_and_they_agree(tmp_path):
  """experiments/bench_cross_entropy.py on a tiny shape: both losses timed and equal to bf16
  rounding of the logits (the timings themselves need a GPU)."""
  out = tmp_path / "ce.json"
  run_script(
      "bench_cross_entropy.py", "--batch=1", "--seq_len=16", "--width=32", "--vocab_size=64", f"--out={out}"
  )  # fmt: skip
  result = json.loads(out.read_text())
  old, fused = result["f32_logits_optax"], result["tied_cross_entropy"]
  assert old["ms"] > 0 and fused["ms"] > 0
  np.testing.assert_allclose(fused["loss"], old["loss"], rtol=1e-2)
  assert result["versions"]["commit"]
