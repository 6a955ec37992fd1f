"""Grouped-query and multi-query attention: k and v with K heads, K dividing q's N heads.

Query head n reads kv head n // (N // K); key masks and buckets are [B, S, K]. Every case is
checked against the dense reference (which repeats k and v inside the oracle) and against
the N-head path on explicitly repeated k, v and key masks, whose dK and dV summed over each
group must equal ours. Groups of 1 (K = N), 4, and N (K = 1, multi-query).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scfa_jax
from scfa_jax import reference
from tests.test_attention_xla import _check_against, _close

H = 16
# K = N (groups of 1) is the path every other test of the suite takes; here groups of 4 and
# of N (multi-query), and 2 in the determinism test and the layer.


def _qkv(key, b, t, s, n, kv_heads, h=H, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(key, 3)
  return (
      jax.random.normal(kq, (b, t, n, h), dtype),
      jax.random.normal(kk, (b, s, kv_heads, h), dtype),
      jax.random.normal(kv, (b, s, kv_heads, h), dtype),
  )


def _masks(key, mode, b, t, s, n, kv_heads):
  """Keyword arguments of the mode's function: query masks [B, T, N], key masks [B, S, K]."""
  k1, k2 = jax.random.split(key)
  if mode == "hash":
    buckets = lambda kk, shape: jax.random.randint(kk, shape, 0, 3)  # noqa: E731
    return dict(q_buckets=buckets(k1, (b, t, n)), k_buckets=buckets(k2, (b, s, kv_heads)))
  return dict(
      q_keep=jax.random.bernoulli(k1, 0.7, (b, t, n)), k_keep=jax.random.bernoulli(k2, 0.7, (b, s, kv_heads))
  )


_FUNCTIONS = {
    "hash": (scfa_jax.hash_sparse_attention, reference.hash_sparse_attention),
    "qk": (scfa_jax.qk_sparse_attention, reference.qk_sparse_attention),
}


def _check_mode(implementation, mode, b, t, s, n, kv_heads, strict, seed):
  key = jax.random.PRNGKey(seed)
  q, k, v = _qkv(key, b, t, s, n, kv_heads)
  kw = _masks(jax.random.fold_in(key, 1), mode, b, t, s, n, kv_heads)
  if mode == "hash":
    kw["strict"] = strict
  fn, ref = _FUNCTIONS[mode]
  _check_against(
      functools.partial(fn, **kw, implementation=implementation), functools.partial(ref, **kw), (q, k, v),
      jnp.float32, key,
  )  # fmt: skip


@pytest.mark.parametrize(
    "mode, t, s, strict, n, kv_heads",
    [("hash", 129, 129, True, 8, 2), ("hash", 100, 61, False, 8, 1), ("qk", 61, 137, False, 4, 1)],
)
def test_xla_against_reference(mode, t, s, strict, n, kv_heads):
  _check_mode("xla", mode, 2, t, s, n, kv_heads, strict, seed=t + s + n + kv_heads)


@pytest.mark.parametrize(
    "mode, t, s, strict, n, kv_heads", [("hash", 37, 37, True, 4, 1), ("hash", 61, 40, False, 8, 2), ("qk", 40, 61, False, 4, 1)]
)
def test_interpret_against_reference(mode, t, s, strict, n, kv_heads):
  pytest.importorskip("torch", reason="the interpreter's tensors")
  pytest.importorskip("triton")
  _check_mode("interpret", mode, 1, t, s, n, kv_heads, strict, seed=3 * t + s + kv_heads)


def _repeat(x, group):
  return jnp.repeat(x, group, axis=2)


@pytest.mark.parametrize("implementation", ["xla", "interpret"])
def test_primitive_equals_the_n_head_path_on_repeated_kv(implementation):
  """sparse_causal_attention in a caller's order (the bounding-box plan), K = N / 4: output and dQ
  equal those of the N-head call on repeated k, v, k_idx, k_hash, and dK, dV its gradients
  summed over each group, to rounding."""
  if implementation == "interpret":
    pytest.importorskip("torch", reason="the interpreter's tensors")
    pytest.importorskip("triton")
  key = jax.random.PRNGKey(17)
  b, t, s, n, kv_heads = 1, 45, 52, 4, 1
  group = n // kv_heads
  q, k, v = _qkv(key, b, t, s, n, kv_heads)
  q_idx = jnp.where(jax.random.bernoulli(key, 0.1, (b, t, n)), -1, jax.random.randint(key, (b, t, n), 0, 60))
  k_idx = jnp.where(
      jax.random.bernoulli(jax.random.fold_in(key, 1), 0.1, (b, s, kv_heads)),
      2**30, jax.random.randint(jax.random.fold_in(key, 2), (b, s, kv_heads), 0, 60),
  )  # fmt: skip
  kw = dict(q_idx=q_idx, k_idx=k_idx, q_hash=q_idx % 2, k_hash=k_idx % 2, strict=True)
  repeated = {name: _repeat(x, group) if name.startswith("k_") else x for name, x in kw.items()}
  ours = functools.partial(scfa_jax.sparse_causal_attention, **kw, implementation=implementation)
  heads = functools.partial(scfa_jax.sparse_causal_attention, **repeated, implementation=implementation)
  cotangent = jax.random.normal(jax.random.fold_in(key, 3), q.shape)
  out, vjp = jax.vjp(ours, q, k, v)
  want, want_vjp = jax.vjp(heads, q, _repeat(k, group), _repeat(v, group))
  dq, dk, dv = vjp(cotangent)
  want_dq, want_dk, want_dv = want_vjp(cotangent)
  _close(out, want, jnp.float32)
  _close(dq, want_dq, jnp.float32)
  summed = lambda x: jnp.sum(x.reshape(b, s, kv_heads, group, H), axis=3)
  _close(dk, summed(want_dk), jnp.float32)
  _close(dv, summed(want_dv), jnp.float32)
  assert dk.shape == dv.shape == k.shape


def test_interpret_gqa_is_bitwise_deterministic_and_empty_rows_are_zero():
  """dK/dV of a kv head accumulate its group's query heads in one program, in a fixed order:
  two runs agree bit for bit. Rows with no key (strict: each bucket's first query) give 0."""
  pytest.importorskip("torch", reason="the interpreter's tensors")
  pytest.importorskip("triton")
  key = jax.random.PRNGKey(23)
  b, t, n, kv_heads = 1, 48, 4, 2
  q, k, v = _qkv(key, b, t, t, n, kv_heads)
  kw = _masks(key, "hash", b, t, t, n, kv_heads)
  attend = functools.partial(scfa_jax.hash_sparse_attention, **kw, strict=True, implementation="interpret")
  loss = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v) ** 2), argnums=(0, 1, 2)))
  first, second = loss(q, k, v), loss(q, k, v)
  for x, y in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
    assert np.array_equal(np.asarray(x), np.asarray(y))
  mask = reference.allowed_mask(
      jnp.broadcast_to(jnp.arange(t)[None, :, None], (b, t, n)),
      jnp.broadcast_to(jnp.arange(t)[None, :, None], (b, t, kv_heads)),
      kw["q_buckets"], kw["k_buckets"], strict=True,
  )  # fmt: skip
  no_key = ~np.asarray(jnp.any(mask, axis=-1)).swapaxes(1, 2)
  assert no_key.sum() >= 2
  assert np.all(np.asarray(attend(q, k, v))[no_key] == 0.0)


def _grouped_tokens(num_buckets, *, bucket_shapes, keep_shapes):
  """Sorted tokens with fewer kv heads than query heads: (hash, qk_drop), from random buckets
  in [0, num_buckets) for the (query, key) shapes of bucket_shapes and keep masks for those
  of keep_shapes."""
  from scfa_jax import sorting  # noqa: PLC0415

  rng = np.random.default_rng(5)
  buckets = [jnp.asarray(rng.integers(0, num_buckets, shape)) for shape in bucket_shapes]
  keeps = [jnp.asarray(rng.random(shape) < 0.6) for shape in keep_shapes]
  return [sorting.by_bucket(*buckets), sorting.by_keep_mask(*keeps)]


def test_plan_kernel_pairs_each_query_head_with_its_kv_head():
  """kernels/plan.py on tokens with N = 6 query heads and K = 2 or 3 kv heads gives the jnp
  plan's ranges exactly, both views."""
  pytest.importorskip("torch", reason="the interpreter's tensors")
  pytest.importorskip("triton")
  from tests.plan_kernel_check import check_plan_kernel  # noqa: PLC0415

  cases = _grouped_tokens(3, bucket_shapes=((1, 70, 6), (1, 53, 2)), keep_shapes=((1, 53, 6), (1, 70, 3)))
  for tokens, strict in zip(cases, (True, False), strict=True):
    check_plan_kernel("interpret", tokens, [(16, 32)], strict)


def test_plans_pair_each_query_head_with_its_kv_head():
  """The tile plan of GQA tokens is that of the tokens with the key side repeated per query head."""
  from scfa_jax import plan as plan_lib  # noqa: PLC0415
  from scfa_jax import sorting  # noqa: PLC0415

  rng = np.random.default_rng(6)
  q_buckets = jnp.asarray(rng.integers(0, 3, (2, 70, 6)))
  k_buckets = jnp.asarray(rng.integers(0, 3, (2, 53, 2)))
  grouped = sorting.by_bucket(q_buckets, k_buckets)
  assert grouped.k_perm.shape == (2, 2, 53) and grouped.q_perm.shape == (2, 6, 70)
  repeated = sorting.by_bucket(q_buckets, _repeat(k_buckets, 3))
  for ordered in (True, False):
    # presorted: the same order given by a caller, planned from bounding boxes.
    def caller(x):
      return sorting.presorted(*(jnp.swapaxes(a, 1, 2) for a in (x.q_idx, x.k_idx, x.q_hash, x.k_hash)))

    tokens = [grouped, repeated] if ordered else [caller(grouped), caller(repeated)]
    plan = jax.jit(lambda x: plan_lib.make_plan(x, block_q=16, block_k=32, strict=True))
    got, want = plan(tokens[0]), plan(tokens[1])
    for view in ("q", "k"):
      np.testing.assert_array_equal(got.to_dense(view), want.to_dense(view))


@pytest.mark.parametrize(
    "k_heads, masks, match",
    [
        (3, {}, r"K heads dividing q's N heads, got q.shape=\(1, 8, 4, 16\), k.shape=\(1, 8, 3, 16\)"),
        (2, {"k_buckets": (1, 8, 4)}, r"k_buckets must have shape \[B, S, K\] = \(1, 8, 2\), got .*\(1, 8, 4\)"),
        (2, {"q_buckets": (1, 8, 2)}, r"q_buckets must have shape \[B, T, N\] = \(1, 8, 4\)"),
    ],
)
def test_bad_head_counts_name_the_argument(k_heads, masks, match):
  q = jnp.zeros((1, 8, 4, H))
  k = jnp.zeros((1, 8, k_heads, H))
  shapes = {"q_buckets": (1, 8, 4), "k_buckets": (1, 8, k_heads)} | masks
  buckets = {name: jnp.zeros(shape, jnp.int32) for name, shape in shapes.items()}
  with pytest.raises(ValueError, match=match):
    scfa_jax.hash_sparse_attention(q, k, k, **buckets)


def test_k_and_v_head_counts_must_agree():
  q = jnp.zeros((1, 8, 4, H))
  keep = dict(q_keep=jnp.ones((1, 8, 4), bool), k_keep=jnp.ones((1, 8, 2), bool))
  kv = lambda heads: jnp.zeros((1, 8, heads, H))  # noqa: E731
  with pytest.raises(ValueError, match=r"k and v must have the same shape, got k.shape=\(1, 8, 2, 16\), v.shape="):
    scfa_jax.qk_sparse_attention(q, kv(2), kv(1), **keep)
  with pytest.raises(ValueError, match=r"k_keep must have shape \[B, S, K\] = \(1, 8, 2\)"):
    scfa_jax.qk_sparse_attention(q, kv(2), kv(2), **keep | {"k_keep": keep["q_keep"]})
  idx = jnp.zeros((1, 8, 4), jnp.int32)
  with pytest.raises(ValueError, match=r"k_idx must have shape \[B, S, K\] = \(1, 8, 1\)"):
    scfa_jax.sparse_causal_attention(q, kv(1), kv(1), q_idx=idx, k_idx=idx)


# The layer, the GPT and cached decoding with K < N kv heads.

LAYER_B, LAYER_T, LAYER_D, LAYER_N = 2, 24, 32, 4


def _layer(mode, num_kv_heads, **kw):
  from flax import nnx  # noqa: PLC0415

  kw = dict(shared_qk=False) | kw
  return scfa_jax.SparseCausalSelfAttention(
      width=LAYER_D, num_heads=LAYER_N, num_kv_heads=num_kv_heads, mode=mode, num_buckets=4, drop_rate=0.4,
      implementation="xla", rngs=nnx.Rngs(0), **kw,
  )  # fmt: skip


def _numpy_gqa_layer(layer, x, key):
  """The layer with K kv heads written out in float64 numpy: each query head n uses kv head
  n // G and its rotations (hash) or key keep mask (qk_drop), both drawn for K heads; qk_drop's
  query keep mask is drawn for N heads."""
  b, t, n, kv_heads = LAYER_B, LAYER_T, LAYER_N, layer.num_kv_heads
  group, h = n // kv_heads, LAYER_D // LAYER_N
  x = np.asarray(x, np.float64)
  proj = lambda w: np.einsum("btd,dnh->btnh", x, np.asarray(w[...], np.float64))
  q, k, v = proj(layer.wq), proj(layer.wk), proj(layer.wv)
  assert k.shape[2] == v.shape[2] == kv_heads
  steps = np.arange(t)
  causal = steps[:, None] >= steps[None, :]
  mask = np.broadcast_to(causal, (b, n, t, t))
  if layer.mode == "hash":
    rotations = np.asarray(scfa_jax.random_rotations(key, kv_heads, h, layer.num_buckets), np.float64)

    def buckets(a, r):
      unit = a / np.linalg.norm(a, axis=-1, keepdims=True)
      a = unit - (np.cumsum(unit, axis=1) - unit) / np.maximum(steps, 1)[None, :, None, None]
      p = np.einsum("btnh,nhr->btnr", a, r)
      return np.argmax(np.concatenate([p, -p], -1), -1).transpose(0, 2, 1)  # [B, heads, T]

    qb = buckets(q, np.repeat(rotations, group, axis=0))
    kb = np.repeat(buckets(k, rotations), group, axis=1)
    mask = causal & (qb[..., :, None] == kb[..., None, :])
  elif layer.mode == "qk_drop":
    def draw(half, heads):  # [B, heads, T], position s from fold_in(half, s)
      return np.stack([jax.random.bernoulli(jax.random.fold_in(half, s), 1 - layer.drop_rate, (b, heads))
                       for s in range(t)], axis=-1)  # fmt: skip

    q_key, k_key = jax.random.split(key)  # independent query and key draws
    k_keep = np.repeat(draw(k_key, kv_heads), group, axis=1)
    mask = causal & draw(q_key, n)[..., :, None] & k_keep[..., None, :]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  s = np.where(mask, np.einsum("btnh,bsnh->bnts", q, k) * h**-0.5, -np.inf)
  m = np.max(s, -1, keepdims=True)
  p = np.exp(s - np.where(np.isfinite(m), m, 0))
  p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
  o = np.einsum("bnts,bsnh->btnh", p, v)
  return np.einsum("btnh,nhd->btd", o, np.asarray(layer.wo[...], np.float64)), mask


@pytest.mark.parametrize("mode, num_kv_heads", [("dense", 1), ("hash", 2), ("qk_drop", 1)])
def test_layer_with_kv_heads_matches_numpy(mode, num_kv_heads):
  layer = _layer(mode, num_kv_heads)
  assert layer.wk.shape == layer.wv.shape == (LAYER_D, num_kv_heads, LAYER_D // LAYER_N)
  x = jax.random.normal(jax.random.key(1), (LAYER_B, LAYER_T, LAYER_D))
  key = jax.random.key(7)
  want, mask = _numpy_gqa_layer(layer, x, key)
  if mode != "dense":
    assert 0.05 < mask.mean() < 0.45, "the draw should make the pattern sparse but not empty"
  np.testing.assert_allclose(np.asarray(layer(x, rngs=key)), want, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("mode, shared_qk", [("hash", False), ("qk_drop", True)])
def test_layer_with_as_many_kv_heads_as_heads_is_unchanged(mode, shared_qk):
  """num_kv_heads=N gives the parameters and the outputs of num_kv_heads=None, bit for bit."""
  from flax import nnx  # noqa: PLC0415

  plain, equal = _layer(mode, None, shared_qk=shared_qk), _layer(mode, LAYER_N, shared_qk=shared_qk)
  params = lambda layer: jax.tree.leaves(nnx.state(layer, nnx.Param))  # noqa: E731
  for a, b in zip(params(plain), params(equal), strict=True):
    np.testing.assert_array_equal(a, b)
  x = jax.random.normal(jax.random.key(1), (LAYER_B, LAYER_T, LAYER_D))
  np.testing.assert_array_equal(plain(x, rngs=jax.random.key(3)), equal(x, rngs=jax.random.key(3)))


def test_kv_heads_are_checked_in_the_layer_and_the_config():
  with pytest.raises(ValueError, match=r"shared_qk=True .* needs num_kv_heads == num_heads, got num_heads=4, num_kv_"):
    _layer("hash", 2, shared_qk=True)
  with pytest.raises(ValueError, match="num_kv_heads must divide num_heads"):
    _layer("hash", 3)
  with pytest.raises(ValueError, match="num_kv_heads must be a positive int"):
    _layer("hash", 0)
  with pytest.raises(ValueError, match=r"GPTConfig: shared_qk=True"):
    scfa_jax.GPTConfig(n_head=4, num_kv_heads=2)
  assert scfa_jax.GPTConfig(n_head=4, num_kv_heads=2, shared_qk=False).num_kv_heads == 2


@pytest.mark.parametrize(
    "mode, page_size, positions",
    [("dense", None, "learned"), ("hash", None, "learned"), ("hash", 3, "rope"), ("qk_drop", None, "rope")],
)
def test_cached_decoding_with_kv_heads_equals_the_full_model(mode, page_size, positions):
  """A GPT with 4 query heads and 2 kv heads: the cache holds 2 heads, and each decode
  step's logits are those of the full model on the whole sequence."""
  import dataclasses  # noqa: PLC0415

  from flax import nnx  # noqa: PLC0415

  from tests.test_decode import CONFIG, _check_against_full_model  # noqa: PLC0415

  config = dataclasses.replace(
      CONFIG, attention=mode, n_layer=1, n_head=4, num_kv_heads=2, shared_qk=False, block_size=64,
      positions=positions,
  )
  model = scfa_jax.GPT(config, rngs=nnx.Rngs(0))
  cache = model.init_cache(2, 20, rngs=nnx.Rngs(attention=jax.random.key(2)), page_size=page_size)
  head_dim = config.n_embd // config.n_head
  if page_size is None:
    assert cache[0].k.shape == (2, 20, 2, head_dim)
  else:
    assert cache[0].pages.k.shape[:2] == (2, 2)
  prompt = jax.random.randint(jax.random.key(1), (2, 9), 0, config.vocab_size)
  tokens = _check_against_full_model(model, prompt, 5, jax.random.key(2), page_size)
  assert len(np.unique(tokens)) > 2, "the test needs tokens that vary"


# The Triton kernels on a GPU (pytest -m gpu).

def _gpu(test):
  """Marks a test as a GPU test, as tests/test_kernels_gpu.py's module mark does."""
  needs_gpu = pytest.mark.skipif(
      jax.default_backend() != "gpu" or os.environ.get("TRITON_INTERPRET") == "1", reason="needs a CUDA GPU"
  )
  return pytest.mark.gpu(needs_gpu(test))


def _gpu_masks(key, mode, b, t, n, kv_heads, param):
  k1, k2 = jax.random.split(key)
  if mode == "hash":
    if param == "skew":  # one bucket with 90% of the tokens, the rest mostly singletons
      def pick(kk, heads):
        many = jax.random.randint(kk, (b, t, heads), 1, 10 * t)
        return jnp.where(jax.random.uniform(kk, (b, t, heads)) < 0.9, 0, many)
    else:
      def pick(kk, heads):
        return jax.random.randint(kk, (b, t, heads), 0, param)
    return dict(q_buckets=pick(k1, n), k_buckets=pick(k2, kv_heads))
  keep = lambda kk, heads: jax.random.bernoulli(kk, 1 - param, (b, t, heads))  # noqa: E731
  return dict(q_keep=keep(k1, n), k_keep=keep(k2, kv_heads))


GPU_CASES = [
    # (dtype, H, T, mode, param, strict, N, K)
    (jnp.bfloat16, 64, 1000, "hash", 8, True, 8, 2),
    (jnp.bfloat16, 64, 4097, "hash", 16, False, 8, 1),
    (jnp.float32, 64, 777, "hash", 4, True, 6, 3),
    (jnp.float32, 128, 258, "hash", "skew", True, 8, 2),
    (jnp.bfloat16, 128, 2048, "qk", 0.5, False, 8, 2),
    (jnp.float16, 64, 4097, "qk", 0.3, False, 8, 1),
    (jnp.bfloat16, 32, 1000, "qk", 0.0, False, 4, 4),
    (jnp.bfloat16, 16, 513, "hash", 4, False, 4, 1),
]


@pytest.mark.parametrize("dtype, h, t, mode, param, strict, n, kv_heads", GPU_CASES)
@_gpu
def test_gpu_triton_against_float32_reference(dtype, h, t, mode, param, strict, n, kv_heads):
  from tests.test_kernels_gpu import REL_TOL, _out_and_grads, _rel  # noqa: PLC0415

  key = jax.random.PRNGKey(t + h + kv_heads)
  b = 2
  q, k, v = _qkv(key, b, t, t, n, kv_heads, h, dtype)
  masks = _gpu_masks(jax.random.fold_in(key, 9), mode, b, t, n, kv_heads, param)
  if mode == "hash":
    masks["strict"] = strict
  fn, oracle = _FUNCTIONS[mode]
  ct = jax.random.normal(jax.random.fold_in(key, 10), q.shape, jnp.float32)
  ours = functools.partial(fn, **masks, implementation="triton")
  out, grads = jax.jit(functools.partial(_out_and_grads, ours))(q, k, v, ct)
  up = lambda x: x.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):  # JAX's float32 default on GPU is TF32
    ref_out, ref_grads = jax.jit(functools.partial(_out_and_grads, functools.partial(oracle, **masks)))(
        up(q), up(k), up(v), ct
    )
  assert out.dtype == dtype and grads[1].shape == k.shape
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in (out, *grads))
  tol = REL_TOL[dtype]
  assert _rel(out, ref_out) < tol
  for name, got, want in zip("qkv", grads, ref_grads, strict=True):
    assert _rel(got, want) < 2 * tol, f"d{name}"


@_gpu
def test_gpu_gqa_is_bitwise_deterministic_and_matches_repeated_heads():
  """Two runs agree bit for bit (dK/dV of a kv head summed in one program, in a fixed order),
  and equal the N-head kernels on repeated k, v and key buckets, with dK, dV summed per group."""
  from tests.test_kernels_gpu import REL_TOL, _rel  # noqa: PLC0415

  key = jax.random.PRNGKey(0)
  b, t, n, kv_heads, h = 2, 3000, 8, 2, 64
  group = n // kv_heads
  q, k, v = _qkv(key, b, t, t, n, kv_heads, h, jnp.bfloat16)
  masks = _gpu_masks(key, "hash", b, t, n, kv_heads, 16)

  def loss(q, k, v, k_buckets):
    q_buckets = masks["q_buckets"]
    out = scfa_jax.hash_sparse_attention(q, k, v, q_buckets=q_buckets, k_buckets=k_buckets, strict=True)
    return jnp.sum(out.astype(jnp.float32) ** 2)

  grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  first, second = grads(q, k, v, masks["k_buckets"]), grads(q, k, v, masks["k_buckets"])
  for x, y in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
    assert np.array_equal(np.asarray(x), np.asarray(y))
  repeated = grads(q, _repeat(k, group), _repeat(v, group), _repeat(masks["k_buckets"], group))
  (value, (dq, dk, dv)), (want_value, (want_dq, want_dk, want_dv)) = first, (repeated[0], repeated[1])
  summed = lambda x: jnp.sum(x.astype(jnp.float32).reshape(b, t, kv_heads, group, h), axis=3)
  assert _rel(value, want_value) < REL_TOL[jnp.bfloat16]
  assert _rel(dq, want_dq) < 2 * REL_TOL[jnp.bfloat16]
  assert _rel(dk, summed(want_dk)) < 2 * REL_TOL[jnp.bfloat16]
  assert _rel(dv, summed(want_dv)) < 2 * REL_TOL[jnp.bfloat16]


@pytest.mark.parametrize("strict", [False, True])
@_gpu
def test_gpu_plan_kernel_pairs_each_query_head_with_its_kv_head(strict):
  from tests.plan_kernel_check import check_plan_kernel  # noqa: PLC0415

  cases = _grouped_tokens(
      9, bucket_shapes=((2, 5000, 8), (2, 4100, 2)), keep_shapes=((1, 4100, 6), (1, 5000, 1))
  )
  for tokens in cases:
    check_plan_kernel("triton", tokens, [(64, 32), (32, 64), (128, 64), (32, 128)], strict)


def test_bench_attention_builds_grouped_query_cases():
  """experiments/bench_attention.py --kv_heads: its cases give key masks of K heads, and run
  (here on the XLA backend; the timings themselves need a GPU)."""
  from tests.scripts import load_script  # noqa: PLC0415

  bench = load_script("bench_attention.py")
  q, k, v = _qkv(jax.random.PRNGKey(0), 1, 16, 16, 6, 2)
  fn, q_masks, k_masks, _ = bench.make_case("drop30", 1, 16, 6, seed=0, kv_heads=2)
  assert q_masks.shape == (1, 16, 6) and k_masks.shape == (1, 16, 2)
  assert fn(q, k, v, q_masks, k_masks).shape == q.shape


@pytest.mark.parametrize("bucket_dtype", [jnp.uint8, jnp.int32])
def test_grouped_query_with_segment_ids(bucket_dtype):
  """Packed documents with K = N / 4 kv heads, both ways the segment joins the sort key
  (uint8 buckets: packed into the key; int32: a joint rank of the group's queries and its keys)."""
  key = jax.random.PRNGKey(31)
  b, t, n, kv_heads = 2, 70, 4, 1
  q, k, v = _qkv(key, b, t, t, n, kv_heads)
  doc = jnp.repeat(jnp.array([0, 1, 2, -1]), jnp.array([20, 25, 20, 5]), total_repeat_length=t)
  doc = jnp.broadcast_to(doc, (b, t))
  kw = _masks(jax.random.fold_in(key, 1), "hash", b, t, t, n, kv_heads)
  kw = {name: x.astype(bucket_dtype) for name, x in kw.items()} | dict(q_segment_ids=doc, k_segment_ids=doc)
  _check_against(
      functools.partial(scfa_jax.hash_sparse_attention, **kw, implementation="xla"),
      functools.partial(reference.hash_sparse_attention, **kw), (q, k, v), jnp.float32, key,
  )  # fmt: skip


@pytest.mark.parametrize("kv_heads, hashed, block_n1", [(2, False, 64), (6, False, 128), (2, True, 64)])
def test_launcher_takes_the_grouped_qk_dkdv_tile(kv_heads, hashed, block_n1):
  """The Triton launcher reads grouping off the sorted tokens (K < N kv heads) and gives
  grouped QK calls the table's grouped dK/dV tile; hash mode and K = N keep the table's."""
  from scfa_jax import core, sorting, triton_backend  # noqa: PLC0415

  b, t, n = 1, 64, 6
  if hashed:
    tokens = sorting.by_bucket(jnp.zeros((b, t, n), jnp.uint8), jnp.zeros((b, t, kv_heads), jnp.uint8))
  else:
    tokens = sorting.by_keep_mask(jnp.ones((b, t, n), bool), jnp.ones((b, t, kv_heads), bool))
  config = core.AttentionConfig(implementation="triton", strict=False, scale=0.125)
  tiles = triton_backend._tiles(config, 64, tokens)
  assert tiles.block_n1 == block_n1
  assert tiles.block_m == triton_backend.kernel_config("triton", 64, hashed).block_m  # only dK/dV changes
