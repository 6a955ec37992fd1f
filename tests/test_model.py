"""GPT: the paper's architecture and sizes, causality, gradients, sampling, config errors."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from scfa_jax import model as model_lib
from scfa_jax.model import GPT, PRESETS, GPTConfig, count_params, generate, preset, tied_cross_entropy, tied_logits

TINY = GPTConfig(vocab_size=61, block_size=32, n_layer=2, n_head=2, n_embd=32, num_buckets=4,
                 compute_dtype="float32", implementation="xla")  # fmt: skip


def test_paper_preset_has_122m_parameters():
  config = PRESETS["gpt122m"]
  assert (config.n_layer, config.n_embd, config.n_head, config.n_embd // config.n_head) == (12, 768, 12, 64)
  assert config.shared_qk and config.vocab_size == 50304
  model = nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0)))
  d, v, t, layers = 768, 50304, 8192, 12
  per_layer = 3 * d * d + 8 * d * d + 2 * d  # shared-QK: q, v, out; MLP 4x; two LayerNorm scales
  assert count_params(model) == v * d + t * d + layers * per_layer + d == 122_800_896


def test_init_and_tied_embeddings():
  config = preset("cpu_small")
  model = GPT(config, rngs=nnx.Rngs(0))
  residual = 0.02 / math.sqrt(2 * config.n_layer)
  assert abs(float(jnp.std(model.wte[...])) - 0.02) < 1e-3
  assert abs(float(jnp.std(model.blocks[0].mlp.w_in[...])) - 0.02) < 1e-3
  assert abs(float(jnp.std(model.blocks[0].mlp.w_out[...])) - residual) < 1e-3
  assert abs(float(jnp.std(model.blocks[0].attn.wo[...])) - residual) < 1e-3
  params = nnx.state(model, nnx.Param)
  assert not any("bias" in str(path) for path, _ in jax.tree_util.tree_leaves_with_path(params))
  assert model.blocks[0].attn.wk is None  # shared QK
  # Tied: the output layer is the token embedding; zeroing a row zeroes that logit.
  model.wte[...] = model.wte[...].at[5].set(0.0)
  logits = model(jnp.zeros((1, 4), jnp.int32), rngs=jax.random.key(0))
  np.testing.assert_allclose(logits[..., 5], 0.0, atol=1e-6)


@pytest.mark.parametrize("attention", ["dense", "hash", "qk_drop"])
def test_causal_future_tokens_do_not_change_the_past(attention):
  config = dataclasses.replace(TINY, attention=attention, drop_rate=0.3)
  model = GPT(config, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, 61)
  changed = tokens.at[:, 20:].set((tokens[:, 20:] + 1) % 61)
  a = model(tokens, rngs=nnx.Rngs(attention=4))
  b = model(changed, rngs=nnx.Rngs(attention=4))
  assert a.shape == (2, 32, 61) and a.dtype == jnp.float32
  np.testing.assert_allclose(a[:, :20], b[:, :20], atol=1e-5)
  assert not np.allclose(a[:, 20:], b[:, 20:])


@pytest.mark.parametrize("remat", [False, True])
def test_gradients_reach_every_parameter(remat):
  model = GPT(dataclasses.replace(TINY, remat=remat), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 33), 0, 61)

  def loss(model):
    logits = model(tokens[:, :-1], rngs=nnx.Rngs(attention=2))
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

  value, grads = nnx.value_and_grad(loss)(model)
  assert abs(float(value) - math.log(61)) < 0.2
  for path, g in jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param)):
    assert np.all(np.isfinite(g)) and np.any(g != 0), path


def test_tied_logits_backward_runs_its_products_in_the_compute_dtype():
  """float32 logits forward; the backward's two products take bf16 operands (not float32 ones,
  which would run as TF32 on a GPU) and agree with float32 autodiff to bf16 accuracy."""
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (2, 8, 16)).astype(jnp.bfloat16)
  w = jax.random.normal(kw, (50, 16)).astype(jnp.bfloat16)
  g = jax.random.normal(kg, (2, 8, 50))
  out, vjp = jax.vjp(tied_logits, x, w)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, jnp.einsum("btd,vd->btv", x.astype(jnp.float32), w.astype(jnp.float32)), rtol=1e-5)
  dots = [e for e in jax.make_jaxpr(vjp)(g).eqns if e.primitive.name == "dot_general"]
  assert len(dots) == 2 and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
  dx, dw = vjp(g)
  assert (dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.bfloat16)
  want_dx, want_dw = jax.vjp(lambda x, w: jnp.einsum("btd,vd->btv", x, w), x.astype(jnp.float32), w.astype(jnp.float32))[1](g)
  np.testing.assert_allclose(np.asarray(dx, np.float32), want_dx, rtol=3e-2, atol=3e-2)
  np.testing.assert_allclose(np.asarray(dw, np.float32), want_dw, rtol=3e-2, atol=3e-2)


def _rounded_logits_loss(x, w, targets):
  """The reference: logits rounded once to x's dtype, then float32 optax cross-entropy."""
  logits = jnp.einsum("btd,vd->btv", x.astype(jnp.float32), w.astype(jnp.float32)).astype(x.dtype)
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tied_cross_entropy_matches_optax_and_its_gradients(dtype):
  kx, kw, kt, kg = jax.random.split(jax.random.key(0), 4)
  x = (2 * jax.random.normal(kx, (2, 9, 16))).astype(dtype)
  w = jax.random.normal(kw, (50, 16)).astype(dtype)
  targets = jax.random.randint(kt, (2, 9), 0, 50)
  g = jax.random.uniform(kg, (2, 9))
  loss, vjp = jax.vjp(lambda x, w: tied_cross_entropy(x, w, targets), x, w)
  want, want_vjp = jax.vjp(lambda x, w: _rounded_logits_loss(x, w, targets), x, w)
  assert loss.dtype == jnp.float32 and loss.shape == (2, 9)
  tol = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}[dtype]
  np.testing.assert_allclose(loss, want, rtol=tol, atol=tol)
  for got, expected in zip(vjp(g), want_vjp(g)):
    assert got.dtype == dtype
    got, expected = np.asarray(got, np.float32), np.asarray(expected, np.float32)
    np.testing.assert_allclose(got, expected, rtol=3 * tol, atol=3 * tol)
  dots = [e for e in jax.make_jaxpr(vjp)(g).eqns if e.primitive.name == "dot_general"]
  assert len(dots) == 2 and all(v.aval.dtype == dtype for e in dots for v in e.invars)


def test_one_pass_logsumexp_matches_jax():
  x = jax.random.normal(jax.random.key(3), (4, 1000)) * jnp.array([[1.0], [30.0], [1e-3], [300.0]])
  x = jnp.concatenate([x, jnp.array([[-jnp.inf] * 999 + [2.0]])])  # one finite entry
  np.testing.assert_allclose(model_lib._logsumexp(x), jax.nn.logsumexp(x, axis=-1), rtol=1e-6, atol=1e-5)
  np.testing.assert_array_equal(model_lib._logsumexp(jnp.full((2, 1), 7.0)), [7.0, 7.0])


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_gelu_backward_equals_autodiff_of_jax_gelu(dtype, tol):
  x = jnp.linspace(-9, 9, 4001).astype(dtype)
  g = jax.random.normal(jax.random.key(4), x.shape).astype(dtype)
  np.testing.assert_array_equal(model_lib.gelu(x), jax.nn.gelu(x, approximate=True))
  (got,) = jax.vjp(model_lib.gelu, x)[1](g)
  # the reference in float32: the backward computes in float32 and rounds once
  (want,) = jax.vjp(jax.nn.gelu, x.astype(jnp.float32))[1](g.astype(jnp.float32))
  assert got.dtype == dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("compute_dtype, tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_gpt_with_targets_gives_the_cross_entropy_of_its_logits(compute_dtype, tol):
  model = GPT(dataclasses.replace(TINY, compute_dtype=compute_dtype), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, 61)
  rngs = lambda: nnx.Rngs(attention=2)  # noqa: E731
  logits = model(tokens[:, :-1], rngs=rngs())
  want = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
  got = model(tokens[:, :-1], rngs=rngs(), targets=tokens[:, 1:])
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
  with pytest.raises(ValueError, match="targets must be int"):
    model(tokens[:, :-1], rngs=rngs(), targets=tokens)
  with pytest.raises(TypeError, match="targets must hold integer"):
    model(tokens[:, :-1], rngs=rngs(), targets=tokens[:, 1:].astype(jnp.float32))


def test_bf16_compute_keeps_float32_params_and_logits():
  model = GPT(dataclasses.replace(TINY, compute_dtype="bfloat16"), rngs=nnx.Rngs(0))
  logits = model(jnp.zeros((1, 8), jnp.int32), rngs=jax.random.key(0))
  assert logits.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_generate_is_deterministic_and_slides_past_block_size():
  model = GPT(TINY, rngs=nnx.Rngs(0))
  prompt = jnp.array([1, 2, 3])
  a = generate(model, prompt, steps=40, key=jax.random.key(0))  # 43 > block_size 32
  b = generate(model, prompt, steps=40, key=jax.random.key(0))
  assert a.shape == (43,) and np.array_equal(a, b) and np.array_equal(a[:3], prompt)
  assert int(a.max()) < 61 and int(a.min()) >= 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_buckets": 5}, "num_buckets"),
        ({"attention": "qk_drop", "drop_rate": 1.5}, "drop_rate"),
        ({"n_head": 3}, "n_head"),
        ({"attention": "local"}, "attention"),
        ({"n_layer": 0}, "n_layer"),
        ({"implementation": "cuda"}, "implementation"),
    ],
)
def test_bad_config_raises(kwargs, field):
  with pytest.raises(ValueError, match=field):
    dataclasses.replace(TINY, **kwargs)


def test_too_long_input_raises():
  model = GPT(TINY, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="block_size"):
    model(jnp.zeros((1, 33), jnp.int32), rngs=jax.random.key(0))


def test_packed_documents_equal_separate_sequences():
  """Segment ids and positions from end-of-text tokens (the training loader's) make a packed
  row's logits those of each document run alone."""
  from scfa_jax.data.batches import document_segments  # noqa: PLC0415

  eot = 60
  model = GPT(TINY, rngs=nnx.Rngs(0))  # hash attention; each mode's layer: test_nn.py
  docs = [np.arange(1, 9), np.concatenate([[eot], np.arange(20, 27)]), np.array([eot, 5, 6, 7, 1, 2, 3, 4])]
  tokens = jnp.asarray(np.concatenate(docs)[None], jnp.int32)
  segment_ids, positions = document_segments(tokens, eot)
  assert segment_ids[0].tolist() == [0] * 8 + [1] * 8 + [2] * 8
  assert positions[0].tolist() == list(range(8)) * 3
  run = nnx.jit(lambda model, tokens, **kw: model(tokens, **kw, rngs=nnx.Rngs(attention=3)))
  packed = run(model, tokens, segment_ids=segment_ids, positions=positions)
  alone = [run(model, jnp.asarray(d[None], jnp.int32)) for d in docs]
  np.testing.assert_allclose(packed, jnp.concatenate(alone, axis=1), atol=1e-4, rtol=1e-4)
  with pytest.raises(ValueError, match="positions must be int"):
    model(tokens, positions=positions[:, :3])
