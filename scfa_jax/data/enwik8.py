"""enwik8 (the Hutter Prize file: the first 10^8 bytes of an English Wikipedia XML dump).

Byte-level: every byte is a token (vocabulary 256, no end-of-text: the file is one
document). The standard split is by position: bytes [0, 90M) train, [90M, 95M)
validation, [95M, 100M) test, as in Transformer-XL and the Reformer comparison of
the paper. Train and validation go to the prepared format (`scfa_jax.data.prepared`);
test goes beside them as test.bin, read with `load_test`, so no training run can
look at it by accident. The metric is bits per character (unit "char"), the name
the enwik8 literature uses for bits per byte.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from scfa_jax.data import prepared

URL = "http://mattmahoney.net/dc/enwik8.zip"
ENWIK8_BYTES = 100_000_000
VOCAB_SIZE = 256
DEFAULT_FOLDER = Path("runs") / "data" / "enwik8"


def missing_message(source) -> str:
  return (
    f"enwik8 not found at {source}. Download {URL} (36 MB zip holding one file named "
    f"'enwik8' of {ENWIK8_BYTES:,} bytes) and pass the zip, the extracted file, or the folder "
    "holding either, e.g.: python experiments/prepare_enwik8.py --input data/enwik8.zip"
  )


def find_source(source: str | os.PathLike) -> Path:
  """The enwik8 file or zip named by `source` (a folder may hold either)."""
  path = Path(source)
  if path.is_dir():
    for name in ("enwik8", "enwik8.zip"):
      if (path / name).is_file():
        return path / name
  if path.is_file():
    return path
  raise FileNotFoundError(missing_message(source))


def read_bytes(source: str | os.PathLike) -> bytes:
  """The raw bytes, from the zip (its member 'enwik8', or its only member) or the plain file."""
  path = find_source(source)
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
      name = "enwik8" if "enwik8" in names else (names[0] if len(names) == 1 else None)
      if name is None:
        raise ValueError(f"{path} holds {names}, not a member named 'enwik8'; {missing_message(source)}")
      return archive.read(name)
  return path.read_bytes()


def split_bounds(n: int) -> tuple[int, int]:
  """(end of train, end of validation) for n bytes: 90% / 5% / 5%, i.e. 90M/5M/5M for enwik8."""
  if n < 20:
    raise ValueError(f"enwik8 needs at least 20 bytes to split 90/5/5, got n={n}")
  return n * 9 // 10, n * 19 // 20


def prepare(
  source: str | os.PathLike,
  folder: str | os.PathLike = DEFAULT_FOLDER,
  *,
  expected_bytes: int | None = ENWIK8_BYTES,
) -> Path:
  """Writes train/val (+ test.bin) to `folder`, unless it is already prepared; returns folder.

  expected_bytes: the size the file must have (None: any size, for tests on small files);
  a truncated download would otherwise give a silently wrong split.
  """
  folder = Path(folder)
  if prepared.is_prepared(folder) and (folder / "test.bin").exists():
    return folder
  data = np.frombuffer(read_bytes(source), np.uint8)
  if expected_bytes is not None and data.size != expected_bytes:
    raise ValueError(
      f"{source} has {data.size:,} bytes, expected_bytes={expected_bytes:,}: a truncated or wrong file? "
      + missing_message(source)
    )
  train_end, val_end = split_bounds(data.size)
  meta = prepared.DatasetMeta(
    name="enwik8",
    vocab_size=VOCAB_SIZE,
    dtype="uint8",
    unit="char",
    description=f"enwik8 bytes; train [0, {train_end}), val [{train_end}, {val_end}), "
    f"test [{val_end}, {data.size}) in test.bin (scfa_jax.data.enwik8.load_test)",
  )
  _write_test(folder, data[val_end:])
  prepared.write_split(folder, "val", data[train_end:val_end], meta)
  prepared.write_split(folder, "train", data[:train_end], meta)
  prepared.write_meta(folder, meta)  # last: is_prepared turns true only when all is there
  return folder


def _write_test(folder: Path, tokens: np.ndarray) -> None:
  folder.mkdir(parents=True, exist_ok=True)
  tmp = folder / "test.bin.tmp"
  tokens.astype(np.uint8).tofile(tmp)
  os.replace(tmp, folder / "test.bin")


def load_test(folder: str | os.PathLike = DEFAULT_FOLDER) -> np.ndarray:
  """The held-out test bytes (last 5M), memory-mapped; for the final report only."""
  path = Path(folder) / "test.bin"
  if not path.exists():
    raise FileNotFoundError(
      f"{path} is missing: run python experiments/prepare_enwik8.py --out {folder} first"
    )
  return np.memmap(path, dtype=np.uint8, mode="r")
