"""Cached decoding against recomputing the whole sequence; the bucket-paged cache against the masked read."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scfa_jax import decode
from scfa_jax.model import GPT, GPTConfig, generate, sample_logits
from scfa_jax.nn import SparseCausalSelfAttention
from tests.scripts import run_script

# A wide init makes an untrained model's greedy tokens vary instead of repeating one byte.
CONFIG = GPTConfig(vocab_size=61, block_size=256, n_layer=2, n_head=2, n_embd=32, num_buckets=4,
                   drop_rate=0.3, compute_dtype="float32", implementation="xla", init_std=0.3)  # fmt: skip
MODES = {
    "dense": dict(attention="dense"),
    "hash": dict(attention="hash"),
    "hash_unshared": dict(attention="hash", shared_qk=False),
    "qk_drop": dict(attention="qk_drop"),
    "hash_rope": dict(attention="hash", positions="rope"),
    "hash_unshared_rope": dict(attention="hash", shared_qk=False, positions="rope"),
}
STEPS = 6


def _model(name, **overrides):
  return GPT(dataclasses.replace(CONFIG, **MODES[name], **overrides), rngs=nnx.Rngs(0))


def _cached_greedy(model, prompt, steps, key, page_size=None):
  """Greedy tokens int [B, steps] and the logits [steps, B, V] they came from, by prefill and decode steps."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, prompt):
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(prompt.shape[0], prompt.shape[1] + steps, rngs=nnx.Rngs(attention=key),
                             page_size=page_size)  # fmt: skip
    logits, cache = model.prefill(prompt, cache)

    def step(carry, _):
      logits, cache = carry
      token = jnp.argmax(logits, axis=-1)
      return model.decode_step(token, cache), (token, logits)

    _, (tokens, logits) = jax.lax.scan(step, (logits, cache), length=steps)
    return tokens.T, logits

  return run(state, prompt)


def _check_against_full_model(model, prompt, steps, key, page_size=None, rtol=2e-4):
  tokens, logits = _cached_greedy(model, prompt, steps, key, page_size)
  sequence = jnp.concatenate([prompt, tokens], axis=1)
  full = nnx.jit(lambda m, s: m(s, rngs=nnx.Rngs(attention=key)))(model, sequence[:, :-1])
  want = jnp.swapaxes(full[:, prompt.shape[1] - 1 :], 0, 1)  # the logits each token was drawn from
  np.testing.assert_allclose(logits, want, rtol=rtol, atol=rtol)
  np.testing.assert_array_equal(tokens, jnp.argmax(want, axis=-1).T)
  return tokens


@pytest.mark.parametrize(("name", "prompt_length"), [
    ("dense", 200), ("hash", 1), ("hash", 200), ("hash_unshared", 5), ("qk_drop", 5), ("qk_drop", 200),
    ("hash_rope", 1), ("hash_rope", 37), ("hash_unshared_rope", 5),
])  # fmt: skip
def test_cached_greedy_decoding_equals_the_full_model(name, prompt_length):
  """Each decode step's logits are the full model's at that position (same rotations /
  keep masks), so greedy tokens are those of recomputing the whole sequence every step."""
  model = _model(name)
  prompt = jax.random.randint(jax.random.key(1), (2, prompt_length), 0, CONFIG.vocab_size)
  tokens = _check_against_full_model(model, prompt, STEPS, jax.random.key(2))
  assert len(np.unique(tokens)) > 2, "the test needs tokens that vary"


@pytest.mark.parametrize("name", ["hash", "qk_drop"])
def test_cached_decoding_after_an_interpreted_prefill(name):
  """The prompt goes through the Triton kernels (in the interpreter); the steps through jnp.
  (Dense mode runs jax.nn whatever the implementation.)"""
  model = _model(name, implementation="interpret", block_size=16)
  prompt = jax.random.randint(jax.random.key(1), (2, 5), 0, CONFIG.vocab_size)
  _check_against_full_model(model, prompt, 4, jax.random.key(2))


@pytest.mark.parametrize(("mode", "page_size", "shared_qk"), [
    ("hash", None, True), ("hash", 3, True), ("hash", 3, False), ("qk_drop", None, True),
])  # fmt: skip
def test_rows_that_may_attend_nothing_are_exactly_zero_as_in_the_full_layer(mode, page_size, shared_qk):
  """One head, so that a zero output row is a query with no allowed key: the first token of
  its bucket (strict shared-QK causality: never itself), a dropped query or one with no kept
  key up to its position. With bucket pages (page_size) each step reads only its bucket's
  pages."""
  layer = SparseCausalSelfAttention(width=16, num_heads=1, mode=mode, num_buckets=4, drop_rate=0.5,
                                    shared_qk=shared_qk, implementation="xla", rngs=nnx.Rngs(0))  # fmt: skip
  x = jax.random.normal(jax.random.key(1), (2, 24, 16))
  key = jax.random.key(5)
  full = np.asarray(nnx.jit(lambda layer, x: layer(x, rngs=key))(layer, x))
  cache = layer.init_cache(2, 24, rngs=key, page_size=page_size)
  outputs, cache = nnx.jit(lambda layer, x, cache: layer.prefill(x, cache))(layer, x[:, :3], cache)
  outputs = [outputs]
  step = nnx.jit(lambda layer, x, cache: layer.decode_step(x, cache))
  for t in range(3, 24):
    y, cache = step(layer, x[:, t : t + 1], cache)
    outputs.append(y)
  got = np.asarray(jnp.concatenate(outputs, axis=1))
  nothing = np.all(full == 0, axis=-1)  # [B, T]
  assert 1 <= nothing[:, 3:].sum() <= 30, nothing  # some such rows among the decoded ones, not all
  assert np.all(got[nothing] == 0) and np.all(np.any(got[~nothing] != 0, axis=-1))
  np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-6)
  # A step into the full cache cannot raise inside jit: it says so with NaN.
  assert np.all(np.isnan(step(layer, x[:, :1], cache)[0]))


def test_bucket_pages_give_the_masked_read_of_their_bucket_and_nothing_else():
  b, n, h, length, nb, size = 2, 3, 8, 40, 4, 3
  kq, kk, kv, kb, kc = jax.random.split(jax.random.key(0), 5)
  k, v = jax.random.normal(kk, (b, length, n, h)), jax.random.normal(kv, (b, length, n, h))
  # Skewed buckets: bucket 0 spans many pages, bucket 3 stays empty.
  buckets = jax.random.choice(kb, 3, (b, length, n), p=jnp.array([0.7, 0.2, 0.1])).astype(jnp.uint8)
  empty = decode.empty_pages(b, n, h, nb, length, size, jnp.float32)
  pages = jax.jit(decode.fill_pages)(empty, k[:, :17], v[:, :17], buckets[:, :17])
  append = jax.jit(decode.append_to_pages)
  for t in range(17, length):
    pages = append(pages, k[:, t], v[:, t], buckets[:, t])
  assert int(pages.used.max()) <= pages.k.shape[2]
  assert np.array_equal(pages.counts.sum(-1), np.full((b, n), length))

  q = jax.random.normal(kq, (b, n, h))
  q_bucket = jax.random.randint(kc, (b, n), 0, nb).at[0, 0].set(3).at[1, 1].set(0)
  allowed = jnp.swapaxes(buckets, 1, 2) == q_bucket[..., None]
  want = decode.masked_attention(q, k, v, allowed, scale=0.3)
  read = jax.jit(lambda pages: decode.bucket_attention(q, pages, q_bucket, scale=0.3, read_keys=2 * size))
  got = read(pages)  # in several reads of two pages
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.all(got[0, 0] == 0)  # an empty bucket

  # Every row that is not a key of the query's bucket turns NaN: the result does not change.
  table, counts, q_bucket = np.asarray(pages.table), np.asarray(pages.counts), np.asarray(q_bucket)
  own = np.zeros(pages.k.shape[:4], bool)
  for i in range(b):
    for j in range(n):
      count = counts[i, j, q_bucket[i, j]]
      for rank in range(count):
        own[i, j, table[i, j, q_bucket[i, j], rank // size], rank % size] = True
  poison = lambda rows: jnp.where(own[..., None], rows, jnp.nan)  # noqa: E731
  poisoned = dataclasses.replace(pages, k=poison(pages.k), v=poison(pages.v))
  np.testing.assert_array_equal(read(poisoned), got)


def _full_recompute_sample(model, prompt, steps, key, **sampling):
  """The reference of `generate`: every token from the model on the whole window so far."""
  attention_key, sample_key = jax.random.split(key)
  block = model.config.block_size
  run = nnx.jit(lambda m, window: m(window, rngs=nnx.Rngs(attention=attention_key)))
  sequence, start = np.asarray(prompt), max(0, prompt.shape[1] - block)
  for i in range(prompt.shape[1], prompt.shape[1] + steps):
    if i - start > block:  # the documented slide: start over from the last block // 2 tokens
      start = i - block // 2
    window = np.zeros((sequence.shape[0], block), np.int32)  # fixed shape: one compilation
    window[:, : i - start] = sequence[:, start:i]
    logits = run(model, jnp.asarray(window))[:, i - start - 1]
    token = sample_logits(logits, jax.random.fold_in(sample_key, i), **sampling)
    sequence = np.concatenate([sequence, np.asarray(token)[:, None]], axis=1)
  return sequence


@pytest.mark.parametrize(("name", "prompt_length", "steps", "options"), [
    ("hash", 3, 40, dict(temperature=0.0, page_size=4)),  # slides twice past block_size 16
    ("qk_drop", 20, 8, dict(temperature=1.0, top_k=5)),  # a prompt longer than block_size
])  # fmt: skip
def test_generate_draws_what_recomputing_the_window_draws(name, prompt_length, steps, options, monkeypatch):
  traced = {"prefill": 0, "decode_step": 0}
  for method in traced:
    original = getattr(GPT, method)

    def counting(self, *args, _original=original, _method=method):
      traced[_method] += 1
      return _original(self, *args)

    monkeypatch.setattr(GPT, method, counting)
  model = _model(name, block_size=16)
  prompt = jax.random.randint(jax.random.key(1), (2, prompt_length), 0, CONFIG.vocab_size)
  got = generate(model, prompt, steps=steps, key=jax.random.key(4), **options)
  # Compiled once per shape, not per token: the prompt, the slid window and the step.
  assert traced == {"prefill": 2, "decode_step": 1}, traced
  assert got.shape == (2, prompt_length + steps) and np.array_equal(got[:, :prompt_length], prompt)
  sampling = {name: value for name, value in options.items() if name != "page_size"}
  want = _full_recompute_sample(model, prompt, steps, jax.random.key(4), **sampling)
  np.testing.assert_array_equal(got, want)


def test_sampling_options():
  logits = jnp.log(jnp.array([[0.1, 0.5, 0.15, 0.25]] * 64))
  key = jax.random.key(0)
  assert np.all(sample_logits(logits, key, temperature=0.0) == 1)
  top2 = np.asarray(sample_logits(logits, key, temperature=1.0, top_k=2))
  assert set(top2) == {1, 3}
  assert not np.any(np.asarray(sample_logits(logits, key, temperature=1.0, top_k=None, exclude=(1,))) == 1)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompt": jnp.zeros((1, 1, 3), jnp.int32)}, "prompt"),
        ({"prompt": jnp.zeros((0,), jnp.int32)}, "prompt"),
        ({"steps": -1}, "steps"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"exclude": (61,)}, "exclude"),
    ],
)
def test_generate_rejects_bad_arguments(kwargs, field):
  args = {"prompt": jnp.array([1, 2]), "steps": 3, "key": jax.random.key(0)} | kwargs
  with pytest.raises(ValueError, match=field):
    generate(_model("dense", block_size=16), **args)


def test_cache_rejects_bad_arguments():
  model = _model("dense", block_size=16)
  with pytest.raises(ValueError, match="max_length"):
    model.init_cache(1, 17)
  with pytest.raises(ValueError, match="page_size"):
    model.init_cache(1, 8, page_size=4)  # dense mode has no buckets
  with pytest.raises(ValueError, match="batch_size"):
    model.init_cache(0, 8)
  layer = model.blocks[0].attn
  cache = layer.init_cache(1, 4)
  with pytest.raises(ValueError, match="max_length"):
    layer.prefill(jnp.zeros((1, 5, 32)), cache)
  with pytest.raises(ValueError, match=r"\[B, 1, D\]"):
    layer.decode_step(jnp.zeros((1, 2, 32)), cache)


def test_bench_decode_runs_on_cpu_and_writes_json(tmp_path):
  """The benchmark's CPU smoke test: a tiny preset, one case (--help is argparse's)."""
  out = tmp_path / "bench.json"
  run_script("bench_decode.py", "--preset=cpu_tiny", "--lengths=40", "--batch_sizes=2", "--steps=2",
             "--warmup=1", "--recompute_repeats=1", "--page_size=8", "--modes=hash16_pages,recompute_hash16",
             f"--out={out}")  # fmt: skip
  record = json.loads(out.read_text())
  assert record["versions"]["jax"] == jax.__version__ and "device" in record["versions"]
  rows = {row["mode"]: row for row in record["results"]}
  assert set(rows) == {"hash16_pages", "recompute_hash16"}
  assert all(row["tokens_per_s"] > 0 for row in rows.values())
  assert rows["hash16_pages"]["speedup_vs_recompute"] > 0
  assert 1 / 16 <= rows["hash16_pages"]["largest_bucket_share"] <= 1
