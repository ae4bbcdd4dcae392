"""Image augmentation on host numpy batches.

The CIFAR recipe of He et al. 2016 (Deep Residual Learning, Sec. 4.2): pad 4 pixels of
zeros on every side, take a random crop of the original size, and mirror horizontally
with probability 1/2. The crop is one gather of windows over the whole batch, so a
batch of 256 costs no per-example Python work. Randomness comes from an explicit
`np.random.Generator`, so the caller decides what it is a function of.
"""

import numpy as np


def crop_flip(images: np.ndarray, offset_y: np.ndarray, offset_x: np.ndarray,
              flip: np.ndarray, *, pad: int) -> np.ndarray:
  """Crops each zero-padded image at its own offset and mirrors the flagged ones.

  Args:
    images: [B, H, W, C].
    offset_y, offset_x: int [B] in [0, 2 * pad]; `pad` for both keeps the image in place.
    flip: bool [B]; True mirrors that image left-right after the crop.
    pad: zero pixels added on every side before cropping.

  Returns:
    [B, H, W, C] with the dtype of `images`.
  """
  b, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  # Every h x w window of every padded image, as a view [B, 2p+1, 2p+1, C, h, w];
  # channels go last so the windows picked (one per image) come out [B, h, w, C].
  windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(1, 2))
  out = windows.transpose(0, 1, 2, 4, 5, 3)[np.arange(b), offset_y, offset_x]
  out[flip] = out[flip, :, ::-1]
  return out


def random_crop_flip(images: np.ndarray, rng: np.random.Generator, *, pad: int,
                     flip: bool) -> np.ndarray:
  """`crop_flip` with offsets uniform in [0, 2 * pad] and a fair coin per image for flips.

  `flip=False` is for data where mirroring changes the meaning (digits) or is not
  part of the usual recipe (Fashion-MNIST).
  """
  b = images.shape[0]
  offset_y = rng.integers(0, 2 * pad + 1, size=b)
  offset_x = rng.integers(0, 2 * pad + 1, size=b)
  flips = rng.random(b) < 0.5 if flip else np.zeros(b, bool)
  return crop_flip(images, offset_y, offset_x, flips, pad=pad)
