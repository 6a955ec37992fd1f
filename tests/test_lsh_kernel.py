"""The LSH kernel (`kernels/lsh.py`) in Triton's CPU interpreter against the jnp
`lsh.centered_buckets`: tiles of 16 tokens, so that the test lengths cross several, odd
lengths, documents that start anywhere, padding, and bucket counts whose projections fill
part of the kernel's 16-column dot. On GPUs: test_kernels_gpu.py."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scfa_jax import lsh, nn, triton_backend
from tests.lsh_check import check_buckets
from tests.scripts import run_script

pytest.importorskip("torch", reason="the interpreter's tensors")
pytest.importorskip("triton")


def _x(key, shape, dtype=jnp.float32):
  # An offset shared by every token, as transformer activations have: what the centering removes.
  return (jax.random.normal(key, shape) + 0.7).astype(dtype)


def _documents(key, b, t, rate=0.05):
  return jnp.cumsum(jax.random.bernoulli(key, rate, (b, t)), axis=1).astype(jnp.int32)


@pytest.mark.parametrize(
    "b, t, n, h, num_buckets",
    [(2, 100, 3, 16, 8), (1, 1, 2, 16, 16), (1, 32, 1, 32, 4), (2, 97, 2, 64, 2), (1, 70, 2, 16, 40)],
)
def test_kernels_equal_the_jnp_buckets(b, t, n, h, num_buckets):
  key = jax.random.key(t + num_buckets)
  x = _x(key, (b, t, n, h))
  rotations = lsh.random_rotations(jax.random.fold_in(key, 1), n, h, num_buckets)
  got = lsh.centered_buckets(x, rotations, implementation="interpret")
  np.testing.assert_array_equal(got, lsh.centered_buckets(x, rotations, implementation="xla"))
  assert check_buckets(got, x, rotations) == 0.0


def test_documents_restart_the_mean_anywhere():
  """Starts on a tile's first row (32, 48), inside a tile, several in one tile, tiles with
  none (64-95 lie in one document), an id that comes back after another (a new document),
  and padding (negative ids)."""
  b, t, n, h = 2, 150, 2, 16
  seg = np.zeros((b, t), np.int32)
  for start in (32, 48, 53, 55, 57, 100, 131):
    seg[0, start:] += 1
  seg[0, 120:131] = 1  # id 1 again, after ids 2..5: a document of its own
  seg[1] = np.asarray(_documents(jax.random.key(3), 1, t, rate=0.1))[0]
  seg[1, 60:75] = -1
  x = _x(jax.random.key(4), (b, t, n, h))
  rotations = lsh.random_rotations(jax.random.key(5), n, h, 16)
  got = lsh.centered_buckets(x, rotations, jnp.asarray(seg), implementation="interpret")
  np.testing.assert_array_equal(got, lsh.centered_buckets(x, rotations, jnp.asarray(seg), implementation="xla"))
  # The interpreter runs programs one by one, so each finds its predecessor's inclusive sum:
  # published without it, every look-back walks over the tiles' own sums, as on a GPU.
  walking = triton_backend.LshTiles(block_t=16, publish_inclusive=False)
  for s in (None, jnp.asarray(seg)):
    walked = triton_backend.centered_buckets("interpret", x, rotations, s, jnp.uint8, walking)
    np.testing.assert_array_equal(walked, lsh.centered_buckets(x, rotations, s, implementation="xla"))
  # A document's buckets do not depend on what comes before it.
  alone = lsh.centered_buckets(x[:1, 57:100], rotations, implementation="interpret")
  np.testing.assert_array_equal(got[:1, 57:100], alone)


def test_float16_inputs_and_the_layer_take_the_kernels(monkeypatch):
  x = _x(jax.random.key(6), (2, 45, 2, 32), jnp.float16)
  rotations = lsh.random_rotations(jax.random.key(7), 2, 32, 8)
  seg = _documents(jax.random.key(8), 2, 45, rate=0.1)
  check_buckets(lsh.centered_buckets(x, rotations, seg, implementation="interpret"), x, rotations, seg)

  launches = []
  kernels = triton_backend.centered_buckets
  monkeypatch.setattr(triton_backend, "centered_buckets", lambda *a, **kw: launches.append(a[0]) or kernels(*a, **kw))
  x = jax.random.normal(jax.random.key(9), (2, 24, 32))
  seg = _documents(jax.random.key(10), 2, 24, rate=0.1)
  layers = {
      impl: nn.SparseCausalSelfAttention(width=32, num_heads=2, num_buckets=8, implementation=impl, rngs=nnx.Rngs(0))
      for impl in ("interpret", "xla")
  }
  outs = {impl: layer(x, segment_ids=seg, rngs=jax.random.key(11)) for impl, layer in layers.items()}
  assert launches == ["interpret"]
  np.testing.assert_allclose(outs["interpret"], outs["xla"], rtol=1e-5, atol=1e-6)
  # Gradients pass the layer (the buckets take none, the kernel has no JVP rule).
  grad = jax.grad(lambda x: jnp.sum(layers["interpret"](x, rngs=jax.random.key(11)) ** 2))(x)
  assert grad.shape == x.shape and bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).max()) > 0


def test_bad_inputs_name_the_argument():
  x = _x(jax.random.key(0), (1, 20, 2, 16))
  rotations = lsh.random_rotations(jax.random.key(1), 2, 16, 4)
  with pytest.raises(TypeError, match="segment_ids must hold integers"):
    lsh.centered_buckets(x, rotations, jnp.zeros((1, 20)), implementation="interpret")
  with pytest.raises(ValueError, match=r"segment_ids must have shape \[B, T\]"):
    lsh.centered_buckets(x, rotations, jnp.zeros((1, 19), jnp.int32), implementation="interpret")
  with pytest.raises(ValueError, match="implementation='interpret' takes float32 or float16"):
    lsh.centered_buckets(x.astype(jnp.bfloat16), rotations, implementation="interpret")
  with pytest.raises(ValueError, match="implementation must be one of"):
    lsh.centered_buckets(x, rotations, implementation="cuda")


def test_bench_lsh_runs_and_records_agreement(tmp_path):
  """experiments/bench_lsh.py end to end on the CPU: the interpreter against XLA, with and
  without document ids, and an extra tile setting."""
  out = tmp_path / "lsh.json"
  run_script(
      "bench_lsh.py", "--cases=40x2", "--heads=2", "--head_dim=16", "--layers=2", "--dtype=float32",
      "--implementations=xla,interpret", "--documents", "--rep_ms=1", f"--out={out}",
  )  # fmt: skip
  rows = json.loads(out.read_text())["rows"]
  assert [(r["documents"], r["variant"]) for r in rows] == [
      (False, "xla"), (False, "interpret"), (True, "xla"), (True, "interpret")
  ]
  assert all(r["agreement"] == 1.0 for r in rows if r["variant"] == "interpret")
  assert all(r["ms_per_layer"] > 0 for r in rows)


def test_empty_sequence_launches_nothing(monkeypatch):
  x = jnp.zeros((2, 0, 2, 16))
  rotations = lsh.random_rotations(jax.random.key(0), 2, 16, 4)
  monkeypatch.setattr(triton_backend, "_launch", lambda *a, **kw: pytest.fail("launched a kernel for T=0"))
  out = lsh.centered_buckets(x, rotations, jnp.zeros((2, 0), jnp.int32), implementation="interpret")
  assert out.shape == (2, 0, 2) and out.dtype == jnp.uint8
