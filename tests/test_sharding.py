"""Data parallelism: 8 virtual CPU devices, and two processes on localhost, agree with one device.

XLA flags and jax.distributed must be set before JAX starts, so each case runs a
small script in fresh Python subprocesses and compares numbers printed as JSON.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

_COMMON = """
import dataclasses, json, sys
import jax, numpy as np
from scfa_jax import train
from scfa_jax.model import GPTConfig

def config(attention, **kw):
  model = GPTConfig(vocab_size=257, block_size=32, n_layer=1, n_head=2, n_embd=32, num_buckets=4,
                    drop_rate=0.3, attention=attention, compute_dtype="float32", implementation="xla")
  return train.TrainConfig(model=model, batch_size=16, grad_accum=2, lr=3e-3, steps=10, seed=3, **kw)

tokens = (np.arange(50_000) * 7919 % 257).astype(np.uint16)  # any fixed stream works
val = tokens[:2_000]
"""


def _run(script: str, env_extra: dict | None = None, timeout: int = 240) -> subprocess.Popen:
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", **(env_extra or {}))
  env.pop("XLA_FLAGS", None)
  env.update(env_extra or {})
  return subprocess.Popen(
      [sys.executable, "-c", textwrap.dedent(_COMMON) + textwrap.dedent(script)],
      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
  )  # fmt: skip


def _result(proc: subprocess.Popen, timeout: int = 240) -> dict:
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-4000:]
  return json.loads(out.strip().splitlines()[-1])


def test_sharded_step_equals_unsharded_on_8_virtual_devices():
  script = """
  assert len(jax.devices()) == 8
  results = {}
  for attention in ("hash", "qk_drop"):
    per_mesh = []
    for devices in (jax.devices()[:1], jax.devices()):
      trainer = train.Trainer.create(config(attention), mesh=train.make_mesh(devices))
      loss = trainer.train_step(tokens)
      params = jax.tree.leaves(jax.device_get(trainer.state["model"]))
      per_mesh.append((float(loss), [np.asarray(p).tolist() for p in params], trainer.evaluate(val[None, :8 * 33].reshape(1, 8, 33))))
    shards = trainer.state["model"]["wte"][...].sharding
    results[attention] = {"one": per_mesh[0], "eight": per_mesh[1], "replicated": shards.is_fully_replicated}
  # The attention kernels run inside shard_map over 'data' when the mesh is active.
  mesh = train.make_mesh()
  trainer = train.Trainer.create(config("hash"), mesh=mesh)
  windows = np.zeros((2, 8, 33), np.int32)
  with jax.set_mesh(mesh):
    text = str(jax.make_jaxpr(trainer._train_step)(trainer.state, windows, train.step_key(0, 0)))
  results["shard_map"] = "shard_map" in text
  print(json.dumps(results))
  """
  results = _result(_run(script, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}))
  assert results.pop("shard_map")
  for attention, r in results.items():
    (loss1, params1, val1), (loss8, params8, val8) = r["one"], r["eight"]
    assert r["replicated"], attention
    assert abs(loss1 - loss8) < 1e-5, (attention, loss1, loss8)
    assert abs(val1 - val8) < 1e-5, (attention, val1, val8)
    for a, b in zip(params1, params8, strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=1e-4, err_msg=attention)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_on_localhost_agree_with_one(tmp_path):
  script = """
  if len(sys.argv) > 1 or "PROCESS_ID" in __import__("os").environ:
    import os
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    train.maybe_initialize_distributed(os.environ["COORD"], 2, int(os.environ["PROCESS_ID"]))
    assert jax.process_count() == 2 and len(jax.devices()) == 2
  trainer = train.Trainer.create(config("hash"))
  losses = [float(trainer.train_step(tokens)) for _ in range(3)]
  val_loss = trainer.evaluate(val[: 8 * 33].reshape(1, 8, 33))
  wte = np.asarray(jax.device_get(trainer.state["model"]["wte"][...].addressable_data(0)))
  print(json.dumps({"losses": losses, "val": val_loss, "wte_sum": float(wte.sum()), "wte_abs": float(np.abs(wte).sum())}))
  """
  port = _free_port()
  procs = [_run(script, {"COORD": f"localhost:{port}", "PROCESS_ID": str(i)}) for i in range(2)]
  single = _result(_run(script))
  multi = [_result(p) for p in procs]
  assert multi[0] == multi[1]  # replicated state: both hosts hold the same numbers
  np.testing.assert_allclose(multi[0]["losses"], single["losses"], rtol=1e-5)
  assert single["losses"][-1] < single["losses"][0]
  for k in ("val", "wte_sum", "wte_abs"):
    np.testing.assert_allclose(multi[0][k], single[k], rtol=1e-4, atol=1e-5)
