"""SparseCausalSelfAttention against plain masked attention written here, in numpy."""

from __future__ import annotations

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import scfa_jax
import scfa_jax.nn
from scfa_jax import lsh, nn, reference
from scfa_jax.nn import SparseCausalSelfAttention
from tests.scripts import run_script

B, T, D, N = 2, 24, 32, 4
H = D // N


def _layer(mode, shared_qk, **kw):
  return SparseCausalSelfAttention(
      width=D, num_heads=N, mode=mode, num_buckets=4, drop_rate=0.4, shared_qk=shared_qk,
      implementation="xla", rngs=nnx.Rngs(0), **kw,
  )  # fmt: skip


def _numpy_attention(layer, x, key):
  """Projections, mask and softmax done independently of scfa_jax, in float64 numpy."""
  x = np.asarray(x, np.float64)
  q = np.einsum("btd,dnh->btnh", x, np.asarray(layer.wq[...], np.float64))
  v = np.einsum("btd,dnh->btnh", x, np.asarray(layer.wv[...], np.float64))
  if layer.shared_qk:
    k = q / np.linalg.norm(q, axis=-1, keepdims=True)
  else:
    k = np.einsum("btd,dnh->btnh", x, np.asarray(layer.wk[...], np.float64))
  t = np.arange(T)
  causal = t[:, None] >= t[None, :]  # [T, S]
  mask = np.broadcast_to(causal, (B, N, T, T)).copy()
  if layer.mode == "hash":
    r = np.asarray(lsh.random_rotations(key, N, H, layer.num_buckets), np.float64)  # the documented draw

    def buckets(a):
      if layer.center_hash:  # unit vectors minus the mean of the earlier ones
        unit = a / np.linalg.norm(a, axis=-1, keepdims=True)
        earlier = np.cumsum(unit, axis=1) - unit
        a = unit - earlier / np.maximum(np.arange(T), 1)[None, :, None, None]
      p = np.einsum("btnh,nhr->btnr", a, r)
      return np.argmax(np.concatenate([p, -p], -1), -1).transpose(0, 2, 1)  # [B, N, T]

    qb = buckets(q)
    kb = qb if layer.shared_qk else buckets(k)
    strict = t[:, None] > t[None, :]
    mask = (strict if layer.shared_qk else causal) & (qb[..., :, None] == kb[..., None, :])
  elif layer.mode == "qk_drop":
    # The documented draws: queries and keys from the two halves of split(key), position
    # t's column from fold_in(half, t), whatever T is.
    def draw(half):
      return np.stack([jax.random.bernoulli(jax.random.fold_in(half, t), 1 - layer.drop_rate, (B, N))
                       for t in range(T)], axis=-1)  # fmt: skip

    q_key, k_key = jax.random.split(key)
    mask = causal & draw(q_key)[..., :, None] & draw(k_key)[..., None, :]
  s = np.einsum("btnh,bsnh->bnts", q, k) * H**-0.5
  s = np.where(mask, s, -np.inf)
  m = np.max(s, -1, keepdims=True)
  p = np.exp(s - np.where(np.isfinite(m), m, 0))
  p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
  o = np.einsum("bnts,bsnh->btnh", p, v)
  return np.einsum("btnh,nhd->btd", o, np.asarray(layer.wo[...], np.float64)), mask


@pytest.mark.parametrize(
    ("mode", "shared_qk", "center_hash"),
    [(m, s, True) for m in ("dense", "hash", "qk_drop") for s in (True, False)]
    + [("hash", True, False), ("hash", False, False)],
)
def test_layer_matches_plain_masked_attention(mode, shared_qk, center_hash):
  layer = _layer(mode, shared_qk, center_hash=center_hash)
  x = jax.random.normal(jax.random.key(1), (B, T, D))
  key = jax.random.key(7)
  got = np.asarray(layer(x, rngs=key))
  want, mask = _numpy_attention(layer, x, key)
  if mode != "dense":
    assert 0.05 < mask.mean() < 0.45, "the draw should make the pattern sparse but not empty"
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-4)


def test_centered_hash_balances_buckets_of_vectors_with_a_common_direction():
  """The paper's argmax LSH puts tokens that share a strong direction into one bucket;
  hashing `causal_center`'s output spreads them (as the 122M GPT's deep layers need)."""
  key_common, key_noise, key_rot = jax.random.split(jax.random.key(0), 3)
  length = 2048
  common = 4.0 * jax.random.normal(key_common, (1, 1, 2, 16))
  x = common + jax.random.normal(key_noise, (1, length, 2, 16))
  rotations = lsh.random_rotations(key_rot, 2, 16, 8)

  def pair_share(buckets):  # sum of squared bucket shares: the fraction of pairs kept
    counts = np.stack([np.bincount(np.asarray(buckets[0, :, n]), minlength=8) for n in range(2)])
    return float(np.mean(np.sum((counts / length) ** 2, axis=1)))

  plain, centered = pair_share(lsh.lsh_buckets(x, rotations)), pair_share(lsh.lsh_buckets(lsh.causal_center(x), rotations))
  assert plain > 0.5 and centered < 1.5 / 8, (plain, centered)


def test_causal_center_never_looks_ahead():
  x = jax.random.normal(jax.random.key(1), (2, 40, 3, 8))
  changed = x.at[:, 25:].set(jax.random.normal(jax.random.key(2), (2, 15, 3, 8)))
  a, b = lsh.causal_center(x), lsh.causal_center(changed)
  np.testing.assert_array_equal(a[:, :25], b[:, :25])
  assert not np.allclose(a[:, 25:], b[:, 25:])
  unit = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  np.testing.assert_allclose(a[:, 9], unit[:, 9] - unit[:, :9].mean(axis=1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(a[:, 0], unit[:, 0], rtol=1e-6)  # nothing earlier: the unit vector itself
  with pytest.raises(ValueError, match="x must be"):
    lsh.causal_center(x[0])


def test_centered_buckets_equal_hashing_the_centered_vectors():
  """Centering after the projection gives the buckets of `causal_center`'s output, and its
  one-position form (decoding) continues them."""
  x = jax.random.normal(jax.random.key(3), (2, 300, 3, 16)) + 0.7  # a common direction to remove
  rotations = lsh.random_rotations(jax.random.key(4), 3, 16, 8)
  full = lsh.centered_buckets(x, rotations)
  assert full.dtype == jnp.uint8 and full.shape == (2, 300, 3)
  np.testing.assert_array_equal(full, lsh.lsh_buckets(lsh.causal_center(x), rotations))
  earlier = lsh.projected_sum(x[:, :200], rotations)
  for t in range(200, 205):
    bucket, earlier = lsh.centered_buckets_next(x[:, t], rotations, earlier, t)
    np.testing.assert_array_equal(bucket, full[:, t])
  with pytest.raises(ValueError, match="rotations must be"):
    lsh.centered_buckets(x, rotations[:2])
  segments = jnp.repeat(jnp.array([[0, 1]]), 150, axis=1)  # two documents: the second starts over
  np.testing.assert_array_equal(lsh.centered_buckets(x, rotations, jnp.broadcast_to(segments, (2, 300))),
                                lsh.lsh_buckets(lsh.causal_center(x, jnp.broadcast_to(segments, (2, 300))), rotations))
  np.testing.assert_array_equal(lsh.centered_buckets(x[:, 150:], rotations), lsh.centered_buckets(
      x, rotations, jnp.broadcast_to(segments, (2, 300)))[:, 150:])
  for fn in (lambda ids: lsh.centered_buckets(x, rotations, ids), lambda ids: lsh.causal_center(x, ids)):
    with pytest.raises(ValueError, match=r"segment_ids must have shape \[B, T\]"):
      fn(segments[:, :10])
    with pytest.raises(TypeError, match="segment_ids must hold integers"):
      fn(jnp.broadcast_to(segments, (2, 300)).astype(jnp.float32))


def test_rope_keeps_norms_and_makes_scores_depend_on_the_offset_only():
  q, k = jax.random.normal(jax.random.key(5), (2, 1, 1, 3, 16))
  at = lambda x, p: nn.rope(x, jnp.array([p]))[0, 0]  # noqa: E731
  score = lambda m, n: jnp.sum(at(q, m) * at(k, n), axis=-1)  # noqa: E731
  np.testing.assert_allclose(score(7, 3), score(104, 100), rtol=1e-4, atol=1e-5)
  assert not np.allclose(score(7, 3), score(7, 5), rtol=1e-3)
  np.testing.assert_allclose(jnp.linalg.norm(at(q, 50), axis=-1), jnp.linalg.norm(q[0, 0], axis=-1), rtol=1e-5)
  np.testing.assert_array_equal(at(q, 0), q[0, 0])  # position 0 is not rotated
  with pytest.raises(ValueError, match="rope_base"):
    SparseCausalSelfAttention(width=6, num_heads=2, rope_base=10000.0, rngs=nnx.Rngs(0))


def test_rngs_streams_and_reproducibility():
  x = jax.random.normal(jax.random.key(1), (B, T, D))
  layer = _layer("hash", True)
  a, b = layer(x), layer(x)  # the stored stream advances: fresh rotations per call
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(layer(x, rngs=nnx.Rngs(attention=3)), layer(x, rngs=nnx.Rngs(attention=3)))
  no_stream = SparseCausalSelfAttention(width=D, num_heads=N, mode="hash", rngs=nnx.Rngs(params=0))
  with pytest.raises(ValueError, match="needs randomness"):
    no_stream(x)
  assert no_stream(x, rngs=jax.random.key(0)).shape == x.shape


@pytest.mark.parametrize("mode", ["dense", "hash", "qk_drop"])
def test_gradients_reach_every_parameter(mode):
  layer = _layer(mode, shared_qk=False)
  x = jax.random.normal(jax.random.key(1), (B, T, D))
  grads = nnx.grad(lambda m: jnp.sum(m(x, rngs=jax.random.key(2)) ** 2))(layer)
  leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
  assert len(leaves) == 4
  for g in leaves:
    assert np.all(np.isfinite(g)) and np.any(g != 0)


def test_shared_qk_gradients_are_finite_at_a_zero_query():
  layer = _layer("dense", shared_qk=True, rope_base=10000.0)
  x = jax.random.normal(jax.random.key(2), (B, T, D)).at[0, 3].set(0)  # q and its key are 0 there

  def loss(layer, x):
    return jnp.sum(jnp.sin(layer(x)))

  grads, dx = nnx.grad(loss, argnums=(0, 1))(layer, x)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads)) and np.isfinite(dx).all()


def test_qk_drop_draws_query_and_key_masks_independently():
  """As in the paper, queries and keys are dropped by independent draws: q_keep per query
  head and k_keep per kv head, from the two halves of split(key), each built position by
  position. The layer computes the reference QK-sparse attention under both masks, which
  differ, and the same rngs give the same masks in a call and in a cache."""
  n, kv_heads = 4, 2
  layer = SparseCausalSelfAttention(
      width=D, num_heads=n, num_kv_heads=kv_heads, mode="qk_drop", drop_rate=0.5, shared_qk=False,
      implementation="xla", rngs=nnx.Rngs(0),
  )  # fmt: skip
  x = jax.random.normal(jax.random.key(1), (B, T, D))

  @nnx.jit  # one compilation for the whole check: eager ops would each compile on their own
  def run(layer, x):
    key = nnx.Rngs(attention=4).attention()  # what the layer draws from nnx.Rngs(attention=4)
    q_key, k_key = jax.random.split(key)
    q_keep, k_keep = nn.keep_mask(q_key, 0.5, (B, T, n)), nn.keep_mask(k_key, 0.5, (B, T, kv_heads))
    proj = lambda w: jnp.einsum("btd,dnh->btnh", x, w[...])  # noqa: E731
    q, k, v = proj(layer.wq), proj(layer.wk), proj(layer.wv)
    attend = lambda q_keep: jnp.einsum(  # noqa: E731
        "btnh,nhd->btd", reference.qk_sparse_attention(q, k, v, q_keep=q_keep, k_keep=k_keep), layer.wo[...]
    )
    group_keep = jnp.repeat(k_keep, n // kv_heads, axis=2)  # each query head's kv head's keys
    cache = layer.init_cache(B, T, rngs=nnx.Rngs(attention=4))
    return dict(
        q_keep=q_keep, k_keep=k_keep, group_keep=group_keep, cache=(cache.q_keep, cache.k_keep),
        masks=nn.keep_masks(key, 0.5, (B, T, n), (B, T, kv_heads)),
        want=attend(q_keep), shared=attend(group_keep), got=layer(x, rngs=nnx.Rngs(attention=4)),
    )  # fmt: skip

  r = jax.tree.map(np.asarray, run(layer, x))
  q_keep, k_keep, group_keep = r["q_keep"], r["k_keep"], r["group_keep"]
  np.testing.assert_array_equal(r["masks"][0], q_keep)
  np.testing.assert_array_equal(r["masks"][1], k_keep)
  assert np.any(q_keep & ~group_keep) and np.any(~q_keep & group_keep), "the draws should differ"
  np.testing.assert_allclose(r["got"], r["want"], atol=2e-6, rtol=1e-5)
  # One mask for both sides (queries taking their kv head's) is another computation.
  assert not np.allclose(r["shared"], r["got"], atol=1e-4)
  # The same rngs draw the same masks in a cache (tests/test_decode.py: a longer cache starts with them).
  cache_q_keep, cache_k_keep = r["cache"]
  assert cache_q_keep.shape == (B, T, n) and cache_k_keep.shape == (B, T, kv_heads)
  np.testing.assert_array_equal(cache_q_keep, q_keep)
  np.testing.assert_array_equal(cache_k_keep, k_keep)


def test_bfloat16_compute_under_jit():
  """bf16 matmuls on float32 params give the float32 result to bf16 accuracy."""
  build = lambda dtype: SparseCausalSelfAttention(  # noqa: E731
      width=D, num_heads=N, mode="qk_drop", drop_rate=0.3, dtype=dtype, rngs=nnx.Rngs(0)
  )
  x = jax.random.normal(jax.random.key(1), (B, T, D))
  layer = build(jnp.bfloat16)
  y = nnx.jit(lambda m, x: m(x, rngs=jax.random.key(5)))(layer, x)
  assert y.dtype == jnp.bfloat16 and layer.wq[...].dtype == jnp.float32
  want = build(jnp.float32)(x, rngs=jax.random.key(5))
  np.testing.assert_allclose(np.asarray(y, np.float32), want, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"mode": "hash", "num_buckets": 3}, "num_buckets"),
        ({"mode": "hash", "num_buckets": 0}, "num_buckets"),
        ({"mode": "qk_drop", "drop_rate": 1.0}, "drop_rate"),
        ({"mode": "qk_drop", "drop_rate": -0.1}, "drop_rate"),
        ({"num_heads": 5}, "num_heads"),
        ({"mode": "sparse"}, "mode"),
        ({"implementation": "pallas"}, "implementation"),
        ({"mode": "hash", "implementation": "cudnn"}, "implementation"),
    ],
)
def test_bad_configuration_raises_at_construction(kwargs, field):
  args = {"width": D, "num_heads": N, "rngs": nnx.Rngs(0)} | kwargs
  with pytest.raises(ValueError, match=field):
    SparseCausalSelfAttention(**args)


def test_docstring_example_runs():
  result = doctest.testmod(scfa_jax.nn, verbose=False)
  assert result.attempted >= 2 and result.failed == 0


@pytest.mark.parametrize("mode", ["dense", "hash", "qk_drop"])
def test_attention_fn_in_multi_head_attention_equals_the_layer(mode):
  """nnx.MultiHeadAttention with `attention_fn` is the layer with separate keys (shared_qk=False),
  given the same weights and the key that the function draws from."""
  fn = scfa_jax.attention_fn(mode, num_buckets=4, drop_rate=0.4, seed=3, implementation="xla")
  mha = nnx.MultiHeadAttention(num_heads=N, in_features=D, use_bias=False, decode=False, attention_fn=fn,
                               rngs=nnx.Rngs(0))  # fmt: skip
  layer = _layer(mode, shared_qk=False)
  for name, w in (("wq", mha.query), ("wk", mha.key), ("wv", mha.value), ("wo", mha.out)):
    getattr(layer, name)[...] = w.kernel[...]  # [D, N, H] projections, [N, H, D] output
  x = jax.random.normal(jax.random.key(1), (B, T, D))
  got = mha(x)
  np.testing.assert_allclose(got, layer(x, rngs=jax.random.key(3)), atol=2e-6, rtol=1e-5)
  # The causal mask is accepted, also traced under jit, and changes nothing.
  masked = nnx.jit(lambda m, x: m(x, mask=nnx.make_causal_mask(x[..., 0])))(mha, x)
  np.testing.assert_allclose(masked, got, atol=1e-6, rtol=1e-6)


def test_attention_fn_is_causal_hash_attention_on_the_draw_of_its_key():
  q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 3, T, N, H))  # two batch axes
  fn = scfa_jax.attention_fn("hash", num_buckets=4, implementation="xla")
  attend = jax.jit(lambda q, k, v, rng: fn(q, k, v, rng=rng))
  got = attend(q, k, v, jax.random.key(5))
  rotations = lsh.random_rotations(jax.random.key(5), N, H, 4)
  flat = [x.reshape(6, T, N, H) for x in (q, k, v)]
  buckets = [lsh.lsh_buckets(lsh.causal_center(x), rotations) for x in flat[:2]]
  want = reference.hash_sparse_attention(*flat, q_buckets=buckets[0], k_buckets=buckets[1])
  np.testing.assert_allclose(got, want.reshape(q.shape), atol=1e-5, rtol=1e-5)
  assert not np.allclose(attend(q, k, v, jax.random.key(6)), got)  # another key, another draw
  dense = scfa_jax.attention_fn("dense")(flat[0], flat[1], flat[2])
  np.testing.assert_allclose(dense, jax.nn.dot_product_attention(*flat, is_causal=True), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    ("factory", "call", "match"),
    [
        ({"mode": "sparse"}, {}, "mode"),
        ({"num_buckets": 5}, {}, "num_buckets"),
        ({"mode": "qk_drop", "drop_rate": 1.0}, {}, "drop_rate"),
        ({"implementation": "cudnn"}, {}, "implementation"),
        ({}, {"key": jnp.ones((2, T + 1, N, H))}, "cross-attention"),
        ({}, {"mask": jnp.ones((2, 1, T, T), bool)}, "causal"),
        ({}, {"mask": jnp.tril(jnp.ones((T + 1, T + 1)))}, "mask must be"),
        ({}, {"bias": jnp.zeros((2, N, T, T))}, "bias"),
        ({}, {"dropout_rate": 0.1, "deterministic": False}, "dropout"),
        ({}, {"module": object()}, "sow_weights"),
    ],
)
def test_attention_fn_rejects_what_it_cannot_do(factory, call, match):
  with pytest.raises(ValueError, match=match):
    q = jnp.ones((2, T, N, H))
    scfa_jax.attention_fn(**factory)(q, call.pop("key", q), q, **call)


def test_flax_dropin_example_trains_and_answers_help():
  assert "attention_fn" in run_script("flax_dropin_example.py", "--help").stdout
  done = run_script("flax_dropin_example.py", "--steps=3", "--layers=1", "--width=32", "--length=32")
  losses = [float(line.split("loss ")[1].split()[0]) for line in done.stdout.splitlines() if "loss " in line]
  assert len(losses) == 2 and all(3.0 < loss < 7.0 for loss in losses), done.stdout  # near ln(257) = 5.5


@pytest.mark.parametrize("mode", ["dense", "hash", "qk_drop"])
def test_packed_documents_equal_separate_calls(mode):
  """Segment ids make a packed row compute each document as a call on that document alone
  (hash mode: the same rotations, and centering that starts over at each document);
  padding rows give 0."""
  layer = SparseCausalSelfAttention(width=D, num_heads=N, mode=mode, num_buckets=4, drop_rate=0.0,
                                    implementation="xla", rngs=nnx.Rngs(0))  # fmt: skip
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 20, D))
  seg = jnp.asarray([[0] * 9 + [1] * 9 + [-1] * 2], jnp.int32)
  key = jax.random.key(2)
  run = nnx.jit(lambda layer, x, **kw: layer(x, **kw, rngs=key))
  packed = run(layer, x, segment_ids=seg)
  alone = jnp.concatenate([run(layer, x[:, :9]), run(layer, x[:, 9:18])], axis=1)
  np.testing.assert_allclose(packed[:, :18], alone, atol=2e-6, rtol=2e-5)
  assert np.all(np.asarray(packed[:, 18:]) == 0.0)
  assert not np.allclose(run(layer, x)[:, 9:18], alone[:, 9:])  # without segments, documents mix
  with pytest.raises(ValueError, match=r"segment_ids must have shape \[B, T\]"):
    layer(x, segment_ids=seg[:, :5], rngs=key)
  with pytest.raises(TypeError, match="segment_ids must hold integers"):
    layer(x, segment_ids=seg.astype(jnp.float32), rngs=key)
