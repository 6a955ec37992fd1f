"""OpenWebText2 as GPT-2 BPE tokens: the paper's language-modelling corpus.

Input: the EleutherAI release (openwebtext2.jsonl.zst.tar, extracted: a folder of
*.jsonl.zst shards, one JSON object per line with the document in "text"), or a
folder of .txt files (one document each). Each document is encoded with the GPT-2
BPE of tiktoken (`encode_ordinary`: text that looks like a special token stays text)
and followed by the end-of-text token 50256; the vocabulary is padded to 50304 (a
multiple of 64, as in the paper and nanoGPT). Tokens are uint16.

Validation split: 0.05% of the documents with seed 2357, the fraction and seed of the
paper's data code (HuggingFace `train_test_split(test_size=0.0005, seed=2357)`). The
draw here is per document from a generator seeded by (seed, shard name), so each
shard is decided on its own: the split never depends on which shards were done in an
earlier, interrupted run (it is the same fraction, not the same documents as HF's).

Preparation is resumable: each shard is encoded into folder/shards/<name>.{train,val}.bin
and marked done by <name>.done.json; a rerun skips done shards; once all are done they
are concatenated (in shard order) into train.bin / val.bin, and a prepared folder is
skipped entirely.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from scfa_jax.data import prepared

EOT = 50256  # GPT-2 <|endoftext|>
PADDED_VOCAB = 50304  # 50257 rounded up to a multiple of 64
VAL_FRACTION = 0.0005
SEED = 2357
TXT_PER_SHARD = 2000  # .txt documents per resumable unit
CHUNK_DOCS = 1024  # documents encoded per call
DEFAULT_FOLDER = Path("runs") / "data" / "openwebtext2"
RELEASE = "https://openwebtext2.readthedocs.io/ (file openwebtext2.jsonl.zst.tar, about 28 GB)"
BPE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
# sha256 of vocab.bpe and encoder.json, as tiktoken_ext.openai_public checks them.
GPT2_SHA256 = (
  "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
  "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
)


def missing_message(source) -> str:
  return (
    f"no OpenWebText2 documents found at {source}: expected a folder of *.jsonl.zst shards "
    f"(each line a JSON object with a 'text' field) or of *.txt files. Download the EleutherAI "
    f"release from {RELEASE}, extract it with 'tar xf openwebtext2.jsonl.zst.tar -C data/openwebtext2', "
    "then run: python experiments/prepare_openwebtext2.py --input data/openwebtext2"
  )


# ----------------------------------------------------------------------------- encoders


def gpt2_encoding(bpe_dir: str | os.PathLike | None = None):
  """tiktoken's "gpt2" encoding; from local vocab.bpe + encoder.json when bpe_dir is given.

  tiktoken downloads those two files on first use and caches them (TIKTOKEN_CACHE_DIR, else
  the temp folder's data-gym-cache); offline, bpe_dir points at a copy of them.
  """
  import tiktoken  # noqa: PLC0415
  from tiktoken.load import data_gym_to_mergeable_bpe_ranks  # noqa: PLC0415
  from tiktoken_ext import openai_public  # noqa: PLC0415

  if bpe_dir is None:
    try:
      return tiktoken.get_encoding("gpt2")
    except Exception as error:  # noqa: BLE001  (requests' network errors, hash mismatch...)
      raise RuntimeError(
        f"tiktoken could not load the GPT-2 BPE ({type(error).__name__}: {error}). It downloads "
        f"vocab.bpe and encoder.json from {BPE_URL} on first use. Offline: download those two files "
        "elsewhere, copy them into one folder and pass it as --bpe_dir (or bpe_dir=...)"
      ) from None
  folder = Path(bpe_dir)
  files = [folder / "vocab.bpe", folder / "encoder.json"]
  missing = [str(f) for f in files if not f.is_file()]
  if missing:
    raise FileNotFoundError(f"bpe_dir={str(bpe_dir)!r} lacks {missing}; download them from {BPE_URL}")
  for path, expected in zip(files, GPT2_SHA256, strict=True):
    if hashlib.sha256(path.read_bytes()).hexdigest() != expected:
      raise ValueError(
        f"{path} is not the GPT-2 file (sha256 differs from {expected}); download it from {BPE_URL}"
      )
  ranks = data_gym_to_mergeable_bpe_ranks(str(files[0]), str(files[1]))
  return tiktoken.Encoding(
      name="gpt2", pat_str=openai_public.r50k_pat_str, mergeable_ranks=ranks,
      special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=EOT + 1,
  )  # fmt: skip


class GPT2Encoder:
  """The real encoder; picklable (worker processes load the BPE themselves)."""

  name = "gpt2"
  eot_token = EOT
  vocab_size = PADDED_VOCAB

  def __init__(self, bpe_dir: str | os.PathLike | None = None):
    self.bpe_dir = None if bpe_dir is None else str(bpe_dir)
    self._encoding = None

  def __getstate__(self):
    return {"bpe_dir": self.bpe_dir, "_encoding": None}

  def load(self):
    if self._encoding is None:
      self._encoding = gpt2_encoding(self.bpe_dir)
    return self._encoding

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return self.load().encode_ordinary_batch(texts, num_threads=1)


class ByteEncoder:
  """UTF-8 bytes + end-of-text 256: a stand-in for tests and for runs without the BPE files."""

  name = "bytes"
  eot_token = 256
  vocab_size = 257

  def load(self):
    return self

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [list(text.encode()) for text in texts]


# ----------------------------------------------------------------------------- input


@dataclasses.dataclass(frozen=True)
class Shard:
  """One resumable unit of input: a .jsonl(.zst) file, or a group of .txt documents."""

  name: str
  paths: tuple[str, ...]


def list_shards(source: str | os.PathLike) -> list[Shard]:
  """The shards under `source` (a folder, or one .jsonl.zst file), in a fixed order."""
  root = Path(source)
  if root.is_file() and root.name.endswith((".jsonl.zst", ".jsonl")):
    return [Shard(root.name, (str(root),))]
  if root.is_file() and root.name.endswith(".tar"):
    raise FileNotFoundError(f"{source} is the release archive; extract it first. " + missing_message(source))
  if not root.is_dir():
    raise FileNotFoundError(missing_message(source))
  jsonl = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith((".jsonl.zst", ".jsonl")))
  if jsonl:
    return [Shard(p.relative_to(root).as_posix().replace("/", "__"), (str(p),)) for p in jsonl]
  txt = sorted(p for p in root.rglob("*.txt") if p.is_file())
  if txt:
    groups = [txt[i : i + TXT_PER_SHARD] for i in range(0, len(txt), TXT_PER_SHARD)]
    return [Shard(f"txt-{i:06d}", tuple(map(str, g))) for i, g in enumerate(groups)]
  raise FileNotFoundError(missing_message(source))


def read_documents(shard: Shard) -> Iterator[str]:
  """The documents of a shard, in file order."""
  for path in shard.paths:
    if path.endswith(".txt"):
      yield Path(path).read_text(encoding="utf-8", errors="replace")
      continue
    with open(path, "rb") as raw:
      if path.endswith(".zst"):
        import zstandard  # noqa: PLC0415

        stream = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8")
      else:
        stream = io.TextIOWrapper(raw, encoding="utf-8")
      for number, line in enumerate(stream, 1):
        if line.strip():
          try:
            yield json.loads(line)["text"]
          except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(
              f"{path} line {number} is not a JSON object with a 'text' field: {error}"
            ) from None


# ----------------------------------------------------------------------------- per shard


def _done_path(work: Path, shard: Shard) -> Path:
  return work / f"{shard.name}.done.json"


def encode_shard(shard: Shard, work: str | os.PathLike, encoder, seed: int, val_fraction: float) -> dict:
  """Encodes one shard into work/<name>.{train,val}.bin, then marks it done; returns its counts."""
  work = Path(work)
  rng = np.random.default_rng([seed, zlib.crc32(shard.name.encode())])
  tmp = {s: work / f"{shard.name}.{s}.bin.tmp" for s in prepared.SPLITS}
  counts = {"docs_train": 0, "docs_val": 0, "tokens_train": 0, "tokens_val": 0}
  files = {s: open(p, "wb") for s, p in tmp.items()}  # noqa: SIM115
  try:
    docs = read_documents(shard)
    while chunk := [text for _, text in zip(range(CHUNK_DOCS), docs)]:
      is_val = rng.random(len(chunk)) < val_fraction  # one draw per document, in order
      for ids, val in zip(encoder.encode_batch(chunk), is_val):
        split = "val" if val else "train"
        tokens = np.asarray([*ids, encoder.eot_token], dtype="<u2")
        files[split].write(tokens.tobytes())
        counts[f"docs_{split}"] += 1
        counts[f"tokens_{split}"] += tokens.size
  finally:
    for f in files.values():
      f.close()
  for split, path in tmp.items():
    os.replace(path, work / f"{shard.name}.{split}.bin")
  done = _done_path(work, shard)
  done.with_suffix(".tmp").write_text(json.dumps(counts) + "\n")
  os.replace(done.with_suffix(".tmp"), done)
  return counts


def _concatenate(folder: Path, work: Path, shards: list[Shard], split: str) -> None:
  tmp = folder / f"{split}.bin.tmp"
  with open(tmp, "wb") as out:
    for shard in shards:
      with open(work / f"{shard.name}.{split}.bin", "rb") as part:
        shutil.copyfileobj(part, out, 1 << 24)
  os.replace(tmp, folder / f"{split}.bin")


def prepare(
  source: str | os.PathLike,
  folder: str | os.PathLike = DEFAULT_FOLDER,
  *,
  encoder=None,
  bpe_dir: str | os.PathLike | None = None,
  workers: int | None = None,
  seed: int = SEED,
  val_fraction: float = VAL_FRACTION,
  keep_shards: bool = False,
  progress: bool = True,
) -> Path:
  """Encodes every shard (skipping done ones), joins them into train/val; returns folder.

  encoder: anything with encode_batch(texts) -> token lists, eot_token, vocab_size, name
  (default GPT2Encoder(bpe_dir)). workers: processes encoding shards in parallel
  (default: the CPU count, at most 16).
  """
  folder = Path(folder)
  if prepared.is_prepared(folder):
    return folder
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction=}")
  shards = list_shards(source)
  encoder = GPT2Encoder(bpe_dir) if encoder is None else encoder
  encoder.load()  # a missing BPE fails here, once, before any work
  if encoder.eot_token >= encoder.vocab_size or encoder.vocab_size > 1 << 16:
    raise ValueError(
      f"encoder {encoder.name}: eot_token={encoder.eot_token}, vocab_size={encoder.vocab_size} do not fit uint16"
    )
  work = folder / "shards"
  work.mkdir(parents=True, exist_ok=True)
  manifest = {
    "encoder": encoder.name,
    "seed": seed,
    "val_fraction": val_fraction,
    "shards": [s.name for s in shards],
  }
  manifest_path = work / "manifest.json"
  if manifest_path.exists() and json.loads(manifest_path.read_text()) != manifest:
    raise ValueError(
      f"{work} holds a preparation of other input or settings (see {manifest_path}); "
      "delete that folder or choose another --out"
    )
  manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
  todo = [s for s in shards if not _done_path(work, s).exists()]
  workers = min(os.cpu_count() or 1, 16) if workers is None else workers
  _encode_all(todo, work, encoder, seed, val_fraction, workers, progress, skipped=len(shards) - len(todo))
  counts = {k: 0 for k in ("docs_train", "docs_val", "tokens_train", "tokens_val")}
  for shard in shards:
    for key, value in json.loads(_done_path(work, shard).read_text()).items():
      counts[key] += value
  if not counts["docs_val"] or not counts["docs_train"]:
    raise ValueError(
      f"{source}: the split left a side empty ({counts}); more documents or another val_fraction"
    )
  for split in prepared.SPLITS:
    _concatenate(folder, work, shards, split)
  meta = prepared.DatasetMeta(
    name="openwebtext2",
    vocab_size=encoder.vocab_size,
    dtype="uint16",
    unit="token",
    eot_token=encoder.eot_token,
    description=f"{len(shards)} shards of {source}; {encoder.name} tokens, end-of-text after each document; "
    f"validation = {val_fraction:g} of documents (seed {seed}, per shard); {json.dumps(counts)}",
  )
  prepared.write_meta(folder, meta)
  if not keep_shards:
    shutil.rmtree(work)
  return folder


def _encode_all(todo, work, encoder, seed, val_fraction, workers, progress, skipped) -> None:
  from tqdm.auto import tqdm  # noqa: PLC0415

  bar = tqdm(
    total=len(todo) + skipped, initial=skipped, unit="shard", disable=not progress, desc="openwebtext2"
  )
  tokens = 0

  def advance(counts):
    nonlocal tokens
    tokens += counts["tokens_train"] + counts["tokens_val"]
    bar.set_postfix(tokens=f"{tokens / 1e6:,.1f}M")
    bar.update(1)

  if workers <= 1 or len(todo) <= 1:
    for shard in todo:
      advance(encode_shard(shard, work, encoder, seed, val_fraction))
  else:
    # spawn, not fork: the caller may have started JAX or other threads.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
      futures = [pool.submit(encode_shard, s, work, encoder, seed, val_fraction) for s in todo]
      for future in concurrent.futures.as_completed(futures):
        advance(future.result())
  bar.close()
