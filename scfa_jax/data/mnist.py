"""MNIST as pixel sequences, for autoregressive image generation with the same GPT.

Each 28x28 image becomes one record of 785 tokens: a start-of-image token (256)
followed by its 784 pixels in raster order, each pixel its own 8-bit intensity
(256 tokens, no quantisation). Vocabulary 257, uint16. With the model's block_size =
784 and record_length = 785, every training window is exactly one image: inputs
[BOS, p0..p782], targets [p0..p783], so the loss in bits is bits per dimension
(unit "pixel") over all 784 pixels, the first one included. The start token doubles
as the prepared data's eot_token, so the training program's sampler starts an image.

Data comes from TensorFlow Datasets (`tfds.data_source("mnist")`, array-record
access): the "train" split (60,000) becomes train.bin, the "test" split (10,000)
val.bin, the split image-generation results are reported on. Reading needs no
TensorFlow, but tfds's first-time build of MNIST does (its builder reads the download
with tf.io.gfile); `load_idx` reads the same images from the original IDX files
instead. tensorflow-datasets is imported only inside `load_tfds`: training, sampling
and the grid need only the prepared arrays.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from scfa_jax.data import prepared

SIDE = 28
PIXELS = SIDE * SIDE
BOS = 256  # start-of-image token
VOCAB_SIZE = 257
RECORD_LENGTH = PIXELS + 1
DEFAULT_FOLDER = Path("runs") / "data" / "mnist"
SPLITS = {"train": "train", "val": "test"}  # prepared split -> tfds split
IDX_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"  # where tfds downloads from
IDX_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}


def load_tfds(split: str, *, data_dir: str | os.PathLike | None = None, download: bool = True) -> np.ndarray:
  """uint8 images [N, 28, 28] of one tfds split ("train" or "test")."""
  try:
    import tensorflow_datasets as tfds  # noqa: PLC0415
  except ImportError:
    raise ImportError(
      "MNIST preparation through tfds needs tensorflow-datasets (pip install tensorflow-datasets); "
      "or pass --idx_dir with the original IDX files, or prepare elsewhere and copy the prepared "
      "folder (train.bin, val.bin, meta.json) to the training machine."
    ) from None
  try:
    source = tfds.data_source("mnist", split=split, data_dir=data_dir, download=download)
  except Exception as error:  # noqa: BLE001  (download, preparation and format errors alike)
    raise RuntimeError(
      f"tfds.data_source('mnist', split={split!r}, data_dir={data_dir!r}) failed: "
      f"{type(error).__name__}: {error}. On first use tfds downloads MNIST (11 MB) and builds it "
      "in array_record format under data_dir (default ~/tensorflow_datasets); building, unlike "
      "reading, needs TensorFlow and importlib_resources (pip install tensorflow importlib_resources). "
      "Or skip tfds: download the IDX files train-images-idx3-ubyte.gz and t10k-images-idx3-ubyte.gz "
      f"from {IDX_URL} into one folder and pass --idx_dir FOLDER"
    ) from None
  from tqdm.auto import tqdm  # noqa: PLC0415

  images = [
    np.asarray(source[i]["image"]) for i in tqdm(range(len(source)), desc=f"mnist {split}", unit="image")
  ]
  return np.stack(images).reshape(len(images), SIDE, SIDE).astype(np.uint8)


def load_idx(folder: str | os.PathLike, split: str) -> np.ndarray:
  """uint8 images [N, 28, 28] from the original IDX file of a split ("train" or "test"), .gz or not.

  The images tfds serves (it downloads these files), without tfds or TensorFlow.
  """
  stem = IDX_FILES.get(split)
  if stem is None:
    raise ValueError(f"split must be one of {sorted(IDX_FILES)}, got {split=}")
  folder = Path(folder)
  path = next((p for p in (folder / f"{stem}.gz", folder / stem) if p.is_file()), None)
  if path is None:
    raise FileNotFoundError(f"{folder} lacks {stem}.gz: download {IDX_URL}{stem}.gz into it")
  data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
  magic, count, rows, cols = (int(x) for x in np.frombuffer(data[:16], ">u4"))
  if magic != 2051 or (rows, cols) != (SIDE, SIDE) or len(data) != 16 + count * PIXELS:
    raise ValueError(f"{path} is not an IDX file of 28x28 images (magic {magic}, {count}x{rows}x{cols})")
  return np.frombuffer(data, np.uint8, offset=16).reshape(count, SIDE, SIDE)


def images_to_tokens(images: np.ndarray) -> np.ndarray:
  """uint8 images [N, 28, 28] -> uint16 [N * 785]: per image BOS then its pixels in raster order."""
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.size % PIXELS:
    raise ValueError(
      f"images must be uint8 with 784 pixels each, got dtype={images.dtype}, shape={images.shape}"
    )
  pixels = images.reshape(-1, PIXELS).astype(np.uint16)
  return np.concatenate([np.full((len(pixels), 1), BOS, np.uint16), pixels], axis=1).ravel()


def prepare(
  folder: str | os.PathLike = DEFAULT_FOLDER,
  *,
  data_dir: str | os.PathLike | None = None,
  download: bool = True,
  idx_dir: str | os.PathLike | None = None,
) -> Path:
  """Writes the prepared folder (skipped when already prepared); returns it.

  Images come from tfds (data_dir, download), or from the IDX files in idx_dir when given.
  """
  folder = Path(folder)
  if prepared.is_prepared(folder):
    return folder
  meta = prepared.DatasetMeta(
    name="mnist",
    vocab_size=VOCAB_SIZE,
    dtype="uint16",
    unit="pixel",
    eot_token=BOS,
    record_length=RECORD_LENGTH,
    description=f"{'tfds mnist' if idx_dir is None else 'mnist IDX files'}; per image: start token 256 + 784 pixels (raster order, intensities 0-255); "
    "train = tfds train (60k), val = tfds test (10k); train with block_size=784",
  )
  for split, source_split in SPLITS.items():
    if idx_dir is None:
      images = load_tfds(source_split, data_dir=data_dir, download=download)
    else:
      images = load_idx(idx_dir, source_split)
    prepared.write_split(folder, split, images_to_tokens(images), meta)
  prepared.write_meta(folder, meta)
  return folder


# ----------------------------------------------------------------------------- samples


def tokens_to_images(tokens) -> np.ndarray:
  """Token sequences -> uint8 images [N, 28, 28].

  Takes [N, 784] pixels, [N, 785] records, or one flat stream of whole records (as the
  training program's samples.txt holds). A start token sampled inside an image shows
  as black (0).
  """
  tokens = np.asarray(tokens)
  if tokens.ndim == 1:
    size = RECORD_LENGTH if tokens.size % RECORD_LENGTH == 0 and tokens[:1].tolist() == [BOS] else PIXELS
    tokens = tokens.reshape(-1, size) if tokens.size % size == 0 else None
  if tokens is None or tokens.ndim != 2 or tokens.shape[1] not in (PIXELS, RECORD_LENGTH):
    raise ValueError(f"tokens must be [N, 784], [N, 785] or whole records flat, got shape={np.shape(tokens)}")
  pixels = tokens[:, -PIXELS:]
  return np.where(pixels >= BOS, 0, pixels).astype(np.uint8).reshape(-1, SIDE, SIDE)


def save_grid(
  tokens_or_images, path: str | os.PathLike, *, columns: int = 8, title: str | None = None
) -> Path:
  """A PNG grid of digits from generated tokens (see tokens_to_images) or images [N, 28, 28]."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  data = np.asarray(tokens_or_images)
  images = data.astype(np.uint8) if data.ndim == 3 else tokens_to_images(data)
  rows = -(-len(images) // columns)
  cols = min(columns, len(images))
  fig, axes = plt.subplots(rows, cols, figsize=(cols, rows + (0.4 if title else 0)), squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  for ax, image in zip(axes.ravel(), images):
    ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
  if title:
    fig.suptitle(title)
  fig.tight_layout(pad=0.2)
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def sample(model, *, num: int, key, temperature: float = 1.0):
  """num images sampled pixel by pixel from the start token: int32 [num, 784].

  Plain ancestral sampling (temperature 1, no top-k), the distribution that the bits
  per dimension measure, never drawing the start token: `scfa_jax.model.generate` with a
  key/value cache, all images in one batch.
  """
  import jax.numpy as jnp  # noqa: PLC0415

  from scfa_jax.model import generate  # noqa: PLC0415

  if model.config.block_size < PIXELS:
    raise ValueError(f"the model's block_size={model.config.block_size} must be >= {PIXELS} (one image)")
  start = jnp.full((num, 1), BOS, jnp.int32)
  tokens = generate(model, start, steps=PIXELS, key=key, temperature=temperature, top_k=None, exclude=(BOS,))
  return tokens[:, 1:]
