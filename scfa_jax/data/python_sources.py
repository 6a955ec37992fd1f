"""Corpora of the Python source files installed on this machine, as bytes: no download.

Two corpora, both real code that nobody here wrote and that every Python installation has:

- "stdlib": the standard library's `.py` files (about 30 MB on CPython 3.11), the
  embedded default corpus of the training demo.
- "python": the standard library and every site-packages folder of this interpreter
  (hundreds of MB where numpy, jax, torch and the like are installed).

Files are read in a fixed order (by root, then relative path); a file whose bytes equal
an earlier one's (a vendored copy) is kept once. Each file is one document: its bytes
then an end-of-text token (vocabulary 257 = 256 bytes + EOT). A file goes to validation
when the first byte of the SHA-1 of its content is below 13 (about 5%), so the split
never cuts a file, never puts one text on both sides, and is the same on every machine
that has the same files. The result is written in the prepared format
(`scfa_jax.data.prepared`), which training reads like any other corpus.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import shutil
import site
import sys
import sysconfig
from pathlib import Path

import numpy as np

from scfa_jax.data import prepared

EOT = 256
VOCAB_SIZE = 257
VALIDATION_BELOW = 13  # out of 256: the share of files that go to validation
DEFAULT_CACHE = Path("runs") / "data"
CORPORA = ("stdlib", "python")
_THIRD_PARTY = {"site-packages", "dist-packages"}


def stdlib_root() -> Path:
  return Path(sysconfig.get_paths()["stdlib"])


def source_roots(corpus: str) -> list[Path]:
  """The folders a corpus reads: the standard library, and for "python" every existing
  site-packages folder of this interpreter too (each once)."""
  if corpus not in CORPORA:
    raise ValueError(f"corpus must be one of {CORPORA}, got {corpus=}")
  roots = [stdlib_root()]
  if corpus == "python":
    paths = sysconfig.get_paths()
    candidates = [paths["purelib"], paths["platlib"], *site.getsitepackages()]
    if site.ENABLE_USER_SITE:
      candidates.append(site.getusersitepackages())
    roots += sorted({Path(p).resolve() for p in candidates if Path(p).is_dir()})
  return list(dict.fromkeys(roots))


def source_files(roots: list[Path] | Path) -> list[tuple[Path, str]]:
  """(root, relative path) of every .py file under the roots, in corpus order: by root,
  then sorted path. Third-party folders inside a root are left to their own root."""
  roots = [Path(roots)] if isinstance(roots, (str, Path)) else [Path(r) for r in roots]
  files = []
  for root in roots:
    found = []
    for path in root.rglob("*.py"):
      rel = path.relative_to(root)
      if (_THIRD_PARTY | {"__pycache__"}) & set(rel.parts[:-1]) or not path.is_file():
        continue
      found.append(rel.as_posix())
    files += [(root, rel) for rel in sorted(found)]
  return files


def is_validation(content: bytes) -> bool:
  return hashlib.sha1(content).digest()[0] < VALIDATION_BELOW


def default_folder(corpus: str = "stdlib") -> Path:
  version = f"{sys.implementation.name}{sys.version_info.major}.{sys.version_info.minor}"
  return DEFAULT_CACHE / f"{corpus}-{version}"


def _read(path: Path) -> bytes:
  try:
    return path.read_bytes()
  except OSError:  # unreadable (permissions, a dangling link): not part of the corpus
    return b""


def _tokens(contents: list[bytes]) -> np.ndarray:
  """Each file's bytes followed by EOT, as one uint16 array."""
  data = np.frombuffer(b"".join(contents), np.uint8).astype(np.uint16)
  ends = np.cumsum([len(c) for c in contents])
  return np.insert(data, ends, EOT)


def prepare(folder: str | Path | None = None, *, corpus: str = "stdlib", roots: list[Path] | None = None) -> Path:
  """Builds the prepared corpus in `folder` (once; later calls reuse it) and returns the folder.

  roots: the folders to read instead of `source_roots(corpus)` (tests).
  """
  folder = default_folder(corpus) if folder is None else Path(folder)
  if prepared.is_prepared(folder):
    return folder
  roots = source_roots(corpus) if roots is None else [Path(r) for r in roots]
  files = source_files(roots)
  if not files:
    raise FileNotFoundError(f"no .py files under {[str(r) for r in roots]}")
  with concurrent.futures.ThreadPoolExecutor(16) as pool:  # reading many small files is I/O bound
    contents = list(pool.map(_read, [root / rel for root, rel in files]))
  seen, parts = set(), {"train": [], "val": []}
  for content in contents:
    digest = hashlib.sha1(content).digest()
    if not content or digest in seen:
      continue
    seen.add(digest)
    parts["val" if digest[0] < VALIDATION_BELOW else "train"].append(content)
  if not (parts["train"] and parts["val"]):
    raise ValueError(f"the {len(files)} files under {roots} do not fill both a train and a validation split")
  meta = prepared.DatasetMeta(
      name=folder.name,
      vocab_size=VOCAB_SIZE,
      dtype="uint16",
      unit="byte",
      eot_token=EOT,
      description=f"{len(seen)} distinct .py files ({len(files)} found) of Python {sys.version.split()[0]} "
      f"under {', '.join(str(r) for r in roots)}; bytes + end-of-text (256) after each file; "
      f"validation = files whose sha1(content)[0] < {VALIDATION_BELOW}",
  )
  # Built in a private folder and renamed into place, so concurrent first runs (test
  # workers, several processes of one host) never see or write a half-built corpus.
  tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
  for split, chunks in parts.items():
    prepared.write_split(tmp, split, _tokens(chunks), meta)
  prepared.write_meta(tmp, meta)
  try:
    os.rename(tmp, folder)
  except OSError:  # another process finished first
    shutil.rmtree(tmp, ignore_errors=True)
    if not prepared.is_prepared(folder):
      raise
  return folder


def load(folder: str | Path | None = None, *, corpus: str = "stdlib"):
  """(splits, meta) of the corpus, preparing it first if needed."""
  return prepared.load(prepare(folder, corpus=corpus))


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
