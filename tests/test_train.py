"""Training library: schedule, decay mask, data, tiny runs, resume equality, configs, the script."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scfa_jax import train
from scfa_jax.data import batches, prepared, python_sources
from scfa_jax.model import GPT, GPTConfig
from tests.scripts import run_script

TINY_MODEL = GPTConfig(vocab_size=257, block_size=32, n_layer=1, n_head=2, n_embd=32, num_buckets=4,
                       implementation="xla")  # fmt: skip


def _config(out_dir, **kw) -> train.TrainConfig:
  base = dict(model=TINY_MODEL, batch_size=4, steps=8, eval_every=4, eval_batches=1, log_every=1,
              checkpoint_every=4, sample_tokens=0, out_dir=str(out_dir), lr=3e-3)  # fmt: skip
  return train.TrainConfig(**(base | kw))


def _curve(path) -> list[dict]:
  """The records that do not depend on timing or on the folder: train and eval records without their clocks."""
  records = train.MetricsLog.read(path)
  assert [r["kind"] for r in records].count("run") == 1 and records[0]["kind"] == "run"
  assert records[0]["config"]["out_dir"] == str(Path(path).parent) and records[0]["device"].startswith("cpu")
  timing = ("tokens_per_s", "elapsed_s", "train_s")
  return [{k: v for k, v in r.items() if k not in timing} for r in records[1:]]


def test_schedule_warmup_cosine_floor():
  config = train.TrainConfig(steps=1000, lr=1e-3)
  lr = train.learning_rate(config)
  assert float(lr(0)) == 0.0
  assert math.isclose(float(lr(20)), 1e-3, rel_tol=1e-6)  # 2% warm-up
  assert math.isclose(float(lr(1000)), 2e-4, rel_tol=1e-6)  # floor 0.2 x peak
  assert 2e-4 < float(lr(500)) < 1e-3


def test_weight_decay_only_on_matrices():
  config = train.TrainConfig(model=TINY_MODEL, lr=0.1, weight_decay=0.1, grad_clip=0.0, steps=2, warmup_frac=0.5)
  trainer = train.Trainer.create(config)
  model = trainer.model()
  opt = nnx.Optimizer(model, train.optimizer(config), wrt=nnx.Param)
  before = jax.tree.map(np.array, nnx.state(model, nnx.Param))
  zeros = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
  opt.update(model, zeros)  # step 0 has lr 0: take a second step
  opt.update(model, zeros)
  after = nnx.state(model, nnx.Param)
  for (path, b), a in zip(jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(after), strict=True):
    if b.ndim >= 2:
      assert np.all(np.abs(a) < np.abs(b) + 1e-12) and not np.allclose(a, b), path
    else:
      np.testing.assert_array_equal(a, b)


def test_trainer_takes_a_given_model_and_compiles_its_step_once():
  config = train.TrainConfig(model=TINY_MODEL, batch_size=2, steps=3, checkpoint_every=0)
  model = GPT(dataclasses.replace(TINY_MODEL, attention="dense"), rngs=nnx.Rngs(params=5))
  trainer = train.Trainer.create(config, model=model)
  assert trainer.model().blocks[0].attn.mode == "dense"  # not GPT(config.model), which is hash
  np.testing.assert_array_equal(trainer.model().wte[...], model.wte[...])
  compiled = trainer.compiled_step()
  assert trainer.compiled_step() is compiled and compiled.memory_analysis().temp_size_in_bytes > 0
  tokens = np.arange(5000) % 257
  losses = [float(trainer.train_step(tokens)) for _ in range(3)]
  assert trainer.compiled_step() is compiled and trainer.step == 3 and np.all(np.isfinite(losses))


def test_bucket_balance_reports_every_hash_layer_without_touching_the_train_state():
  model = dataclasses.replace(TINY_MODEL, n_layer=2, block_size=64, num_buckets=4)
  trainer = train.Trainer.create(train.TrainConfig(model=model, batch_size=2, steps=3, checkpoint_every=0))
  tokens = np.arange(5000) % 257
  trainer.train_step(tokens)
  windows = batches.eval_batches(tokens, num_batches=1, batch_size=2, length=64)[0]
  layers = trainer.bucket_balance(windows)
  assert [r["layer"] for r in layers] == ["blocks/0/attn", "blocks/1/attn"]
  for r in layers:
    assert r["num_buckets"] == 4 and 1 <= r["max_over_mean"] <= r["worst_max_over_mean"] <= 4
    assert 0.25 <= r["pair_share"] <= 1
  assert layers == trainer.bucket_balance(windows)  # the evaluation key: deterministic
  before = jax.tree.structure(trainer.state)
  trainer.train_step(tokens)  # the captured call left no Intermediate in the model's state
  assert jax.tree.structure(trainer.state) == before


def test_batches_are_a_function_of_seed_and_step():
  tokens = np.arange(10_000) % 251
  a = batches.train_batch(tokens, seed=1, step=5, shape=(2, 4), length=16)
  assert a.shape == (2, 4, 17) and a.dtype == np.int32
  np.testing.assert_array_equal(a, batches.train_batch(tokens, seed=1, step=5, shape=(2, 4), length=16))
  assert not np.array_equal(a, batches.train_batch(tokens, seed=1, step=6, shape=(2, 4), length=16))
  rows = batches.train_batch(tokens, seed=1, step=5, shape=(2, 4), length=16, rows=slice(2, 4))
  np.testing.assert_array_equal(rows, a[:, 2:])
  np.testing.assert_array_equal(a[..., 1:] - a[..., :-1], np.where(a[..., 1:] == 0, -250, 1))  # contiguous
  positions = np.arange(10_000)  # each token is its own position
  records = batches.train_batch(positions, seed=0, step=0, shape=(8,), length=16, record_length=10)
  assert records.shape == (8, 17) and np.all(records[:, 0] % 10 == 0)  # windows start at records
  assert len(set(records[:, 0])) > 1 and np.all(np.diff(records, axis=-1) == 1)
  fixed = batches.eval_batches(positions, num_batches=3, batch_size=2, length=16, record_length=10)
  assert fixed.shape == (3, 2, 17) and fixed[0, 0, 0] == 0 and np.all(fixed[..., 0] % 10 == 0)
  np.testing.assert_array_equal(np.diff(fixed[..., 0].ravel()) > 0, True)  # spread over the split, in order


def test_python_sources_format_dedup_and_split(tmp_path):
  root, other = tmp_path / "lib", tmp_path / "site"
  files = {f"pkg{i % 3}/m{i}.py": f"x = {i}\n" for i in range(200)} | {"site-packages/c.py": "no", "d.txt": "no"}
  vendored = {"dep/m7.py": "x = 7\n", "dep/new.py": "y = 1\n", "empty.py": ""}  # a copy, a new file, nothing
  for base, tree in ((root, files), (other, vendored)):
    for rel, text in tree.items():
      (base / rel).parent.mkdir(parents=True, exist_ok=True)
      (base / rel).write_text(text)
  expected = sorted(r for r in files if r.startswith("pkg"))
  listed = python_sources.source_files([root, other])
  assert listed == [(root, r) for r in expected] + [(other, r) for r in sorted(vendored)]
  folder = python_sources.prepare(tmp_path / "prepared", roots=[root, other])
  splits, meta = prepared.load(folder)
  assert (meta.vocab_size, meta.unit, meta.eot_token, meta.bits_metric()) == (257, "byte", 256, "bits_per_byte")
  texts = [files[r] for r in expected] + ["y = 1\n"]  # the copy of pkg1/m7.py and the empty file are left out
  for split in ("train", "val"):
    want = "".join(t + "\n<|endoftext|>\n" for t in texts if python_sources.is_validation(t.encode()) == (split == "val"))
    assert want and python_sources.decode(splits[split]) == want
  real = python_sources.source_files(python_sources.stdlib_root())
  assert len(real) > 500 and (python_sources.stdlib_root(), "os.py") in real
  share = np.mean([python_sources.is_validation((root_ / rel).read_bytes()) for root_, rel in real])
  assert 0.02 < share < 0.1
  with pytest.raises(ValueError, match="corpus"):
    python_sources.source_roots("perl")


def test_loss_decreases_and_a_killed_run_resumes_the_same_loss_curve(tmp_path):
  config = _config(tmp_path / "straight", model=dataclasses.replace(TINY_MODEL, attention="qk_drop", drop_rate=0.3),
                   grad_accum=2)  # fmt: skip
  train.train(config, progress=False)
  resumed = dataclasses.replace(config, out_dir=str(tmp_path / "resumed"))
  first = train.train(resumed, progress=False, stop_after=5)  # "killed" after step 5; last checkpoint: 4
  assert first["step"] == 5
  second = train.train(resumed, progress=False)
  assert second["step"] == 8
  straight, again = _curve(tmp_path / "straight/metrics.jsonl"), _curve(tmp_path / "resumed/metrics.jsonl")
  assert [r["step"] for r in again if r["kind"] == "train"] == list(range(1, 9))
  assert again == straight
  evals = [r for r in straight if r["kind"] == "eval"]
  assert [r["step"] for r in evals] == [0, 4, 8]
  clocks = [r["train_s"] for r in train.MetricsLog.read(tmp_path / "straight/metrics.jsonl") if r["kind"] == "eval"]
  assert 0 <= clocks[0] < 0.2 and clocks[0] < clocks[1] < clocks[2]  # no training before the first step, then growing
  assert evals[2]["val_loss"] < evals[1]["val_loss"] < evals[0]["val_loss"] - 0.2  # it learns
  assert math.isclose(evals[-1]["val_bits_per_byte"], evals[-1]["val_loss"] / math.log(2))
  assert (tmp_path / "straight/loss.png").stat().st_size > 1000


def test_registered_configs_and_overrides_through_the_script():
  listed = json.loads(run_script("train_lm.py", "--list_configs").stdout)
  assert {"stdlib_demo", "gpt122m_hash16", "gpt122m_dense"} <= set(listed)
  assert listed["stdlib_demo"]["model"]["attention"] == "hash"  # the default run
  paper = listed["gpt122m_hash16"]
  assert (paper["model"]["n_layer"], paper["model"]["n_embd"], paper["model"]["num_buckets"], paper["lr"]) == (
      12, 768, 16, 1e-3)  # fmt: skip
  overrides = ["--steps=7", "--model.n_layer=2", "--num_buckets=8", "--implementation=none", "--shared_qk=false"]
  c = json.loads(run_script("train_lm.py", *overrides, "--print_config").stdout)
  assert c == listed["stdlib_demo"] | {"steps": 7, "model": listed["stdlib_demo"]["model"] | {
      "n_layer": 2, "num_buckets": 8, "implementation": None, "shared_qk": False}}  # fmt: skip
  for bad, message in [("--nope=1", "unknown field"), ("--steps=x", "expects a int"), ("--num_buckets=3", "num_buckets"),
                       ("--model=1", "group of fields"), ("--config=nope", "unknown config")]:  # fmt: skip
    failed = run_script("train_lm.py", bad, "--print_config", fails=True)
    assert failed.stderr.startswith("error: ") and message in failed.stderr, failed.stderr


def test_main_script_end_to_end(tmp_path):
  out = tmp_path / "run"
  done = run_script("train_lm.py", "--steps=3", "--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=32",
                    "--batch_size=2", "--eval_batches=1", "--sample_tokens=20", f"--out_dir={out}")  # fmt: skip
  assert f"plot:    {out / 'loss.png'}" in done.stdout and f"samples: {out / 'samples.txt'}" in done.stdout
  assert (out / "loss.png").exists() and (out / "samples.txt").read_text().startswith("def ")
  steps = [r["step"] for r in train.MetricsLog.read(out / "metrics.jsonl") if r["kind"] == "train"]
  assert steps[-1] == 3 and (out / "checkpoints").exists()


def test_document_packing_is_on_for_documents_and_off_in_the_comparisons():
  from experiments.configs import quality, stdlib_demo  # noqa: PLC0415

  assert train.TrainConfig().segment_documents
  for config in [*quality.CONFIGS.values(), *stdlib_demo.CONFIGS.values()]:
    assert not config.segment_documents  # dense has no fast document mask: compare on one stream
  segment_ids, positions = batches.document_segments(np.array([[7, 256, 1, 2, 256, 256, 3]]), 256)
  np.testing.assert_array_equal(segment_ids, [[0, 1, 1, 1, 2, 3, 3]])
  np.testing.assert_array_equal(positions, [[0, 0, 1, 2, 0, 0, 1]])
  model = GPT(TINY_MODEL, rngs=nnx.Rngs(params=0))
  windows = jnp.asarray(np.array([[1, 2, 256, 3, 4, 5, 256, 6, 7]] * 2), jnp.int32)
  key = jax.random.key(0)
  loss = nnx.jit(train.cross_entropy, static_argnums=3)
  packed, stream = loss(model, windows, key, 256), loss(model, windows, key, None)
  assert np.isfinite(packed) and packed != stream


def test_source_commit_says_when_the_code_is_not_the_commit(tmp_path):
  git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
  git("init", "-q")
  (tmp_path / "a.py").write_text("x = 1\n")
  git("add", "a.py")
  git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "a")
  clean = train.source_commit(tmp_path)
  assert clean and not clean.endswith("-dirty")
  (tmp_path / "a.py").write_text("x = 2\n")
  assert train.source_commit(tmp_path) == clean + "-dirty"
  assert train.source_commit(tmp_path / "missing") is None
