"""The embedded default corpus: this machine's Python standard library, as bytes.

Real, long documents that nobody here wrote and that every Python install has, so
the demo needs no download. Each `.py` file (sorted by relative path, site- and
dist-packages left out) is one document: its bytes followed by an end-of-text token
(vocabulary 257 = 256 bytes + EOT). A file goes to validation when the first byte of
the SHA-1 of its relative path is below 13 (about 5%), so the split is the same on
every run and never cuts a file. The result is cached in the prepared format
(`scfa_jax.data.prepared`), so training reads it like any other prepared corpus.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import sysconfig
from pathlib import Path

import numpy as np

from scfa_jax.data import prepared

EOT = 256
VOCAB_SIZE = 257
VALIDATION_BELOW = 13  # out of 256: the share of files that go to validation
DEFAULT_CACHE = Path("runs") / "data"


def stdlib_root() -> Path:
  return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: Path | None = None) -> list[str]:
  """Relative paths of the standard library's .py files, sorted, third-party packages excluded."""
  root = stdlib_root() if root is None else Path(root)
  files = []
  for path in root.rglob("*.py"):
    rel = path.relative_to(root)
    if {"site-packages", "dist-packages", "__pycache__"} & set(rel.parts):
      continue
    if path.is_file():
      files.append(rel.as_posix())
  return sorted(files)


def is_validation(relative_path: str) -> bool:
  return hashlib.sha1(relative_path.encode()).digest()[0] < VALIDATION_BELOW


def default_folder() -> Path:
  return DEFAULT_CACHE / f"stdlib-{sys.implementation.name}{sys.version_info.major}.{sys.version_info.minor}"


def prepare(folder: str | Path | None = None, root: Path | None = None) -> Path:
  """Builds the prepared corpus in `folder` (once; later calls reuse it) and returns the folder."""
  folder = default_folder() if folder is None else Path(folder)
  if prepared.is_prepared(folder):
    return folder
  root = stdlib_root() if root is None else Path(root)
  files = source_files(root)
  if not files:
    raise FileNotFoundError(f"no .py files under the standard library folder {root}")
  parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
  eot = np.array([EOT], np.uint16)
  for rel in files:
    data = np.frombuffer((root / rel).read_bytes(), np.uint8).astype(np.uint16)
    parts["val" if is_validation(rel) else "train"] += [data, eot]
  meta = prepared.DatasetMeta(
      name=folder.name,
      vocab_size=VOCAB_SIZE,
      dtype="uint16",
      unit="byte",
      eot_token=EOT,
      description=f"{len(files)} .py files of the Python {sys.version.split()[0]} standard library "
      f"at {root}; bytes + end-of-text (256) after each file; "
      "validation = files whose sha1(relative path)[0] < 13",
  )
  # Built in a private folder and renamed into place, so concurrent first runs (test
  # workers, several processes of one host) never see or write a half-built corpus.
  if not (parts["train"] and parts["val"]):
    raise ValueError(f"the {len(files)} files under {root} do not fill both a train and a validation split")
  tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
  for split, chunks in parts.items():
    prepared.write_split(tmp, split, np.concatenate(chunks), meta)
  prepared.write_meta(tmp, meta)
  try:
    os.rename(tmp, folder)
  except OSError:  # another process finished first
    shutil.rmtree(tmp, ignore_errors=True)
    if not prepared.is_prepared(folder):
      raise
  return folder


def load(folder: str | Path | None = None):
  """(splits, meta) of the corpus, preparing it first if needed."""
  return prepared.load(prepare(folder))


def decode(tokens) -> str:
  """Bytes to text; end-of-text shows as a marker line."""
  out, chunk = [], bytearray()
  for t in np.asarray(tokens).tolist():
    if t == EOT:
      out.append(chunk.decode("utf-8", errors="replace") + "\n<|endoftext|>\n")
      chunk = bytearray()
    elif 0 <= t < 256:
      chunk.append(t)
  out.append(chunk.decode("utf-8", errors="replace"))
  return "".join(out)
