"""The paper's corpora on small fixtures the tests write: enwik8, OpenWebText2, MNIST (tfds mock).

Real downloads cannot run here; each loader is checked on data of the real format:
splits, token ranges, record alignment, resumability, skipping when prepared, the
messages for missing input, and that no document crosses the train/validation cut.
"""

from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import zstandard

from scfa_jax.data import batches, enwik8, mnist, openwebtext2, prepared
from tests.scripts import run_script


# ----------------------------------------------------------------------------- enwik8


@pytest.fixture
def enwik8_bytes() -> bytes:
  rng = np.random.default_rng(0)
  return bytes(range(256)) + rng.integers(0, 256, 1744, dtype=np.uint8).tobytes()  # 2000 bytes


def test_enwik8_split_from_zip_and_raw_file(tmp_path, enwik8_bytes):
  (tmp_path / "enwik8").write_bytes(enwik8_bytes)
  with zipfile.ZipFile(tmp_path / "enwik8.zip", "w") as archive:
    archive.writestr("enwik8", enwik8_bytes)
  data = np.frombuffer(enwik8_bytes, np.uint8)
  for source, out in [(tmp_path / "enwik8.zip", "from_zip"), (tmp_path / "enwik8", "from_raw")]:
    folder = enwik8.prepare(source, tmp_path / out, expected_bytes=None)
    splits, meta = prepared.load(folder)
    assert (meta.vocab_size, meta.dtype, meta.unit, meta.bits_metric()) == (
      256,
      "uint8",
      "char",
      "bits_per_char",
    )
    np.testing.assert_array_equal(splits["train"], data[:1800])  # 90%
    np.testing.assert_array_equal(splits["val"], data[1800:1900])  # next 5%
    np.testing.assert_array_equal(enwik8.load_test(folder), data[1900:])  # last 5%
  assert enwik8.split_bounds(enwik8.ENWIK8_BYTES) == (90_000_000, 95_000_000)


def test_enwik8_prepared_folder_is_skipped_and_size_is_checked(tmp_path, enwik8_bytes):
  (tmp_path / "enwik8").write_bytes(enwik8_bytes)
  folder = enwik8.prepare(tmp_path, tmp_path / "out", expected_bytes=None)  # a folder holding the file
  stamp = (folder / "train.bin").stat().st_mtime_ns
  enwik8.prepare(tmp_path / "nowhere", folder)  # prepared: the source is not even looked at
  assert (folder / "train.bin").stat().st_mtime_ns == stamp
  with pytest.raises(ValueError, match="expected_bytes=100,000,000"):
    enwik8.prepare(tmp_path / "enwik8", tmp_path / "other")


def test_enwik8_missing_file_says_what_to_download(tmp_path):
  failed = run_script("prepare_enwik8.py", "--input", str(tmp_path / "missing.zip"), "--out", str(tmp_path / "out"),
                      fails=True)  # fmt: skip
  assert enwik8.URL in failed.stderr and "--input" in failed.stderr and "missing.zip" in failed.stderr


# ----------------------------------------------------------------------------- OpenWebText2


def _documents(shard: int, count: int) -> list[str]:
  return [f"shard {shard} document {i}: " + "word " * (i % 7) + "ünïcode ✓" for i in range(count)]


def _write_shards(folder: Path, counts=(40, 25, 35)) -> list[str]:
  folder.mkdir(parents=True, exist_ok=True)
  everything = []
  for shard, count in enumerate(counts):
    docs = _documents(shard, count)
    lines = "".join(json.dumps({"text": d, "meta": {"shard": shard}}) + "\n" for d in docs)
    (folder / f"2020-{shard + 1:02d}.jsonl.zst").write_bytes(
      zstandard.ZstdCompressor().compress(lines.encode())
    )
    everything += docs
  return everything


def _split_documents(tokens: np.ndarray, eot: int) -> list[str]:
  assert tokens.size and tokens[-1] == eot, "every document ends with end-of-text"
  documents = np.split(np.asarray(tokens), np.flatnonzero(tokens == eot) + 1)[:-1]
  return [bytes(doc[:-1].astype(np.uint8)).decode() for doc in documents]


def _prepare_owt(source, folder, **kw) -> Path:
  kw = {"encoder": openwebtext2.ByteEncoder(), "val_fraction": 0.2, "workers": 1, "progress": False} | kw
  return openwebtext2.prepare(source, folder, **kw)


def test_openwebtext2_documents_stay_whole_on_one_side(tmp_path):
  docs = _write_shards(tmp_path / "owt2")
  folder = _prepare_owt(tmp_path / "owt2", tmp_path / "out")
  splits, meta = prepared.load(folder)
  assert (meta.dtype, meta.unit, meta.eot_token, meta.vocab_size) == ("uint16", "token", 256, 257)
  train, val = (_split_documents(splits[s], meta.eot_token) for s in ("train", "val"))
  assert sorted(train + val) == sorted(docs)  # every document exactly once, never cut
  assert not set(train) & set(val)
  assert 0.05 < len(val) / len(docs) < 0.4  # about val_fraction=0.2 of 100 documents
  assert int(max(splits["train"].max(), splits["val"].max())) < meta.vocab_size
  assert not (folder / "shards").exists()  # per-shard files removed once joined


def test_openwebtext2_resumes_after_an_interruption_and_skips_when_prepared(tmp_path):
  _write_shards(tmp_path / "owt2")
  reference = _prepare_owt(tmp_path / "owt2", tmp_path / "reference")

  class FailsOnThirdShard(openwebtext2.ByteEncoder):
    calls = 0

    def encode_batch(self, texts):
      if texts[0].startswith("shard 2"):
        raise KeyboardInterrupt  # the run is killed during the last shard
      type(self).calls += 1
      return super().encode_batch(texts)

  with pytest.raises(KeyboardInterrupt):
    _prepare_owt(tmp_path / "owt2", tmp_path / "out", encoder=FailsOnThirdShard())
  assert not prepared.is_prepared(tmp_path / "out")
  assert sorted(p.name for p in (tmp_path / "out" / "shards").glob("*.done.json")) == [
      "2020-01.jsonl.zst.done.json", "2020-02.jsonl.zst.done.json"]  # fmt: skip

  class Counting(openwebtext2.ByteEncoder):
    shards: ClassVar[list[str]] = []

    def encode_batch(self, texts):
      type(self).shards.append(texts[0].split(":")[0])
      return super().encode_batch(texts)

  _prepare_owt(tmp_path / "owt2", tmp_path / "out", encoder=Counting())
  assert Counting.shards == ["shard 2 document 0"]  # only the unfinished shard was encoded again
  for split in ("train", "val"):
    assert (tmp_path / "out" / f"{split}.bin").read_bytes() == (reference / f"{split}.bin").read_bytes()
  Counting.shards.clear()
  _prepare_owt(tmp_path / "nowhere", tmp_path / "out", encoder=Counting())  # prepared: nothing read
  assert Counting.shards == []


def test_openwebtext2_parallel_workers_and_txt_folders_give_the_same_kind_of_output(tmp_path):
  docs = _write_shards(tmp_path / "owt2", counts=(30, 30))
  serial = _prepare_owt(tmp_path / "owt2", tmp_path / "serial")
  parallel = _prepare_owt(tmp_path / "owt2", tmp_path / "parallel", workers=2)
  for split in ("train", "val"):
    assert (serial / f"{split}.bin").read_bytes() == (parallel / f"{split}.bin").read_bytes()
  text_folder = tmp_path / "txt"
  for i, doc in enumerate(docs):
    (text_folder / f"sub{i % 3}").mkdir(parents=True, exist_ok=True)
    (text_folder / f"sub{i % 3}" / f"{i:04d}.txt").write_text(doc)
  splits, _ = prepared.load(_prepare_owt(text_folder, tmp_path / "from_txt"))
  assert sorted(_split_documents(splits["train"], 256) + _split_documents(splits["val"], 256)) == sorted(docs)


def test_openwebtext2_refuses_other_settings_in_a_half_done_folder(tmp_path):
  _write_shards(tmp_path / "owt2")
  work = tmp_path / "out" / "shards"
  work.mkdir(parents=True)
  (work / "manifest.json").write_text(
    json.dumps({"encoder": "bytes", "seed": 1, "val_fraction": 0.2, "shards": []})
  )
  with pytest.raises(ValueError, match="other input or settings"):
    _prepare_owt(tmp_path / "owt2", tmp_path / "out")


def test_openwebtext2_missing_input_and_missing_bpe_give_one_clear_message(tmp_path):
  failed = run_script("prepare_openwebtext2.py", "--input", str(tmp_path / "missing"), "--out", str(tmp_path / "out"),
                      fails=True)  # fmt: skip
  assert "openwebtext2.jsonl.zst.tar" in failed.stderr and "tar xf" in failed.stderr
  with pytest.raises(FileNotFoundError, match="vocab.bpe"):
    openwebtext2.gpt2_encoding(bpe_dir=tmp_path)
  (tmp_path / "vocab.bpe").write_text("#version: 0.2\nĠ t\n")
  (tmp_path / "encoder.json").write_text("{}")
  with pytest.raises(ValueError, match="not the GPT-2 file"):
    openwebtext2.gpt2_encoding(bpe_dir=tmp_path)


def _gpt2_or_skip():
  try:
    return openwebtext2.gpt2_encoding()
  except RuntimeError as error:
    pytest.skip(f"the GPT-2 BPE files are not available offline here: {str(error)[:120]}")


def test_openwebtext2_real_gpt2_bpe(tmp_path):
  encoding = _gpt2_or_skip()
  assert encoding.encode_ordinary("Hello world") == [15496, 995]
  assert encoding.eot_token == openwebtext2.EOT
  docs = _write_shards(tmp_path / "owt2", counts=(20,))
  splits, meta = prepared.load(
    _prepare_owt(tmp_path / "owt2", tmp_path / "out", encoder=openwebtext2.GPT2Encoder())
  )
  assert (meta.vocab_size, meta.eot_token) == (50304, 50256)
  tokens = np.concatenate([splits["train"], splits["val"]])
  assert int((tokens == 50256).sum()) == len(docs) and int(tokens.max()) <= 50256


def test_openwebtext2_without_network_says_how_to_get_the_bpe():
  try:
    openwebtext2.gpt2_encoding()
  except RuntimeError as error:
    assert "vocab.bpe" in str(error) and "--bpe_dir" in str(error)
  else:
    pytest.skip("tiktoken loaded the GPT-2 BPE (online or cached): nothing missing to report")


# ----------------------------------------------------------------------------- MNIST


@pytest.fixture(scope="module")
def mock_mnist(tmp_path_factory) -> Path:
  tfds = pytest.importorskip("tensorflow_datasets")
  folder = tmp_path_factory.mktemp("mnist") / "prepared"
  with tfds.testing.mock_data(num_examples=12):
    mnist.prepare(folder)
    images = mnist.load_tfds("train")
  np.save(folder.parent / "train_images.npy", images)
  return folder


def test_mnist_records_are_whole_images(mock_mnist):
  splits, meta = prepared.load(mock_mnist)
  assert (meta.vocab_size, meta.unit, meta.bits_metric(), meta.record_length) == (
    257,
    "pixel",
    "bits_per_dim",
    785,
  )
  images = np.load(mock_mnist.parent / "train_images.npy")
  for split in ("train", "val"):
    records = np.asarray(splits[split]).reshape(-1, 785)
    assert len(records) == 12 and np.all(records[:, 0] == mnist.BOS) and records[:, 1:].max() < 256
  np.testing.assert_array_equal(mnist.tokens_to_images(splits["train"]), images)  # raster order round trip
  windows = batches.train_batch(splits["train"], seed=0, step=3, shape=(2, 5), length=784, record_length=785)
  assert windows.shape == (2, 5, 785) and np.all(windows[..., 0] == mnist.BOS)  # a window is one image
  assert np.all(windows[..., 1:] < 256)
  evals = batches.eval_batches(splits["val"], num_batches=2, batch_size=3, length=784, record_length=785)
  assert np.all(evals[..., 0] == mnist.BOS) and np.all(evals[..., 1:] < 256)


def test_mnist_grid_png(tmp_path):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 257, (10, 784))  # a stray start token shows as black
  path = mnist.save_grid(tokens, tmp_path / "grid.png", columns=4, title="samples")
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert mnist.tokens_to_images(np.concatenate([[256], tokens[0]])).shape == (1, 28, 28)
  with pytest.raises(ValueError, match="shape"):
    mnist.tokens_to_images(np.zeros((3, 100)))


def test_mnist_trains_end_to_end_on_tfds_mock_data(mock_mnist, tmp_path):
  from scfa_jax import train  # noqa: PLC0415

  tiny = [
    "--n_layer=1",
    "--n_head=2",
    "--n_embd=32",
    "--num_buckets=4",
    "--implementation=xla",
    "--compute_dtype=float32",
  ]
  run = ["--steps=3", "--batch_size=4", "--grad_accum=2", "--eval_every=3", "--eval_batches=1", "--log_every=1",
         "--checkpoint_every=3", "--sample_tokens=0", f"--data={mock_mnist}", f"--out_dir={tmp_path / 'run'}"]  # fmt: skip
  run_script("train_lm.py", "--config=mnist_hash8", *tiny, *run)
  evals = [r for r in train.MetricsLog.read(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"]
  assert evals[-1]["step"] == 3 and np.isfinite(evals[-1]["val_loss"])
  assert evals[-1]["val_loss"] < np.log(257) + 0.5  # about uniform over pixel values at init, not diverged
  assert evals[-1]["val_bits_per_dim"] == pytest.approx(evals[-1]["val_loss"] / np.log(2))
  done = run_script("sample_mnist.py", "--config=mnist_hash8", *tiny, *run, f"--png={tmp_path / 's.png'}", "--num=4")
  assert done.stdout.strip() == f"samples: {tmp_path / 's.png'}"
  assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- paper configs


def test_paper_configs_match_the_paper():
  found = json.loads(run_script("train_lm.py", "--list_configs").stdout)
  lm = {n: c for n, c in found.items() if n.startswith("owt2_")}
  assert sorted(lm) == sorted(
    [f"owt2_{a}_{t}" for a in ("dense", "hash8", "hash16", "hash32") for t in ("8k", "16k")]
    + [f"owt2_drop{p}_8k" for p in (30, 50, 70)]
  )
  for name, c in lm.items():
    m = c["model"]
    assert (m["n_layer"], m["n_embd"], m["n_head"], m["vocab_size"], m["shared_qk"]) == (12, 768, 12, 50304, True)
    assert (c["steps"], c["lr"], c["warmup_frac"], c["min_lr_frac"], c["b2"], c["weight_decay"]) == (
      15000,
      1e-3,
      0.02,
      0.2,
      0.95,
      0.1,
    )
    assert (m["block_size"], c["batch_size"]) == ((8192, 64) if name.endswith("_8k") else (16384, 30)), name
    assert c["data"] == "runs/data/openwebtext2" and c["out_dir"] == f"runs/{name}"
  assert lm["owt2_hash32_16k"]["model"]["num_buckets"] == 32 and lm["owt2_dense_8k"]["model"]["attention"] == "dense"
  assert (lm["owt2_drop70_8k"]["model"]["attention"], lm["owt2_drop70_8k"]["model"]["drop_rate"]) == ("qk_drop", 0.7)
  enwik = found["enwik8_hash8_4k"]
  assert (enwik["model"]["vocab_size"], enwik["model"]["block_size"], enwik["data"]) == (256, 4096, "runs/data/enwik8")
  image = found["mnist_hash8"]["model"]
  assert image["block_size"] + 1 == mnist.RECORD_LENGTH and image["vocab_size"] == mnist.VOCAB_SIZE


def test_mnist_from_idx_files_without_tfds(tmp_path):
  rng = np.random.default_rng(0)
  images = {
    "train": rng.integers(0, 256, (5, 28, 28), np.uint8),
    "test": rng.integers(0, 256, (3, 28, 28), np.uint8),
  }
  for split, stem in mnist.IDX_FILES.items():
    header = np.array([2051, len(images[split]), 28, 28], ">u4").tobytes()
    (tmp_path / f"{stem}.gz").write_bytes(gzip.compress(header + images[split].tobytes()))
  run_script("prepare_mnist.py", "--idx_dir", str(tmp_path), "--out", str(tmp_path / "out"))
  splits, meta = prepared.load(tmp_path / "out")
  assert meta.record_length == 785
  np.testing.assert_array_equal(mnist.tokens_to_images(splits["train"]), images["train"])
  np.testing.assert_array_equal(mnist.tokens_to_images(splits["val"]), images["test"])
  failed = run_script("prepare_mnist.py", "--idx_dir", str(tmp_path / "empty"), "--out", str(tmp_path / "out2"),
                      fails=True)  # fmt: skip
  assert f"lacks train-images-idx3-ubyte.gz: download {mnist.IDX_URL}train-images-idx3-ubyte.gz" in failed.stderr


def test_mnist_samples_txt_to_png(tmp_path):
  tokens = np.concatenate([[256], np.arange(784) % 256])  # what train_lm.py writes: start token + one image
  (tmp_path / "samples.txt").write_text(" ".join(map(str, tokens)))
  done = run_script("sample_mnist.py", f"--samples_txt={tmp_path / 'samples.txt'}")
  assert done.stdout.strip() == f"samples: {tmp_path / 'samples.png'}"
  assert (tmp_path / "samples.png").read_bytes()[:4] == b"\x89PNG"
