"""FLOPs: what the compiled program does, and an analytic count to check it against.

The compiled count (XLA's cost analysis) is the truth for a static program; the
analytic count is what we can still compute when compute becomes data-dependent
(dropped tokens, adaptive depth), so it is tested against the compiled count on static
cases (tests/analysis/test_analysis.py).

Conventions: one multiply-accumulate (MAC) is 2 FLOPs. Many papers and tools (fvcore,
thop, ptflops) report MACs under the name "FLOPs"; the seed document's 0.32 "GFLOPs"
for its ViT is such a MAC count (0.64 GFLOPs as FLOPs).
"""

from typing import Any, Mapping

import jax

from ponder import errors


def cost_of(compiled) -> Mapping[str, Any]:
  """The cost analysis (`flops`, `bytes accessed`, ...) of a `jax.stages.Compiled`."""
  analysis = compiled.cost_analysis()
  # Older jax returns one dict per compiled module in a list; newer jax returns a dict.
  if isinstance(analysis, (list, tuple)):
    merged = {}
    for entry in analysis:
      for key, value in entry.items():
        merged[key] = merged.get(key, 0.0) + value
    analysis = merged
  if not analysis or "flops" not in analysis:
    raise errors.PonderError(
        f"the {jax.default_backend()} backend gave no FLOP count in its cost analysis "
        f"({analysis!r}); use the analytic count (e.g. vit_flops) on this backend.")
  return analysis


def compiled_flops(fn, *args, **kwargs) -> float:
  """FLOPs of one call of `fn(*args, **kwargs)`, as XLA compiles it.

  `fn` may be plain or already jitted (its shardings and donation are then kept);
  `args` may be arrays or `jax.ShapeDtypeStruct`s, so nothing needs to run.
  """
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  return float(cost_of(jitted.lower(*args, **kwargs).compile())["flops"])


def vit_macs(*, image_size: int, patch: int, channels: int, width: int, depth: int,
             mlp_dim: int, num_classes: int) -> int:
  """Multiply-accumulates of the matmuls in one image's forward pass through a ViT.

  Counts the patch projection, per block the qkv projection, the two attention
  matmuls (QK^T and AV, each tokens^2 x width over all heads), the output projection
  and the two MLP layers, and the head on the class token. Norms, softmax, GELU and
  additions are left out (the usual convention); XLA counts them, which puts the
  compiled count a few percent above 2 x this at the seed size (more at small widths).
  """
  if image_size % patch:
    raise errors.ConfigError(f"image {image_size} is not divisible into {patch}-pixel patches")
  patches = (image_size // patch) ** 2
  tokens = patches + 1  # The class token.
  embed = patches * (patch * patch * channels) * width
  attention = tokens * width * 3 * width + 2 * tokens * tokens * width + tokens * width * width
  mlp = 2 * tokens * width * mlp_dim
  return embed + depth * (attention + mlp) + width * num_classes


def vit_flops(**kwargs) -> int:
  """FLOPs (2 x MACs) of one image's forward pass; takes `vit_macs`'s arguments."""
  return 2 * vit_macs(**kwargs)
