"""Training the GPT: optimizer, schedule, sharded train step, eval, checkpoints, metrics.

Everything random in a step (the batch, LSH rotations, keep masks) is a pure
function of (seed, step), and the train state is (params, optimizer state): so a run
killed and restarted from its last checkpoint continues the same loss curve.

Data parallelism: one mesh axis 'data' over all devices of all processes; the batch
is split along it (`NamedSharding`), params and optimizer state are replicated, the
step is one `jax.jit` with in/out shardings (pjit), and the attention layers wrap
their kernels in `shard_map` over 'data' (see `scfa_jax.nn.batch_sharded`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from scfa_jax.data import batches, prepared, python_sources
from scfa_jax.model import GPT, GPTConfig, count_params, generate
from scfa_jax.nn import DATA_AXIS, SparseCausalSelfAttention



@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """One training run. Sequences are model.block_size tokens long."""

  data: str = "stdlib"  # "stdlib" or "python" (this machine's Python sources, built on first use), or a prepared folder
  model: GPTConfig = GPTConfig()  # architecture; override fields as --model.<field>=value
  batch_size: int = 16  # sequences per optimizer step, over all devices and micro-batches
  grad_accum: int = 1  # micro-batches per step (batch_size / grad_accum sequences each)
  steps: int = 300  # optimizer steps
  lr: float = 1e-3  # peak learning rate
  warmup_frac: float = 0.02  # share of steps with linear warm-up
  min_lr_frac: float = 0.2  # cosine decays to this share of the peak
  weight_decay: float = 0.1  # AdamW decoupled decay, on matrices (ndim >= 2) only
  b1: float = 0.9  # AdamW beta 1
  b2: float = 0.95  # AdamW beta 2
  grad_clip: float = 1.0  # global-norm clip; 0 turns it off
  eval_every: int = 50  # steps between evaluations (and one at step 0 and at the end)
  eval_batches: int = 8  # micro-batches of the fixed validation set per evaluation
  log_every: int = 10  # steps per train-loss record (the mean over them)
  checkpoint_every: int = 100  # steps between checkpoints (and one at the end); 0: none
  sample_tokens: int = 400  # tokens sampled from the trained model at the end; 0: none
  sample_prompt: str = "def "  # text the byte-level samples start from
  seed: int = 0  # params, batches, LSH rotations and keep masks all derive from it
  # Data made of documents (an eot_token in its metadata): attention stays inside each document
  # of a window (segment ids from end-of-text tokens) and positions restart at each one. False:
  # windows attend across documents, as one stream (what the speed and quality comparisons use:
  # dense attention has no packed-sequence kernel, only a dense mask).
  segment_documents: bool = True
  out_dir: str = "runs/demo"  # metrics.jsonl, loss.png, samples.txt, checkpoints/

  def __post_init__(self):
    for name in ("batch_size", "grad_accum", "steps", "eval_every", "eval_batches", "log_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.batch_size % self.grad_accum:
      raise ValueError(f"grad_accum must divide batch_size, got {self.batch_size=}, {self.grad_accum=}")

  @property
  def micro_batch(self) -> int:
    return self.batch_size // self.grad_accum


# ----------------------------------------------------------------------------- optimizer


def learning_rate(config: TrainConfig) -> optax.Schedule:
  """Linear warm-up to config.lr, then cosine to min_lr_frac * lr at the last step."""
  warmup = max(1, round(config.warmup_frac * config.steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=config.lr,
      warmup_steps=warmup,
      decay_steps=max(config.steps, warmup + 1),
      end_value=config.min_lr_frac * config.lr,
  )


def optimizer(config: TrainConfig) -> optax.GradientTransformation:
  """AdamW with weight decay on matrices only (not LayerNorm scales), after a global-norm clip."""
  adamw = optax.adamw(
      learning_rate(config),
      b1=config.b1,
      b2=config.b2,
      weight_decay=config.weight_decay,
      mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params),
  )
  return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw) if config.grad_clip else adamw


# ----------------------------------------------------------------------------- randomness


def step_key(seed: int, step: int) -> jax.Array:
  """Key of the attention randomness (LSH rotations, keep masks) of one train step."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), step)


def eval_key(seed: int) -> jax.Array:
  """Fixed key of every evaluation: validation losses are deterministic and comparable."""
  return jax.random.fold_in(jax.random.key(seed), 2)


# ----------------------------------------------------------------------------- mesh


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D 'data' mesh over all devices (of all processes), each process's devices contiguous."""
  devices = sorted(jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id))
  return jax.make_mesh(
      (len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
  )


def maybe_initialize_distributed(coordinator_address=None, num_processes=None, process_id=None) -> None:
  """jax.distributed.initialize when launched as one of several processes.

  Explicit arguments win; else JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  JAX_PROCESS_ID; else nothing (one process). On SLURM or Open MPI, pass
  coordinator_address="auto" to let JAX detect the cluster.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
  if not coordinator_address:
    return
  if coordinator_address == "auto":
    jax.distributed.initialize()
    return
  num_processes = int(num_processes if num_processes is not None else env["JAX_NUM_PROCESSES"])
  process_id = int(process_id if process_id is not None else env["JAX_PROCESS_ID"])
  jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)


# ----------------------------------------------------------------------------- steps


def forward(
    model: GPT, tokens: jax.Array, key: jax.Array, eot_token: int | None = None,
    targets: jax.Array | None = None,
) -> jax.Array:  # fmt: skip
  """Logits of tokens int [B, T] (with targets, the cross-entropy of each position: `GPT`);
  with eot_token, each document of a row on its own (`batches.document_segments`)."""
  rngs = nnx.Rngs(attention=key)
  if eot_token is None:
    return model(tokens, rngs=rngs, targets=targets)
  segment_ids, positions = batches.document_segments(tokens, eot_token)
  return model(tokens, segment_ids=segment_ids, positions=positions, rngs=rngs, targets=targets)


def cross_entropy(model: GPT, windows: jax.Array, key: jax.Array, eot_token: int | None = None) -> jax.Array:
  """Mean next-token cross-entropy (nats) over windows int [B, T + 1]; eot_token as in `forward`."""
  return forward(model, windows[:, :-1], key, eot_token, targets=windows[:, 1:]).mean()


@dataclasses.dataclass
class Trainer:
  """Model + optimizer as one replicated state, and the jitted, sharded steps on it."""

  config: TrainConfig
  mesh: jax.sharding.Mesh
  state: dict  # {"model": nnx.State, "optimizer": nnx.State}
  model_def: nnx.GraphDef
  optimizer_def: nnx.GraphDef
  step: int = 0  # optimizer steps done; mirrors state["optimizer"]["step"] without a device sync
  eot_token: int | None = None  # documents separated by this token attend within themselves; None: one stream
  _compiled_step: jax.stages.Compiled | None = None

  @classmethod
  def create(
      cls,
      config: TrainConfig,
      mesh: jax.sharding.Mesh | None = None,
      *,
      model: nnx.Module | None = None,
      eot_token: int | None = None,
  ) -> Trainer:
    """The trainer of `GPT(config.model)`, or of `model` when given (any NNX module called as
    `model(tokens, rngs=nnx.Rngs(attention=key))` -> float32 logits), on `mesh` (all devices).
    With eot_token, the model is called with `segment_ids=` and `positions=` of the documents
    that this token separates (`forward`)."""
    mesh = make_mesh() if mesh is None else mesh
    if config.micro_batch % mesh.size:
      raise ValueError(
          f"batch_size / grad_accum = {config.micro_batch} sequences per micro-batch must split evenly "
          f"over the {mesh.size} devices of the 'data' axis"
      )
    if model is None:
      model = GPT(config.model, rngs=nnx.Rngs(params=config.seed))
    opt = nnx.Optimizer(model, optimizer(config), wrt=nnx.Param)
    model_def, model_state = nnx.split(model)
    optimizer_def, optimizer_state = nnx.split(opt)
    state = jax.device_put({"model": model_state, "optimizer": optimizer_state}, NamedSharding(mesh, P()))
    trainer = cls(config, mesh, state, model_def, optimizer_def, eot_token=eot_token)
    trainer._compile()
    trainer.sync_step()
    return trainer

  def model(self) -> GPT:
    return nnx.merge(self.model_def, self.state["model"])

  def sync_step(self) -> None:
    """Reads the step counter from the state (after create or restore); then counted on the host."""
    self.step = int(jax.device_get(self.state["optimizer"]["step"][...]))

  def _compile(self) -> None:
    model_def, optimizer_def, eot = self.model_def, self.optimizer_def, self.eot_token
    replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(None, DATA_AXIS))  # [micro-batches, B, T + 1]
    self.eval_sharding = NamedSharding(self.mesh, P(DATA_AXIS))  # [B, T + 1]

    def train_step(state, windows, key):
      model = nnx.merge(model_def, state["model"])
      opt = nnx.merge(optimizer_def, state["optimizer"])
      params, rest = nnx.split(model, nnx.Param, ...)[1:]

      def micro_loss(params, windows, key):
        return cross_entropy(nnx.merge(model_def, params, rest), windows, key, eot)

      def accumulate(total, inputs):
        i, micro = inputs
        loss, grads = jax.value_and_grad(micro_loss)(params, micro, jax.random.fold_in(key, i))
        return jax.tree.map(jnp.add, total, (loss, grads)), None

      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
      n = windows.shape[0]
      (loss, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(n), windows))
      loss, grads = jax.tree.map(lambda x: x / n, (loss, grads))
      with jax.named_scope("optimizer"):
        opt.update(model, grads)
      return {"model": nnx.state(model), "optimizer": nnx.state(opt)}, loss

    def eval_step(model_state, windows, key):
      return cross_entropy(nnx.merge(model_def, model_state), windows, key, eot)

    self._train_step = jax.jit(
        train_step,
        in_shardings=(replicated, self.batch_sharding, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    self._eval_step = jax.jit(
        eval_step, in_shardings=(replicated, self.eval_sharding, replicated), out_shardings=replicated
    )

    def bucket_step(model_state, windows, key):
      model = nnx.merge(model_def, model_state)
      for _, layer in nnx.iter_modules(model):
        if isinstance(layer, SparseCausalSelfAttention):
          layer.record_buckets = True
      run = lambda model: forward(model, windows[:, :-1], key, eot)  # noqa: E731
      return nnx.capture(run, nnx.Intermediate)(model)[1]

    self._bucket_step = jax.jit(
        bucket_step, in_shardings=(replicated, self.eval_sharding, replicated), out_shardings=replicated
    )

  def _global(self, local: np.ndarray, sharding: NamedSharding, global_shape) -> jax.Array:
    return jax.make_array_from_process_local_data(sharding, local, global_shape)

  def local_rows(self, batch: int) -> slice:
    """This process's rows of a global batch axis of size `batch`."""
    n = jax.process_count()
    if batch % self.mesh.size:
      raise ValueError(f"a batch of {batch} does not split over {self.mesh.size} devices")
    per = batch // n
    return slice(jax.process_index() * per, (jax.process_index() + 1) * per)

  def train_step(self, tokens: np.ndarray, record_length: int | None = None) -> jax.Array:
    """One optimizer step on the batch of the current step; returns the loss (on device)."""
    c, step = self.config, self.step
    shape = (c.grad_accum, c.micro_batch)
    local = batches.train_batch(
        tokens, seed=c.seed, step=step, shape=shape, length=c.model.block_size,
        rows=self.local_rows(c.micro_batch), record_length=record_length,
    )  # fmt: skip
    windows = self._global(local, self.batch_sharding, (*shape, c.model.block_size + 1))
    with jax.set_mesh(self.mesh):
      self.state, loss = self.compiled_step()(self.state, windows, step_key(c.seed, step))
    self.step += 1
    return loss

  def compiled_step(self) -> jax.stages.Compiled:
    """The train step compiled ahead of time (on first use): `memory_analysis()` gives its memory."""
    if self._compiled_step is None:
      c = self.config
      windows = jax.ShapeDtypeStruct(
          (c.grad_accum, c.micro_batch, c.model.block_size + 1), jnp.int32, sharding=self.batch_sharding
      )
      with jax.set_mesh(self.mesh):
        self._compiled_step = self._train_step.lower(self.state, windows, step_key(c.seed, 0)).compile()
    return self._compiled_step

  def evaluate(self, eval_set: np.ndarray) -> float:
    """Mean loss over the fixed validation windows [num_batches, B, T + 1]."""
    rows = self.local_rows(eval_set.shape[1])
    losses = []
    with jax.set_mesh(self.mesh):
      for i, windows in enumerate(eval_set):
        batch = self._global(windows[rows], self.eval_sharding, windows.shape)
        key = jax.random.fold_in(eval_key(self.config.seed), i)
        losses.append(self._eval_step(self.state["model"], batch, key))
    return float(np.mean(jax.device_get(losses)))

  def bucket_balance(self, windows: np.ndarray) -> list[dict]:
    """Per hash-attention layer, on validation windows [B, T + 1] with the evaluation key: the
    largest bucket over the mean bucket size (averaged over batch rows and heads, and the
    worst head), and the pair share sum((size / T) ** 2), which is 1 / num_buckets for
    uniform buckets and sets how much of causal attention the layer computes."""
    rows = self.local_rows(windows.shape[0])
    with jax.set_mesh(self.mesh):
      batch = self._global(windows[rows], self.eval_sharding, windows.shape)
      captured = self._bucket_step(self.state["model"], batch, eval_key(self.config.seed))
    layers = []
    for path, sizes in jax.tree_util.tree_leaves_with_path(jax.device_get(captured)):
      sizes = np.asarray(sizes, np.float64)  # [B, N, num_buckets]
      share = sizes / sizes.sum(-1, keepdims=True)
      over_mean = share.max(-1) * sizes.shape[-1]
      layers.append({
          "layer": "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path).split("/bucket_sizes")[0],
          "max_over_mean": float(over_mean.mean()), "worst_max_over_mean": float(over_mean.max()),
          "pair_share": float(np.mean(np.sum(share**2, -1))), "num_buckets": sizes.shape[-1],
      })  # fmt: skip
    return layers


# ----------------------------------------------------------------------------- checkpoints


class Checkpoints:
  """orbax CheckpointManager over the trainer state, keyed by step (keeps the last two)."""

  def __init__(self, folder: str | Path):
    import orbax.checkpoint as ocp  # noqa: PLC0415

    self._ocp = ocp
    self.manager = ocp.CheckpointManager(
        Path(folder).absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state) -> None:
    self.manager.save(step, args=self._ocp.args.StandardSave(state))

  def restore(self, step: int, like):
    """Restores into the shapes, dtypes and shardings of `like` (the freshly built state)."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    return self.manager.restore(step, args=self._ocp.args.StandardRestore(abstract))

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


# ----------------------------------------------------------------------------- metrics


class MetricsLog:
  """metrics.jsonl: one JSON object per line, each with "kind" and "step"."""

  def __init__(self, path: str | Path, *, keep_through_step: int = 0, enabled: bool = True):
    """Drops records past keep_through_step: a resumed run rewrites what came after its checkpoint."""
    self.path, self.enabled = Path(path), enabled
    if not enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    kept = [r for r in self.read(self.path) if r["step"] <= keep_through_step]
    self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

  @staticmethod
  def read(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
      return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

  def write(self, record: dict) -> None:
    if self.enabled:
      with self.path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def plot_metrics(records: list[dict], path: str | Path, bits_metric: str = "bits_per_token") -> Path:
  """PNG of train/val loss and val perplexity against step."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  train = [r for r in records if r["kind"] == "train"]
  val = [r for r in records if r["kind"] == "eval"]
  fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4))
  ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
  ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
  ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
  ax_loss.legend()
  ax_bits = ax_loss.secondary_yaxis("right", functions=(lambda x: x / math.log(2), lambda x: x * math.log(2)))
  ax_bits.set_ylabel(bits_metric.replace("_", " "))
  ax_ppl.plot([r["step"] for r in val], [r["val_perplexity"] for r in val], "o-", color="C1")
  ax_ppl.set(xlabel="step", ylabel="perplexity", yscale="log", title="validation perplexity")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return Path(path)


def decode(tokens, meta: prepared.DatasetMeta) -> str:
  """Sample tokens as text: bytes, GPT-2 BPE when tiktoken can load it, else the ids."""
  ids = np.asarray(tokens).tolist()
  if meta.unit in ("byte", "char") and meta.vocab_size <= 257:
    return python_sources.decode(ids)  # bytes; 256 is the end-of-text marker
  if meta.unit == "token" and meta.eot_token == 50256:
    try:
      from scfa_jax.data.openwebtext2 import gpt2_encoding  # noqa: PLC0415

      return gpt2_encoding().decode([t for t in ids if t <= 50256])
    except Exception:  # noqa: BLE001  (no tiktoken, or its BPE files cannot be fetched offline)
      pass
  return " ".join(str(t) for t in ids)


def encode_prompt(text: str, meta: prepared.DatasetMeta) -> np.ndarray:
  if meta.unit in ("byte", "char") and meta.vocab_size <= 257 and text:
    return np.frombuffer(text.encode(), np.uint8).astype(np.int32)
  return np.array([meta.eot_token or 0], np.int32)


# ----------------------------------------------------------------------------- the loop


def load_data(config: TrainConfig) -> tuple[dict[str, np.ndarray], prepared.DatasetMeta]:
  if config.data in python_sources.CORPORA:
    if jax.process_index() == 0:
      python_sources.prepare(corpus=config.data)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # noqa: PLC0415

      multihost_utils.sync_global_devices("python sources prepared")
    return python_sources.load(corpus=config.data)
  return prepared.load(config.data)


def train(config: TrainConfig, *, progress: bool = True, stop_after: int | None = None) -> dict:
  """Trains (resuming from out_dir/checkpoints if any) and returns a summary dict.

  stop_after: stop once this step is reached (tests use it to simulate a kill).
  """
  from tqdm.auto import tqdm  # noqa: PLC0415

  lead = jax.process_index() == 0
  say = tqdm.write if lead else (lambda *_: None)
  out = Path(config.out_dir)
  splits, meta = load_data(config)
  if meta.vocab_size > config.model.vocab_size:
    raise ValueError(f"data vocab_size={meta.vocab_size} > model vocab_size={config.model.vocab_size}")
  trainer = Trainer.create(config, eot_token=meta.eot_token if config.segment_documents else None)
  checkpoints = Checkpoints(out / "checkpoints") if config.checkpoint_every else None
  start = checkpoints.latest_step() if checkpoints else None
  if start is not None:
    trainer.state = checkpoints.restore(start, trainer.state)
    trainer.sync_step()
    say(f"resumed from {out / 'checkpoints'} at step {start}")
  start = start or 0
  log = MetricsLog(out / "metrics.jsonl", keep_through_step=start, enabled=lead)
  bits_name = meta.bits_metric()
  tokens_per_step = config.batch_size * config.model.block_size
  say(
      f"GPT {count_params(trainer.model()) / 1e6:.2f}M parameters | {config.model.n_layer} layers x "
      f"{config.model.n_head} heads x {config.model.n_embd // config.model.n_head} | attention="
      f"{config.model.attention} | data {meta.name} ({len(splits['train']) / 1e6:.1f}M train tokens) | "
      f"{tokens_per_step} tokens/step on {trainer.mesh.size} {jax.devices()[0].platform} device(s) "
      f"in {jax.process_count()} process(es)"
  )
  eval_set = batches.eval_batches(
      splits["val"], num_batches=config.eval_batches, batch_size=config.micro_batch,
      length=config.model.block_size, record_length=meta.record_length,
  )  # fmt: skip

  clock = _TrainClock()

  def evaluate(step: int) -> dict:
    loss = trainer.evaluate(eval_set)
    record = {"kind": "eval", "step": step, "val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0)),
              "train_s": clock.train_s()}  # fmt: skip
    record[f"val_{bits_name}"] = prepared.bits(loss)
    log.write(record)
    if config.model.attention == "hash":
      log.write({"kind": "buckets", "step": step, "layers": trainer.bucket_balance(eval_set[0])})
    say(
        f"step {step:6d} | val loss {loss:.4f} | val ppl {record['val_perplexity']:.2f} | "
        f"{bits_name} {record[f'val_{bits_name}']:.3f}"
    )
    return record

  if start == 0:
    log.write({"kind": "run", "step": 0, "config": dataclasses.asdict(config), **run_info()})
    with clock.paused():
      last_eval = evaluate(0)
  else:
    last_eval = next((r for r in reversed(MetricsLog.read(log.path)) if r["kind"] == "eval"), None)
    if start >= config.steps:
      say(f"{out} holds a finished run ({start} steps): delete it or pass another --out_dir to train again")
  end = config.steps if stop_after is None else min(config.steps, stop_after)
  bar = tqdm(
      total=config.steps, initial=start, disable=not (progress and lead), unit="step", dynamic_ncols=True
  )
  with clock.paused():
    trainer.compiled_step()  # compiled before the clock runs: train_s counts training steps only
  pending, tokens_since, train_s_last = [], 0, clock.train_s()
  schedule = learning_rate(config)
  for step in range(start, end):
    pending.append(trainer.train_step(splits["train"], meta.record_length))
    done = step + 1
    tokens_since += tokens_per_step
    if done % config.log_every == 0 or done == end:
      losses = np.asarray(jax.device_get(pending))
      train_s = clock.train_s()
      rate = tokens_since / max(train_s - train_s_last, 1e-9)
      log.write({"kind": "train", "step": done, "loss": float(losses.mean()), "lr": float(schedule(step)),
                 "tokens_per_s": rate, "train_s": train_s, "elapsed_s": clock.elapsed_s()})  # fmt: skip
      bar.set_postfix(loss=f"{losses.mean():.3f}", tok_s=f"{rate:,.0f}")
      pending, train_s_last, tokens_since = [], train_s, 0
    bar.update(1)
    evaluating = done % config.eval_every == 0 or done == config.steps
    saving = checkpoints and (done % config.checkpoint_every == 0 or done == config.steps)
    if evaluating or saving:
      jax.block_until_ready(trainer.state)  # the steps so far count as training time
      with clock.paused():
        if evaluating:
          last_eval = evaluate(done)
          if lead:
            plot_metrics(MetricsLog.read(log.path), out / "loss.png", bits_name)
        if saving:
          checkpoints.save(done, trainer.state)
  bar.close()
  if checkpoints:
    checkpoints.close()
  summary = {**(last_eval or {}), "step": trainer.step, "out_dir": str(out)}
  summary["metrics"] = str(out / "metrics.jsonl")
  summary.pop("kind", None)
  if trainer.step == config.steps and config.sample_tokens:
    text = sample_text(trainer, config, meta)  # on every process: the state is one global array
    if lead:
      (out / "samples.txt").write_text(text)
      summary["samples"] = str(out / "samples.txt")
      say(f"--- sample (prompt {config.sample_prompt!r}) ---\n{text}\n--- end of sample ---")
  if lead and trainer.step == config.steps:
    summary["plot"] = str(plot_metrics(MetricsLog.read(log.path), out / "loss.png", bits_name))
  return summary


class _TrainClock:
  """Wall time since the run started, and training time: the same minus the time spent in
  `paused()` blocks (compilation, evaluation, plots, checkpoints), so that runs of
  different modes compare by the time their steps took."""

  def __init__(self):
    self.start, self.pause_s, self.paused_since = time.perf_counter(), 0.0, None

  def elapsed_s(self) -> float:
    return time.perf_counter() - self.start

  def train_s(self) -> float:
    current = 0.0 if self.paused_since is None else time.perf_counter() - self.paused_since
    return self.elapsed_s() - self.pause_s - current

  @contextlib.contextmanager
  def paused(self):
    self.paused_since = time.perf_counter()
    try:
      yield
    finally:
      self.pause_s += time.perf_counter() - self.paused_since
      self.paused_since = None


def run_info() -> dict:
  """Device, library versions and commit, recorded with every run's metrics."""
  from importlib import metadata  # noqa: PLC0415

  versions = {}
  for name in ("jax", "jaxlib", "flax", "optax", "triton", "jax-triton"):
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      versions[name] = None
  device = jax.devices()[0]
  return {"device": f"{device.platform}:{getattr(device, 'device_kind', '?')} x{jax.device_count()}",
          "versions": versions, "commit": source_commit()}  # fmt: skip


def source_commit(folder: str | Path | None = None) -> str | None:
  """The commit of the checkout holding `folder` (this package's by default), with "-dirty"
  when its tracked files differ from it (the code that ran is then not that commit's); None
  outside a git checkout."""
  try:
    return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True,
                          text=True, timeout=10, cwd=folder or Path(__file__).parent, check=True).stdout.strip()  # fmt: skip
  except (OSError, subprocess.SubprocessError):
    return None


def sample_text(trainer: Trainer, config: TrainConfig, meta: prepared.DatasetMeta) -> str:
  prompt = encode_prompt(config.sample_prompt, meta)
  tokens = generate(
      trainer.model(), jnp.asarray(prompt), steps=config.sample_tokens,
      key=jax.random.fold_in(jax.random.key(config.seed), 3),
  )  # fmt: skip
  return decode(jax.device_get(tokens), meta)
