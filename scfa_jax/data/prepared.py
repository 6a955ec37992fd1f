"""Prepared token arrays: the one on-disk format that training reads.

A prepared data set is a folder holding `train.bin` and `val.bin` (flat little-endian
token arrays, dtype from the metadata) and `meta.json` (a `DatasetMeta`). Preparation
(`experiments/prepare_*.py`) writes it once; training only memory-maps it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np

SPLITS = ("train", "val")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DatasetMeta:
  """What training needs to know about a prepared data set."""

  name: str
  vocab_size: int  # model vocabulary (may be padded past the largest token id)
  dtype: str  # "uint8" or "uint16"
  unit: str  # what one token is: "byte", "char", "token" or "pixel"; names the bits metric
  eot_token: int | None = None  # separator between documents, if any
  record_length: int | None = None  # samples must start at multiples of this (e.g. one image)
  description: str = ""

  def bits_metric(self) -> str:
    """Name of loss / ln 2 in this unit: bits per byte, per character, per dimension..."""
    return {"byte": "bits_per_byte", "char": "bits_per_char", "pixel": "bits_per_dim"}.get(
        self.unit, "bits_per_token"
    )


def write_split(folder: str | os.PathLike, split: str, tokens: np.ndarray, meta: DatasetMeta) -> Path:
  """Writes one split atomically (a partial file never looks finished)."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split=}")
  tokens = np.asarray(tokens)
  if tokens.ndim != 1:
    raise ValueError(f"tokens must be a flat array, got tokens.shape={tokens.shape}")
  if tokens.size and int(tokens.max()) >= meta.vocab_size:
    raise ValueError(f"token id {int(tokens.max())} >= vocab_size={meta.vocab_size}")
  path = Path(folder) / f"{split}.bin"
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".bin.tmp")
  tokens.astype(np.dtype(meta.dtype).newbyteorder("<")).tofile(tmp)
  os.replace(tmp, path)
  return path


def write_meta(folder: str | os.PathLike, meta: DatasetMeta) -> Path:
  path = Path(folder) / "meta.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(dataclasses.asdict(meta), indent=2) + "\n")
  return path


def is_prepared(folder: str | os.PathLike) -> bool:
  folder = Path(folder)
  return all((folder / name).exists() for name in ("meta.json", "train.bin", "val.bin"))


def load(folder: str | os.PathLike) -> tuple[dict[str, np.ndarray], DatasetMeta]:
  """Memory-maps a prepared folder: ({"train": ..., "val": ...}, meta)."""
  folder = Path(folder)
  if not is_prepared(folder):
    raise FileNotFoundError(
        f"{folder} is not a prepared data set (needs meta.json, train.bin, val.bin); "
        "run the matching experiments/prepare_*.py first"
    )
  meta = DatasetMeta(**json.loads((folder / "meta.json").read_text()))
  dtype = np.dtype(meta.dtype).newbyteorder("<")
  return {s: np.memmap(folder / f"{s}.bin", dtype=dtype, mode="r") for s in SPLITS}, meta


def bits(loss_nats: float) -> float:
  """Cross-entropy in nats per token -> bits per token (per byte, char or pixel)."""
  return loss_nats / math.log(2)
