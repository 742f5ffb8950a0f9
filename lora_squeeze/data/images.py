"""Images read lazily: an `Example` of a VL task holds an `ImageFile` (a path), decoded only when a
batch needs its pixels.

Holding decoded images in every `Example` made a training run's memory grow with the dataset:
`setup_from_config` keeps the list of training examples, and a 896×896 RGB image is 2.4 MB. An
`ImageFile` is a path and a (height, width) read from the file header, so the examples cost the
same few hundred bytes each whatever the image size; the batchers (lora_squeeze.data.batching,
evaluate.greedy_decode) decode and resize the B images of the batch they build, through grain's
random-access `MapDataset`, and drop them with the batch. `benchmarks/vl_data_bench.py` measures
the peak memory of both ways.

    image = ImageFile(path)       # reads the header only: image.shape == (H, W, 3)
    np.asarray(image)             # (H, W, 3) uint8 RGB, decoded now
    as_pixels(image, size=896)    # decoded and resized: (896, 896, 3) uint8
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import PIL.Image

from lora_squeeze.data import readers


@dataclasses.dataclass(frozen=True, eq=False)
class ImageFile:
  """An RGB image file decoded on demand; behaves as an (H, W, 3) uint8 array (shape, dtype, np.asarray).

  Attributes:
    path: the image file (any format PIL reads).
  """

  path: Path

  def __post_init__(self):
    object.__setattr__(self, "path", Path(self.path))
    if not self.path.is_file():
      raise readers.DatasetNotPreparedError(f"image not found: {self.path}")

  @property
  def shape(self) -> tuple[int, int, int]:
    with PIL.Image.open(self.path) as image:  # parses the header, decodes no pixels
      width, height = image.size
    return height, width, 3

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(np.uint8)

  @property
  def ndim(self) -> int:
    return 3

  def decode(self, size: int | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB, or (size, size, 3) resized bilinearly (what the vision encoder takes)."""
    with PIL.Image.open(self.path) as image:
      image = image.convert("RGB")
      if size is not None and image.size != (size, size):
        image = image.resize((size, size), PIL.Image.BILINEAR)
      return np.asarray(image, dtype=np.uint8)

  def __array__(self, dtype=None, copy=None):
    pixels = self.decode()
    return pixels if dtype is None else pixels.astype(dtype)

  def __repr__(self) -> str:
    return f"ImageFile({os.fspath(self.path)!r})"


def as_pixels(image: np.ndarray | ImageFile, size: int) -> np.ndarray:
  """(size, size, 3) uint8 from a decoded (H, W, 3) array or an ImageFile (decoded now)."""
  if isinstance(image, ImageFile):
    return image.decode(size)
  image = np.asarray(image, np.uint8)
  if image.shape[:2] == (size, size):
    return image
  return np.asarray(PIL.Image.fromarray(image).resize((size, size), PIL.Image.BILINEAR), np.uint8)
