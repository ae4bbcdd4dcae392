"""The 15 common corruptions of CIFAR-10-C, with CIFAR-10-C's severity constants at any
image size (Hendrycks & Dietterich 2019, "Benchmarking Neural Network Robustness to
Common Corruptions and Perturbations", ICLR). ImageNet-C uses the same operations with
larger constants for 224-pixel images; those are not here, so results on large images
are "CIFAR-10-C-strength" corruptions, not ImageNet-C.

Every corruption takes a host batch `[B, H, W, C]` of floats in [0, 1] (C = 1 or 3, any
size, e.g. CIFAR 32x32x3 or Fashion-MNIST 28x28x1), a severity 1..5 and an explicit
`np.random.Generator`, and returns the same shape in [0, 1]. The severity constants are
those of the CIFAR-10-C generator released with the paper (`make_cifar_c.py` in
hendrycks/robustness); the implementations are our own numpy / scipy / PIL versions of
the operations it describes (no OpenCV, no ImageMagick). Lengths that the CIFAR code
gives in pixels of a 32-pixel image are used as they are for other sizes, except where
the CIFAR code itself scales with the image size (elastic).

Severity constants (severity 1 -> 5):

  gaussian_noise     std of additive N(0, s^2) noise: 0.04, 0.06, 0.08, 0.09, 0.10
  shot_noise         photons per unit intensity, Poisson(x c) / c: 500, 250, 100, 75, 50
  impulse_noise      fraction of values set to 0 or 1 (half each): .01 .02 .03 .05 .07
  defocus_blur       (disk radius, anti-alias blur sigma): (0.3, 0.4) (0.4, 0.5)
                     (0.5, 0.6) (1, 0.2) (1.5, 0.1)
  glass_blur         (gaussian sigma, max pixel displacement, shuffle passes):
                     (0.05,1,1) (0.25,1,1) (0.4,1,1) (0.25,1,2) (0.4,1,2); each
                     visit copies a neighbour over the pixel, as the released code
                     does (`glass_shuffle`; `swap="true"` exchanges the two)
  motion_blur        (kernel radius, sigma), angle U(-45, 45) degrees: (6,1) (6,1.5)
                     (6,2) (8,2) (9,2.5)
  zoom_blur          zoom factors 1.00, 1.01, ... (np.arange(1, stop, 0.01) with the
                     released stops 1.06, 1.11, 1.16, 1.21, 1.26; floating point makes
                     that 1.00-1.06, 1.00-1.11, 1.00-1.15, 1.00-1.20, 1.00-1.25),
                     each zoomed copy averaged with the image
  snow               (layer mean, layer std, layer zoom, threshold, blur radius,
                     blur sigma, image weight): (0.1,0.2,1,0.6,8,3,0.95)
                     (0.1,0.2,1,0.5,10,4,0.9) (0.15,0.3,1.75,0.55,10,4,0.9)
                     (0.25,0.3,2.25,0.6,12,6,0.85) (0.3,0.3,1.25,0.65,14,12,0.8)
  frost              (image weight, frost weight): (1,0.2) (1,0.3) (0.9,0.4) (0.85,0.4)
                     (0.75,0.45)
  fog                (fog weight, fractal roughness decay): (0.2,3) (0.5,3) (0.75,2.5)
                     (1,2) (1.5,1.75)
  brightness         added to the HSV value: 0.05, 0.1, 0.15, 0.2, 0.3
  contrast           factor towards the per-channel mean: 0.75, 0.5, 0.4, 0.3, 0.15
  elastic_transform  (displacement scale, displacement smoothing sigma, affine jitter),
                     as fractions of the image size: (0, 0, 0.08) (0.05, 0.2, 0.07)
                     (0.08, 0.06, 0.06) (0.1, 0.04, 0.05) (0.1, 0.03, 0.03)
  pixelate           down-sampling factor (box filter down and up): .95 .9 .85 .75 .65
  jpeg_compression   JPEG quality: 80, 65, 58, 50, 40

Differences from the released generator, and why:
  * frost composites real photographs of frost in the original; we do not ship those,
    so `frost` synthesises a frost-like texture (see `frost_texture`). Frost numbers
    are therefore not comparable with published CIFAR-10-C frost results.
  * motion blur (also inside snow) is ImageMagick's one-sided Gaussian line kernel in
    the original; we apply the same kind of kernel (weights exp(-i^2 / 2 sigma^2) for
    i = 0..2 radius, offsets rounded along the angle, edge pixels replicated).
  * The original quantises intermediate images to 8 bits in places (glass blur, snow
    layer, motion blur round trips); we stay in floating point except where
    quantisation is the corruption (JPEG).
  * Grayscale inputs stay grayscale (the original always produced RGB); brightness on
    one channel adds to the value directly, snow's gray term is the image itself.
"""

import io
from typing import Callable, Dict

import numpy as np
from PIL import Image
from scipy import ndimage

from ponder import errors

SEVERITIES = (1, 2, 3, 4, 5)


# ---------------------------------------------------------------------------------
# Helpers.


def _gaussian(x, sigma, mode="nearest", truncate=4.0):
  """Gaussian blur of a [B, H, W, C] batch over H and W only."""
  return ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0), mode=mode,
                                 truncate=truncate)


def _disk_kernel(radius, alias_blur):
  """Normalised disk of `radius` on a 17x17 grid, smoothed by a 3x3 Gaussian of
  std `alias_blur` to anti-alias it (the defocus kernel of the CIFAR generator)."""
  grid = np.arange(-8, 9)
  xx, yy = np.meshgrid(grid, grid)
  disk = (xx ** 2 + yy ** 2 <= radius ** 2).astype(np.float64)
  disk /= disk.sum()
  g = np.exp(-np.arange(-1, 2) ** 2 / (2 * alias_blur ** 2))
  g /= g.sum()
  kernel = ndimage.correlate(disk, np.outer(g, g), mode="mirror")
  rows, cols = np.nonzero(kernel > 0)  # Crop the zero border: same result, less work.
  return kernel[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def _motion_kernel_offsets(radius, sigma, angle_deg):
  """Taps of a one-sided Gaussian line kernel: integer (dy, dx) offsets and weights.

  ImageMagick's motion blur: width 2 ceil(radius) + 1, weight exp(-i^2 / 2 sigma^2)
  at distance i along the angle, offsets rounded to the pixel grid.
  """
  width = 2 * int(np.ceil(radius)) + 1
  i = np.arange(width)
  weights = np.exp(-i ** 2 / (2.0 * sigma ** 2))
  weights /= weights.sum()
  angle = np.deg2rad(angle_deg)
  dy = np.floor(i * np.sin(angle) + 0.5).astype(int)
  dx = np.floor(i * np.cos(angle) + 0.5).astype(int)
  return dy, dx, weights


def _motion_blur_one(img, radius, sigma, angle_deg):
  """Motion blur of one [H, W, C] image; pixels beyond the edge repeat the edge."""
  dy, dx, weights = _motion_kernel_offsets(radius, sigma, angle_deg)
  h, w = img.shape[:2]
  rows = np.clip(np.arange(h)[None, :, None] + dy[:, None, None], 0, h - 1)
  cols = np.clip(np.arange(w)[None, None, :] + dx[:, None, None], 0, w - 1)
  taps = img[rows, cols]  # [taps, H, W, C]
  return np.tensordot(weights, taps, axes=1)


def _zoom_matrix(n, zoom):
  """Rows of bilinear up-sampling by `zoom` as `scipy.ndimage.zoom(order=1)` does it.

  Zooming a length-`m` crop, m = ceil(n / zoom), gives round(m * zoom) >= n samples
  at input coordinates i (m - 1) / (out - 1); the matrix `[n, m]` holds the `n`
  central ones, so a zoom is two small matmuls instead of a 4-D interpolation.
  """
  m = int(np.ceil(n / zoom))
  out = int(round(m * zoom))
  first = (out - n) // 2
  coord = np.arange(first, first + n) * (m - 1) / max(out - 1, 1)
  lo = np.minimum(np.floor(coord).astype(int), m - 1)
  hi = np.minimum(lo + 1, m - 1)
  frac = coord - lo
  mat = np.zeros((n, m))
  np.add.at(mat, (np.arange(n), lo), 1.0 - frac)
  np.add.at(mat, (np.arange(n), hi), frac)
  return mat


def _clipped_zoom(x, zoom):
  """Zooms the centre of a [B, H, W, C] batch by `zoom` >= 1 (bilinear) and crops
  back to H x W, as the CIFAR generator's `clipped_zoom` does."""
  h, w = x.shape[1:3]
  rows, cols = _zoom_matrix(h, zoom), _zoom_matrix(w, zoom)
  top, left = (h - rows.shape[1]) // 2, (w - cols.shape[1]) // 2
  crop = x[:, top:top + rows.shape[1], left:left + cols.shape[1]]
  out = np.tensordot(rows, crop, axes=([1], [1]))  # [H, B, w crop, C]
  out = np.tensordot(out, cols, axes=([2], [1]))  # [H, B, C, W]
  return out.transpose(1, 0, 3, 2)


def plasma_fractal(size: int, roughness_decay: float, rng: np.random.Generator):
  """A periodic diamond-square height map `[size, size]` in [0, 1] (fog's texture).

  `size` must be a power of two. The perturbation at each refinement level is
  uniform with half-width a_l = w_l^2, where w_0 = 100 and w_{l+1} = w_l / decay: the
  squared amplitude schedule of the CIFAR-C generator's plasma fractal, so the same
  decay constants give the same roughness (smaller decay = rougher fog).
  """
  if size < 2 or size & (size - 1):
    raise errors.ShapeError(f"plasma_fractal needs a power-of-two size, got {size}")
  grid = np.zeros((size, size))
  step, wibble = size, 100.0
  while step >= 2:
    half = step // 2
    corners = grid[0::step, 0::step]
    # Square step: each cell centre is the mean of its four (periodic) corners.
    centre = (corners + np.roll(corners, -1, 0) + np.roll(corners, -1, 1)
              + np.roll(np.roll(corners, -1, 0), -1, 1)) / 4
    grid[half::step, half::step] = centre + rng.uniform(-1, 1, centre.shape) * wibble ** 2
    centres = grid[half::step, half::step]
    # Diamond step: each edge midpoint is the mean of its two corners and two centres.
    top = (corners + np.roll(corners, -1, 1) + centres + np.roll(centres, 1, 0)) / 4
    grid[0::step, half::step] = top + rng.uniform(-1, 1, top.shape) * wibble ** 2
    left = (corners + np.roll(corners, -1, 0) + centres + np.roll(centres, 1, 1)) / 4
    grid[half::step, 0::step] = left + rng.uniform(-1, 1, left.shape) * wibble ** 2
    step, wibble = half, wibble / roughness_decay
  grid -= grid.min()
  return grid / grid.max()


def _pow2_at_least(n):
  return 1 << int(np.ceil(np.log2(max(n, 2))))


def frost_texture(height: int, width: int, rng: np.random.Generator):
  """A procedural frost-like texture `[height, width]` in [0, 1].

  Stand-in for the frost photographs of ImageNet-C, which we do not ship: ice
  needles (straight segments of random direction, exponentially distributed length
  and random brightness), each with a side branch at +-60 degrees as in dendritic ice crystals,
  drawn with a faint glow over a fractal haze (the frosted glass). Its mean is about
  0.6; real frost crops differ in detail, so frost results are not comparable with
  published CIFAR-10-C frost numbers.
  """
  n = max(1, height * width // 10)
  start = rng.uniform((0, 0), (height, width), (n, 2))
  angle = rng.uniform(0, 2 * np.pi, n)
  length = rng.exponential(4.0, n) + 1.0
  # One side branch per needle, from a point along it, at +-60 degrees, shorter.
  along = rng.uniform(0.2, 0.8, (n, 1)) * length[:, None]
  branch_start = start + along * np.stack([np.sin(angle), np.cos(angle)], -1)
  branch_angle = angle + rng.choice([-1.0, 1.0], n) * np.pi / 3
  branch_length = 0.5 * length * rng.uniform(0.5, 1.0, n)
  start = np.concatenate([start, branch_start])
  angle = np.concatenate([angle, branch_angle])
  length = np.concatenate([length, branch_length])
  brightness = rng.uniform(0.3, 1.0, 2 * n)
  t = np.linspace(0.0, 1.0, 12)
  rows = start[:, None, 0] + t * length[:, None] * np.sin(angle)[:, None]
  cols = start[:, None, 1] + t * length[:, None] * np.cos(angle)[:, None]
  needles = np.zeros((height, width))
  np.maximum.at(needles, (np.floor(rows).astype(int) % height,
                          np.floor(cols).astype(int) % width),
                np.repeat(brightness[:, None], len(t), axis=1))
  needles = np.maximum(needles, 1.2 * ndimage.gaussian_filter(needles, 0.7, mode="wrap"))
  size = _pow2_at_least(max(height, width))
  haze = plasma_fractal(size, 2.0, rng)[:height, :width]
  return np.clip(0.45 * haze + 0.75 * needles, 0.0, 1.0)


def _to_uint8(x):
  return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------
# The 15 corruptions. Each: (x [B, H, W, C] float64 in [0, 1], severity, rng) -> same.


def gaussian_noise(x, severity, rng):
  s = [0.04, 0.06, 0.08, 0.09, 0.10][severity - 1]
  return x + rng.normal(0.0, s, x.shape)


def shot_noise(x, severity, rng):
  c = [500, 250, 100, 75, 50][severity - 1]
  return rng.poisson(x * c) / c


def impulse_noise(x, severity, rng):
  amount = [0.01, 0.02, 0.03, 0.05, 0.07][severity - 1]
  hit = rng.random(x.shape) < amount
  salt = rng.random(x.shape) < 0.5
  return np.where(hit, salt.astype(x.dtype), x)


def defocus_blur(x, severity, rng):
  radius, alias = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2),
                   (1.5, 0.1)][severity - 1]
  kernel = _disk_kernel(radius, alias)
  return ndimage.correlate(x, kernel[None, :, :, None], mode="mirror")


GLASS_SWAPS = ("released", "true")


def glass_shuffle(x, offsets, delta: int, swap: str = "released"):
  """Glass blur's local pixel shuffle with given offsets, in place on `x` [B, H, W, C].

  The released loop visits rows r = H - d ... d + 1 and, inside, columns
  c = W - d ... d + 1 (d = `delta`, the maximum displacement); `offsets[i, j]` is the (row,
  column) offset pair `[2, B]` of the i-th row and j-th column it visits, in [-d, d).
  Pixels moved once may move again (the visits are sequential).

  swap="released": what the released generators (hendrycks/robustness make_cifar_c.py,
    and the imagecorruptions package) compute. Their `x[h, w], x[h', w'] = x[h', w'],
    x[h, w]` on an [H, W, 3] array evaluates the right side to two NumPy views; the
    first assignment copies pixel (h', w') over (h, w), and the second then copies that
    same value back onto (h', w'). So each visit copies one neighbour over the pixel,
    and CIFAR-10-C's glass blur is this copy, not a shuffle.
  swap="true": the two pixels are exchanged, the shuffle the paper describes (a
    permutation of each image's pixels). Each visit then changes two pixels instead of
    one, and ponder's first version, which did this, was 1.3-1.4x stronger than the
    released CIFAR-10-C glass blur at severities 1-3 (issue 17's comparison).
  """
  if swap not in GLASS_SWAPS:
    raise errors.unknown_key("glass blur swap", swap, GLASS_SWAPS)
  b, h, w = x.shape[:3]
  batch = np.arange(b)
  for i, r in enumerate(range(h - delta, delta, -1)):
    for j, c in enumerate(range(w - delta, delta, -1)):
      r2, c2 = r + offsets[i, j, 0], c + offsets[i, j, 1]
      there = x[batch, r2, c2].copy()
      if swap == "true":
        x[batch, r2, c2] = x[batch, r, c]
      x[batch, r, c] = there
  return x


def glass_blur(x, severity, rng, *, swap: str = "released"):
  """Gaussian blur, the local pixel shuffle (`glass_shuffle`), Gaussian blur again.
  `swap` picks the released copy (the default: numbers compare with published
  CIFAR-10-C results) or a true swap; see `glass_shuffle`."""
  sigma, delta, passes = [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2),
                          (0.4, 1, 2)][severity - 1]
  x = _gaussian(x, sigma)
  b, h, w = x.shape[:3]
  visits = (max(h - 2 * delta, 0), max(w - 2 * delta, 0))
  for _ in range(passes):
    # Offsets in [-delta, delta), one pair per pixel visited and per image.
    x = glass_shuffle(x, rng.integers(-delta, delta, size=(*visits, 2, b)), delta, swap)
  return _gaussian(x, sigma)


def motion_blur(x, severity, rng):
  radius, sigma = [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)][severity - 1]
  angles = rng.uniform(-45.0, 45.0, size=x.shape[0])
  return np.stack([_motion_blur_one(img, radius, sigma, a) for img, a in zip(x, angles)])


def zoom_blur(x, severity, rng):
  stop = [1.06, 1.11, 1.16, 1.21, 1.26][severity - 1]
  zooms = np.arange(1, stop, 0.01)
  out = x.copy()
  for z in zooms:
    out += _clipped_zoom(x, z)
  return out / (len(zooms) + 1)


def snow(x, severity, rng):
  mean, std, zoom, threshold, radius, sigma, weight = [
      (0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
      (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
      (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)][severity - 1]
  b, h, w, c = x.shape
  flakes = _clipped_zoom(rng.normal(mean, std, (b, h, w, 1)), zoom)
  flakes = np.clip(np.where(flakes < threshold, 0.0, flakes), 0.0, 1.0)
  angles = rng.uniform(-135.0, -45.0, size=b)  # Falling roughly downwards.
  flakes = np.stack([_motion_blur_one(f, radius, sigma, a) for f, a in zip(flakes, angles)])
  gray = x if c == 1 else (x @ np.array([0.299, 0.587, 0.114]))[..., None]
  x = weight * x + (1 - weight) * np.maximum(x, gray * 1.5 + 0.5)
  return x + flakes + flakes[:, ::-1, ::-1]


def frost(x, severity, rng):
  image_weight, frost_weight = [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4),
                                (0.75, 0.45)][severity - 1]
  b, h, w, c = x.shape
  texture = np.stack([frost_texture(h, w, rng) for _ in range(b)])[..., None]
  # Frost is white with a slight blue cast, like the photographs; gray for C = 1.
  tint = np.array([0.87, 0.94, 1.0]) if c == 3 else np.ones(1)
  return image_weight * x + frost_weight * texture * tint


def fog(x, severity, rng):
  weight, decay = [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)][severity - 1]
  b, h, w, _ = x.shape
  size = _pow2_at_least(max(h, w))
  layer = np.stack([plasma_fractal(size, decay, rng)[:h, :w] for _ in range(b)])
  peak = x.max(axis=(1, 2, 3), keepdims=True)
  return (x + weight * layer[..., None]) * peak / (peak + weight)


def brightness(x, severity, rng):
  c = [0.05, 0.1, 0.15, 0.2, 0.3][severity - 1]
  # Raising the HSV value V = max(R, G, B) by c at fixed hue and saturation scales
  # the pixel by V' / V (RGB is linear in V at fixed H, S); black becomes gray V'.
  value = x.max(axis=-1, keepdims=True)
  new_value = np.minimum(value + c, 1.0)
  return np.where(value > 0, x * new_value / np.maximum(value, 1e-12), new_value)


def contrast(x, severity, rng):
  c = [0.75, 0.5, 0.4, 0.3, 0.15][severity - 1]
  mean = x.mean(axis=(1, 2), keepdims=True)
  return (x - mean) * c + mean


def _affine_from_points(src, dst):
  """The 2x3 affine map A with A [src; 1] = dst for three (x, y) point pairs."""
  return np.linalg.solve(np.hstack([src, np.ones((3, 1))]), dst).T


def elastic_transform(x, severity, rng):
  alpha, sigma, jitter = [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06),
                          (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)][severity - 1]
  b, h, w, c = x.shape
  size = min(h, w)
  alpha, sigma, jitter = alpha * size, sigma * size, jitter * size
  # A random affine map fixed by jittering three points around the centre (x, y).
  centre = np.array([w // 2, h // 2], np.float64)
  half = size // 3
  src = np.array([centre + half, [centre[0] + half, centre[1] - half], centre - half])
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  ones = np.ones_like(xx)
  coords = np.empty((4, b, h, w, c))
  coords[0] = np.arange(b)[:, None, None, None]
  coords[3] = np.arange(c)
  for n in range(b):
    fwd = _affine_from_points(src, src + rng.uniform(-jitter, jitter, src.shape))
    inv = np.linalg.inv(np.vstack([fwd, [0, 0, 1]]))[:2]
    # Each output pixel reads the input at the inverse image of its position.
    sx, sy = np.tensordot(inv, np.stack([xx, yy, ones]), axes=1)
    coords[1, n], coords[2, n] = sy[..., None], sx[..., None]
  warped = ndimage.map_coordinates(x, coords, order=1, mode="mirror")
  # Then a smooth random displacement field (Simard et al. 2003), one per image.
  shift = rng.uniform(-1, 1, (2, b, h, w))
  if sigma > 0:
    shift = ndimage.gaussian_filter(shift, (0, 0, sigma, sigma), mode="reflect",
                                    truncate=3.0)
  shift *= alpha
  coords[1] = yy[None, ..., None] + shift[1][..., None]
  coords[2] = xx[None, ..., None] + shift[0][..., None]
  return ndimage.map_coordinates(warped, coords, order=1, mode="reflect")


def _box_resize(img, size):
  """Resizes one [H, W] float image to (width, height) = size with PIL's box filter."""
  return np.asarray(Image.fromarray(img.astype(np.float32)).resize(
      size, Image.Resampling.BOX), dtype=np.float64)


def pixelate(x, severity, rng):
  c = [0.95, 0.9, 0.85, 0.75, 0.65][severity - 1]
  b, h, w, ch = x.shape
  small = (int(w * c), int(h * c))
  out = np.empty_like(x)
  for n in range(b):
    for k in range(ch):
      out[n, :, :, k] = _box_resize(_box_resize(x[n, :, :, k], small), (w, h))
  return out


def jpeg_compression(x, severity, rng):
  quality = [80, 65, 58, 50, 40][severity - 1]
  out = np.empty_like(x)
  for n, img in enumerate(_to_uint8(x)):
    buf = io.BytesIO()
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(
        buf, format="JPEG", quality=quality)
    decoded = np.asarray(Image.open(buf), dtype=np.float64) / 255.0
    out[n] = decoded.reshape(img.shape)
  return out


CORRUPTIONS: Dict[str, Callable] = {
    f.__name__: f for f in (
        gaussian_noise, shot_noise, impulse_noise, defocus_blur, glass_blur,
        motion_blur, zoom_blur, snow, frost, fog, brightness, contrast,
        elastic_transform, pixelate, jpeg_compression)
}


def corrupt(images: np.ndarray, name: str, severity: int,
            rng: np.random.Generator) -> np.ndarray:
  """Applies corruption `name` at `severity` (1..5) to a batch.

  Args:
    images: float `[B, H, W, C]` in [0, 1], C = 1 or 3.
    name: a key of `CORRUPTIONS`.
    severity: 1 (mildest) to 5.
    rng: the randomness; the result is a pure function of (images, name, severity,
      the generator's state).

  Returns:
    The corrupted batch, same shape and dtype as `images`, in [0, 1].

  Raises:
    ConfigError: unknown name or severity. ShapeError: not [B, H, W, 1 or 3].
    PonderError: values outside [0, 1] (e.g. uint8 pixels: divide by 255 first).
  """
  if name not in CORRUPTIONS:
    raise errors.unknown_key("corruption", name, CORRUPTIONS)
  if severity not in SEVERITIES:
    raise errors.ConfigError(f"severity must be one of {SEVERITIES}, got {severity!r}")
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise errors.ShapeError(
        f"corruptions take [B, H, W, C] with C = 1 or 3, got shape {images.shape}")
  if images.size and (images.min() < 0.0 or images.max() > 1.0):
    raise errors.PonderError(
        f"pixel values must lie in [0, 1], got [{images.min()}, {images.max()}]; "
        "divide uint8 images by 255 first")
  dtype = images.dtype if np.issubdtype(images.dtype, np.floating) else np.float32
  out = CORRUPTIONS[name](images.astype(np.float64), severity, rng)
  return np.clip(out, 0.0, 1.0).astype(dtype)
