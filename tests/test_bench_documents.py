"""experiments/bench_attention.py --documents: the packed rows it draws, cuDNN's packed layout
of them, and its cases against the dense masked reference (XLA here; the timings need a GPU)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.scripts import load_script

bench = load_script("bench_attention.py")


@pytest.mark.parametrize("t, doc_min, doc_max", [(512, 512, 8192), (32768, 512, 8192), (4000, 7, 300)])
def test_document_lengths(t, doc_min, doc_max):
  rows = bench.document_lengths(t, 4, doc_min=doc_min, doc_max=doc_max, seed=3)
  assert len(rows) == 4
  for row in rows:
    assert sum(row) == t
    assert all(doc_min <= n <= doc_max for n in row[:-1])  # only the last one is cut
    assert 1 <= row[-1] <= doc_max
  assert rows == bench.document_lengths(t, 4, doc_min=doc_min, doc_max=doc_max, seed=3)
  assert rows[:2] == bench.document_lengths(t, 2, doc_min=doc_min, doc_max=doc_max, seed=3)
  if t > doc_max:
    assert rows != bench.document_lengths(t, 4, doc_min=doc_min, doc_max=doc_max, seed=4)


def test_document_lengths_are_log_uniform():
  """As many documents per octave: with [8, 128], about a quarter of them in each of 4 octaves."""
  lengths = np.concatenate([row[:-1] for row in bench.document_lengths(2 * 10**5, 4, doc_min=8, doc_max=128)])
  octaves = np.histogram(np.log2(lengths), bins=[3, 4, 5, 6, 7.01])[0] / len(lengths)
  np.testing.assert_allclose(octaves, 0.25, atol=0.03)


def test_segment_ids_and_packed_offsets():
  lengths = [[5, 3, 8], [16], [1, 1, 14]]
  seg = bench.segment_ids(lengths)
  assert seg.shape == (3, 16) and seg.dtype == np.int32
  np.testing.assert_array_equal(seg[0], [0] * 5 + [1] * 3 + [2] * 8)
  seqlens, offsets = bench.packed_offsets(lengths)
  np.testing.assert_array_equal(seqlens, [[5, 3, 8], [16, -1, -1], [1, 1, 14]])
  np.testing.assert_array_equal(offsets, [[0, 5, 8, -1], [0, -1, -1, -1], [0, 1, 2, -1]])
  # A batch of one document per row still takes the packed layout (M >= 2).
  seqlens, offsets = bench.packed_offsets([[16], [16]])
  assert seqlens.shape == (2, 2) and offsets.shape == (2, 3)


def _packed_batch(b=2, t=80, n=4, kv_heads=2, h=16):
  """q [B, T, N, H], k and v [B, T, K, H] (grouped-query, K = N / 2) and segment ids of packed rows."""
  seg = jnp.asarray(bench.segment_ids(bench.document_lengths(t, b, doc_min=6, doc_max=40, seed=1)))
  rng = np.random.default_rng(0)  # numpy: jax.random would compile on first use, seconds on a CPU
  q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((b, t, kv_heads, h)), jnp.float32) for _ in range(2))
  return q, k, v, seg


def test_packed_all_matches_dense_masked_reference():
  """The "all" case with segment ids is causal attention within documents: that of the masked
  dense baseline (jax.nn.dot_product_attention under the [B, 1, T, T] mask it builds), on XLA."""
  q, k, v, seg = _packed_batch()
  (b, t, n, _), kv_heads = q.shape, k.shape[2]
  fn, qm, km, _ = bench.make_case("all", b, t, n, seed=t, kv_heads=kv_heads)
  out = jax.jit(fn)(q, k, v, qm, km, seg, seg)
  dense = jax.jit(bench.dense_attention("masked", implementation="xla"))(q, k, v, seg, seg)
  np.testing.assert_allclose(out, dense, atol=2e-5, rtol=2e-5)
  assert bench.max_abs_diff(out, dense) < 2e-5


@pytest.mark.parametrize(
    "name, function", [("hash16", "hash_sparse_attention"), ("drop50", "qk_sparse_attention")]
)
def test_cases_pass_segment_ids(name, function, monkeypatch):
  """Every case hands trailing segment ids to its public function (whose packed-document results
  tests/test_segments.py checks), and none without them."""
  calls = []
  monkeypatch.setattr(bench.scfa_jax, function, lambda q, k, v, **kw: calls.append(kw) or q)
  fn = bench.case_function(name)
  q_seg, k_seg = np.zeros((1, 8), np.int32), np.ones((1, 8), np.int32)
  fn(None, None, None, "q masks", "k masks", q_seg, k_seg)
  fn(None, None, None, "q masks", "k masks")
  assert calls[0]["q_segment_ids"] is q_seg and calls[0]["k_segment_ids"] is k_seg
  assert "q masks" in calls[0].values() and "k masks" in calls[1].values()
  assert not {"q_segment_ids", "k_segment_ids"} & set(calls[1])


def test_plot_of_a_packed_file(tmp_path):
  """A packed-document file, where the packed layout ran at one T and failed at the other."""
  pytest.importorskip("matplotlib")
  rows = []
  for t, packed in ((1024, True), (2048, False)):
    for case in ("all", "hash16"):
      row = dict(T=t, case=case, fwd_bwd_ms=1.0, cudnn_fwd_bwd_ms=2.0, speedup_fwd_bwd=2.0)
      row.update(cudnn_masked_fwd_bwd_ms=3.0, speedup_masked_fwd_bwd=3.0)
      row.update(dict(cudnn_packed_fwd_bwd_ms=1.5, speedup_packed_fwd_bwd=1.5) if packed else
                 dict(cudnn_packed_error="RuntimeError: cuDNN is not detected."))  # fmt: skip
      rows.append(row)
  result = dict(
      versions=dict(device="test"), batch=1, heads=2, kv_heads=1, head_dim=16, dtype="bfloat16",
      documents=dict(kind="mixed", doc_min=512, doc_max=8192), rows=rows,
  )  # fmt: skip
  path = tmp_path / "bench.json"
  path.write_text(json.dumps(result))
  assert (tmp_path / "bench.png").samefile(bench.plot(str(path)))
