"""Segment ids (packed documents) in both modes, against the dense masked reference:
XLA (long documents), the interpreter (short ones) and, with pytest -m gpu, the Triton kernels."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scfa_jax
from scfa_jax import plan as plan_lib
from scfa_jax import reference, sorting
from tests.test_attention_xla import _buckets, _close, _qkv

H = 16


def segments_of(lengths, batch: int = 1) -> jax.Array:
  """int32 [batch, sum(lengths)]: document i's tokens hold id i; a negative length gives a
  padding run (id -1). Row r shifts the ids by 10 * r, so rows do not share ids."""
  ids = np.concatenate([np.full(abs(n), i if n > 0 else -1) for i, n in enumerate(lengths)])
  rows = [np.where(ids >= 0, ids + 10 * r, -1) for r in range(batch)]
  return jnp.asarray(np.stack(rows), jnp.int32)


def _hash_kw(key, q_seg, k_seg, n, num_buckets, dtype, strict):
  b, t = q_seg.shape
  s = k_seg.shape[1]
  return dict(
      q_buckets=_buckets(jax.random.fold_in(key, 1), (b, t, n), num_buckets).astype(dtype),
      k_buckets=_buckets(jax.random.fold_in(key, 2), (b, s, n), num_buckets).astype(dtype),
      q_segment_ids=q_seg, k_segment_ids=k_seg, strict=strict,
  )  # fmt: skip


def _qk_kw(key, q_seg, k_seg, n, drop_rate):
  b, t = q_seg.shape
  s = k_seg.shape[1]
  return dict(
      q_keep=jax.random.bernoulli(jax.random.fold_in(key, 1), 1 - drop_rate, (b, t, n)),
      k_keep=jax.random.bernoulli(jax.random.fold_in(key, 2), 1 - drop_rate, (b, s, n)),
      q_segment_ids=q_seg, k_segment_ids=k_seg,
  )  # fmt: skip


@functools.partial(jax.jit, static_argnums=0)
def _out_and_grads(fn, q, k, v, ct, kw):
  out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **kw), q, k, v)
  return out, vjp(ct.astype(out.dtype))


def _check_cases(mode, impl, cases, key, *, strict=False, n=2, dtype=jnp.float32):
  """Outputs and q, k, v gradients against the reference, for each of `cases` (dicts of
  segment ids and masks or buckets, all of one shape: one compilation for them all)."""
  fn, ref = (
      (scfa_jax.hash_sparse_attention, reference.hash_sparse_attention) if mode == "hash" else
      (scfa_jax.qk_sparse_attention, reference.qk_sparse_attention)
  )  # fmt: skip
  extra = dict(strict=strict) if mode == "hash" else {}
  ours = functools.partial(fn, implementation=impl, **extra)
  oracle = functools.partial(ref, **extra)
  for kw in cases:
    kw = {name: x for name, x in kw.items() if name != "strict"}
    (b, t), s = kw["q_segment_ids"].shape, kw["k_segment_ids"].shape[1]
    q, k, v = _qkv(key, b, t, s, n, H, dtype)
    ct = jax.random.normal(jax.random.fold_in(key, 3), q.shape)
    out, grads = _out_and_grads(ours, q, k, v, ct, kw)
    want, want_grads = _out_and_grads(oracle, q, k, v, ct, kw)
    _close(out, want, dtype)
    for got, expected in zip(grads, want_grads, strict=True):
      assert bool(jnp.all(jnp.isfinite(got)))
      _close(got, expected, dtype, factor=2.0)


# Documents of 1, 7 and 128 tokens among others, 160 tokens in all (one compilation);
# a negative length is a padding run.
DOCS = [(1, 7, 128, 24), (7, 1, 1, 128, 23), (128, 7, -20, 1, 4)]


# uint8 buckets take the packed key, int32 ones the joint rank of (segment, bucket).
@pytest.mark.parametrize("strict, bucket_dtype", [(False, jnp.uint8), (True, jnp.int32)])
def test_hash_xla(strict, bucket_dtype):
  key = jax.random.PRNGKey(1 + strict)
  cases = []
  for i, docs in enumerate(DOCS):
    seg = segments_of(docs, batch=2)
    cases.append(_hash_kw(jax.random.fold_in(key, i), seg, seg, 2, 3, bucket_dtype, strict))
  _check_cases("hash", "xla", cases, key, strict=strict)


def test_qk_drop_xla():
  key = jax.random.PRNGKey(5)
  cases = []
  for i, docs in enumerate(DOCS):
    seg = segments_of(docs, batch=2)
    cases += [_qk_kw(jax.random.fold_in(key, i), seg, seg, 2, rate) for rate in (0.0, 0.4)]
  _check_cases("qk", "xla", cases, key)


def test_long_document_xla():
  key = jax.random.PRNGKey(7)
  seg = segments_of((1, 7, 3000, 128, 1))
  _check_cases("hash", "xla", [_hash_kw(key, seg, seg, 1, 4, jnp.uint8, True)], key, strict=True, n=1)


@pytest.mark.parametrize("mode", ["hash", "qk"])
def test_one_array_for_both_sides(mode):
  """One bucket (or keep) array and one segment-id array for both sides are sorted once
  (`SortedTokens.shared`), down to a single token."""
  key = jax.random.PRNGKey(11)
  for docs in [(1,), (3, -2, 4)]:
    seg = segments_of(docs)
    t = seg.shape[1]
    q, k, v = _qkv(jax.random.fold_in(key, t), 1, t, t, 2, H)
    if mode == "hash":
      masks = _buckets(key, (1, t, 2), 2).astype(jnp.uint8)
      kw = dict(q_buckets=masks, k_buckets=masks, q_segment_ids=seg, k_segment_ids=seg, strict=True)
      fn, ref, sort = scfa_jax.hash_sparse_attention, reference.hash_sparse_attention, sorting.by_bucket
    else:
      masks = jax.random.bernoulli(key, 0.7, (1, t, 2))
      kw = dict(q_keep=masks, k_keep=masks, q_segment_ids=seg, k_segment_ids=seg)
      fn, ref, sort = scfa_jax.qk_sparse_attention, reference.qk_sparse_attention, sorting.by_keep_mask
    assert sort(masks, masks, seg, seg).shared
    ct = jax.random.normal(key, q.shape)
    # The masks are closed over, not passed: jit's arguments would be two arrays.
    out, grads = _out_and_grads(functools.partial(fn, **kw, implementation="xla"), q, k, v, ct, {})
    want, want_grads = _out_and_grads(functools.partial(ref, **kw), q, k, v, ct, {})
    _close(out, want, jnp.float32)
    for got, expected in zip(grads, want_grads, strict=True):
      _close(got, expected, jnp.float32, factor=2.0)


@pytest.mark.parametrize("mode", ["hash", "qk"])
def test_t_differs_from_s(mode):
  """Queries and keys with their own segment ids (ids shared between the sides, some only on one)."""
  key = jax.random.PRNGKey(8)
  q_seg = jnp.asarray([[0] * 20 + [1] * 11 + [3] * 9], jnp.int32)
  k_seg = jnp.asarray([[0] * 30 + [2] * 10 + [1] * 27 + [-1] * 3], jnp.int32)
  if mode == "hash":
    kw = _hash_kw(key, q_seg, k_seg, 2, 2, jnp.uint8, False)
  else:
    kw = _qk_kw(key, q_seg, k_seg, 2, 0.2)
  _check_cases(mode, "xla", [kw], key)


def test_segment_ids_join_the_mask():
  """The reference itself: a query never sees another document; a lone token sees nothing
  under strict causality and only itself otherwise."""
  seg = segments_of((5, 1, 6))
  pos = jnp.broadcast_to(jnp.arange(12)[None, :, None], (1, 12, 1))
  mask = reference.allowed_mask(pos, pos, q_segment_ids=seg, k_segment_ids=seg)[0, 0]
  expected = np.tril(np.ones((12, 12), bool)) & (np.asarray(seg[0])[:, None] == np.asarray(seg[0])[None, :])
  np.testing.assert_array_equal(mask, expected)
  q, k, v = _qkv(jax.random.PRNGKey(0), 1, 12, 12, 1, H)
  buckets = jnp.zeros((1, 12, 1), jnp.uint8)
  out = jax.jit(lambda q, k, v: scfa_jax.hash_sparse_attention(
      q, k, v, q_buckets=buckets, k_buckets=buckets, q_segment_ids=seg, k_segment_ids=seg, strict=True,
      implementation="xla",
  ))(q, k, v)  # fmt: skip
  assert np.all(np.asarray(out[0, 5]) == 0.0) and np.all(np.asarray(out[0, 0]) == 0.0)
  assert np.all(np.asarray(out[0, 6]) == 0.0)  # the first token of the third document
  assert np.all(np.asarray(out[0, 7]) != 0.0)


def test_one_segment_equals_no_segments():
  """One segment sorts, plans and computes as no segments: bitwise in hash mode (the key is
  the bucket), to rounding in QK mode (its kernels then take the hashed path)."""
  key = jax.random.PRNGKey(9)
  b, t, n = 2, 75, 2
  q, k, v = _qkv(key, b, t, t, n, H)
  seg = jnp.full((b, t), 3, jnp.int32)
  buckets = _buckets(key, (b, t, n), 3).astype(jnp.uint8)
  keep = jax.random.bernoulli(key, 0.6, (b, t, n))

  @jax.jit
  def both(q, k, v, buckets, keep, seg):
    hashed = functools.partial(scfa_jax.hash_sparse_attention, q, k, v, q_buckets=buckets, k_buckets=buckets,
                               strict=True, implementation="xla")  # fmt: skip
    qk = functools.partial(scfa_jax.qk_sparse_attention, q, k, v, q_keep=keep, k_keep=keep,
                           implementation="xla")  # fmt: skip
    segments = dict(q_segment_ids=seg, k_segment_ids=seg)
    return hashed(), hashed(**segments), qk(), qk(**segments)

  hashed, hashed_seg, qk, qk_seg = both(q, k, v, buckets, keep, seg)
  np.testing.assert_array_equal(hashed, hashed_seg)
  np.testing.assert_allclose(qk, qk_seg, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("mode", ["hash", "qk"])
def test_padding_rows_are_zero_with_zero_gradients(mode):
  key = jax.random.PRNGKey(10)
  n = 2
  fn = scfa_jax.hash_sparse_attention if mode == "hash" else scfa_jax.qk_sparse_attention
  fn = functools.partial(fn, implementation="xla")
  for seg in (segments_of((-3, 30, -1, 20, -6)), segments_of((-60,))):  # some padding; all padding
    b, t = seg.shape
    q, k, v = _qkv(key, b, t, t, n, H)
    kw = _hash_kw(key, seg, seg, n, 2, jnp.uint8, False) if mode == "hash" else _qk_kw(key, seg, seg, n, 0.0)
    if mode == "hash":
      kw["k_buckets"] = kw["q_buckets"]  # so that every real query may attend itself
    kw.pop("strict", None)
    out, grads = _out_and_grads(fn, q, k, v, jax.random.normal(key, q.shape), kw)
    pad = np.asarray(seg[0] < 0)
    for x in (out, *grads):
      assert bool(jnp.all(jnp.isfinite(x)))
      assert np.all(np.asarray(x)[0, pad] == 0.0)
    assert np.all(np.any(np.asarray(out)[0, ~pad] != 0.0, axis=-1))  # every real row sees itself


@pytest.mark.parametrize("mode", ["hash", "qk"])
def test_plan_skips_tiles_across_documents(mode):
  """The tiles the plan visits fall with the number of documents: documents are separate
  runs of the sort order, not masked pairs."""
  b, t, n = 1, 1024, 2
  buckets = _buckets(jax.random.PRNGKey(0), (b, t, n), 2).astype(jnp.uint8)
  keep = jnp.ones((b, t, n), bool)

  @jax.jit
  def visited_tiles(seg):
    tokens = (
        sorting.by_bucket(buckets, buckets, seg, seg) if mode == "hash" else
        sorting.by_keep_mask(keep, keep, seg, seg)
    )  # fmt: skip
    plan = plan_lib.make_plan(tokens, block_q=16, block_k=16, strict=False)
    return jnp.sum(plan.end_n - plan.start_n)

  documents = lambda count: jnp.repeat(jnp.arange(count, dtype=jnp.int32), t // count)[None]
  visited = [int(visited_tiles(documents(count))) for count in (1, 4, 16)]
  # 4x fewer pairs per step; the tiles that cut across bucket runs stay
  assert visited[0] > 3 * visited[1] > 6 * visited[2] > 0, visited


B, T, S, N = 2, 10, 12, 3


def _call(mode, **kw):
  q, k, v = jnp.zeros((B, T, N, H)), jnp.zeros((B, S, N, H)), jnp.zeros((B, S, N, H))
  if mode == "hash":
    base = dict(q_buckets=jnp.zeros((B, T, N), jnp.int32), k_buckets=jnp.zeros((B, S, N), jnp.int32))
    return scfa_jax.hash_sparse_attention(q, k, v, **base, **kw, implementation="xla")
  base = dict(q_keep=jnp.ones((B, T, N), bool), k_keep=jnp.ones((B, S, N), bool))
  return scfa_jax.qk_sparse_attention(q, k, v, **base, **kw, implementation="xla")


@pytest.mark.parametrize("mode", ["hash", "qk"])
@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(q_segment_ids=jnp.zeros((B, T), jnp.int32)), ValueError, "q_segment_ids and k_segment_ids"),
        (dict(k_segment_ids=jnp.zeros((B, S), jnp.int32)), ValueError, "q_segment_ids and k_segment_ids"),
        (dict(q_segment_ids=jnp.zeros((B, T, N), jnp.int32), k_segment_ids=jnp.zeros((B, S), jnp.int32)),
         ValueError, r"q_segment_ids must have shape \[B, T\] = \(2, 10\)"),
        (dict(q_segment_ids=jnp.zeros((B, T), jnp.int32), k_segment_ids=jnp.zeros((B, T), jnp.int32)),
         ValueError, r"k_segment_ids must have shape \[B, S\] = \(2, 12\)"),
        (dict(q_segment_ids=jnp.zeros((B, T)), k_segment_ids=jnp.zeros((B, S), jnp.int32)),
         TypeError, "q_segment_ids must hold integers"),
        (dict(q_segment_ids=jnp.zeros((B, T), jnp.int32), k_segment_ids=jnp.zeros((B, S), bool)),
         TypeError, "k_segment_ids must hold integers"),
        (dict(q_segment_ids=[[0] * T] * B, k_segment_ids=jnp.zeros((B, S), jnp.int32)),
         TypeError, "q_segment_ids must be an array"),
    ],
)  # fmt: skip
def test_bad_segment_ids(mode, kw, error, match):
  with pytest.raises(error, match=match):
    _call(mode, **kw)


# ----------------------------------------------------------------------------- interpreter

INTERPRET_DOCS = (1, 7, 128, -5, 3)  # 144 tokens: several 16- and 32-row tiles per document


@pytest.mark.parametrize("mode, strict", [("hash", False), ("hash", True), ("qk", False)])
def test_interpret(mode, strict):
  pytest.importorskip("torch", reason="the interpreter's tensors")
  pytest.importorskip("triton")
  key = jax.random.PRNGKey(13)
  seg = segments_of(INTERPRET_DOCS)
  if mode == "hash":  # strict: ranked keys (int32 buckets); else packed keys (uint8)
    kw = _hash_kw(key, seg, seg, 1, 3, jnp.int32 if strict else jnp.uint8, strict)
  else:
    kw = _qk_kw(key, seg, seg, 1, 0.3)
  _check_cases(mode, "interpret", [kw], key, strict=strict, n=1)


# ----------------------------------------------------------------------------- GPU (pytest -m gpu)

needs_gpu = pytest.mark.skipif(
    jax.default_backend() != "gpu" or os.environ.get("TRITON_INTERPRET") == "1", reason="needs a CUDA GPU"
)
REL_TOL = {jnp.float32: 1e-5, jnp.float16: 2e-3, jnp.bfloat16: 1.6e-2}  # as test_kernels_gpu.py


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


GPU_CASES = [
    # (dtype, H, documents, mode, bucket dtype or drop rate, strict)
    (jnp.bfloat16, 64, (1, 7, 128, 3000, 961), "hash", jnp.uint8, True),
    (jnp.bfloat16, 64, (1, 7, 128, -64, 3000, 897), "hash", jnp.int32, False),
    (jnp.float16, 128, (1, 7, 128, 3000, 961), "hash", jnp.uint8, False),
    (jnp.bfloat16, 64, (1, 7, 128, 3000, 961), "qk", 0.0, False),
    (jnp.bfloat16, 64, (3, -10, 1, 7, 128, 3000, 948), "qk", 0.5, False),
    (jnp.float32, 128, (1, 7, 128, 123), "qk", 0.3, False),
    (jnp.bfloat16, 32, (513,) * 7 + (1,), "hash", jnp.uint8, True),
]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype, h, docs, mode, param, strict", GPU_CASES)
def test_gpu_against_float32_reference(dtype, h, docs, mode, param, strict):
  key = jax.random.PRNGKey(sum(docs) + h)
  seg = segments_of(docs, batch=2)
  b, t = seg.shape
  n = 3
  q, k, v = _qkv(key, b, t, t, n, h, dtype)
  if mode == "hash":
    kw = _hash_kw(key, seg, seg, n, 8, param, strict)
    ours, oracle = scfa_jax.hash_sparse_attention, reference.hash_sparse_attention
  else:
    kw = _qk_kw(key, seg, seg, n, param)
    ours, oracle = scfa_jax.qk_sparse_attention, reference.qk_sparse_attention

  def out_and_grads(fn, q, k, v, ct):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(ct.astype(out.dtype))

  ct = jax.random.normal(jax.random.fold_in(key, 10), q.shape, jnp.float32)
  run = functools.partial(out_and_grads, functools.partial(ours, **kw, implementation="triton"))
  out, grads = jax.jit(run)(q, k, v, ct)
  up = lambda x: x.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    ref_out, ref_grads = jax.jit(functools.partial(out_and_grads, functools.partial(oracle, **kw)))(
        up(q), up(k), up(v), ct
    )
  assert out.dtype == dtype
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in (out, *grads))
  pad = np.asarray(seg < 0)
  assert np.all(np.asarray(out, np.float32)[pad] == 0.0)
  tol = REL_TOL[dtype]
  assert _rel(out, ref_out) < tol
  for name, got, want in zip("qkv", grads, ref_grads, strict=True):
    assert _rel(got, want) < 2 * tol, f"d{name}"
