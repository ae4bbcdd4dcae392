"""The PyTorch peer of `models/vit.py`, for side-by-side speed measurements.

A speed ratio means something only if both sides compute the same function, so this
is the same architecture, layer for layer: a linear patch embedding (a stride-p conv,
torch's idiom, the same map as ponder's patchify-then-Dense), a class token and learned
positions, pre-LN blocks (z' = z + MSA(LN(z)), z = z' + MLP(LN(z')), Eq. 2-3
of Dosovitskiy et al. 2021) with one fused qkv projection, exact-erf GELU, a final
LayerNorm and a linear head on the class token (Eq. 4). `load_flax_params` copies
ponder's weights in, and tests/analysis/test_analysis.py checks the logits agree.

Images are NCHW, torch's native layout (ponder takes NHWC); the patch order after
flattening is row-major in both, so the same weights give the same tokens.
"""

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ponder import errors


class Attention(nn.Module):
  """Multi-head self-attention with one fused qkv projection (torch's fused SDPA kernel)."""

  def __init__(self, width: int, heads: int, qkv_bias: bool):
    super().__init__()
    if width % heads:
      raise errors.ConfigError(f"width {width} is not divisible by heads {heads}")
    self.heads = heads
    self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
    self.proj = nn.Linear(width, width)

  def forward(self, x):
    b, n, d = x.shape
    # [b, n, 3, heads, head_dim]: the same split of the fused output as ponder's.
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
  """Pre-LN Transformer block (Eq. 2-3)."""

  def __init__(self, width: int, heads: int, mlp_dim: int, qkv_bias: bool):
    super().__init__()
    self.ln1 = nn.LayerNorm(width, eps=1e-6)
    self.attn = Attention(width, heads, qkv_bias)
    self.ln2 = nn.LayerNorm(width, eps=1e-6)
    self.fc1 = nn.Linear(width, mlp_dim)
    self.fc2 = nn.Linear(mlp_dim, width)

  def forward(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ViT(nn.Module):
  """ViT classifier with ponder's `models.vit.ViT` hyperparameters (dropout is 0)."""

  def __init__(self, *, num_classes: int, image_size: int, channels: int, patch: int = 4,
               width: int = 256, depth: int = 6, heads: int = 8, mlp_ratio: float = 4.0,
               qkv_bias: bool = True):
    super().__init__()
    if image_size % patch:
      raise errors.ConfigError(f"image {image_size} is not divisible into {patch}-pixel patches")
    tokens = (image_size // patch) ** 2 + 1
    self.patch_proj = nn.Conv2d(channels, width, patch, stride=patch)
    self.cls = nn.Parameter(torch.zeros(1, 1, width))
    self.pos_embedding = nn.Parameter(torch.randn(1, tokens, width) * 0.02)
    self.blocks = nn.ModuleList(
        Block(width, heads, int(width * mlp_ratio), qkv_bias) for _ in range(depth))
    self.ln_final = nn.LayerNorm(width, eps=1e-6)
    self.head = nn.Linear(width, num_classes)

  def forward(self, images):
    x = self.patch_proj(images).flatten(2).transpose(1, 2)
    x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln_final(x)[:, 0])


def _tensor(array, *axes) -> torch.Tensor:
  """A torch copy of a jax/numpy array, axes permuted as given."""
  array = np.asarray(array)
  return torch.from_numpy(np.array(array.transpose(axes) if axes else array, order="C"))


def _dense(module: nn.Linear, p) -> None:
  module.weight.copy_(_tensor(p["kernel"], 1, 0))
  if module.bias is not None:
    module.bias.copy_(_tensor(p["bias"]))


def _norm(module: nn.LayerNorm, p) -> None:
  module.weight.copy_(_tensor(p["scale"]))
  module.bias.copy_(_tensor(p["bias"]))


@torch.no_grad()
def load_flax_params(model: ViT, params) -> ViT:
  """Copies ponder ViT params (the flax tree) into `model`, in place; returns it.

  Dense kernels are [in, out] in flax and [out, in] in torch. ponder's patch projection
  is [h, w, in, out] (a conv) or its row-major flattening [h * w * in, out] (a Dense on
  flattened patches); torch's conv wants [out, in, h, w].
  """
  embed = params["embed"]
  out_channels, in_channels, patch, _ = model.patch_proj.weight.shape
  kernel = np.asarray(embed["proj"]["kernel"]).reshape(patch, patch, in_channels, out_channels)
  model.patch_proj.weight.copy_(_tensor(kernel, 3, 2, 0, 1))
  model.patch_proj.bias.copy_(_tensor(embed["proj"]["bias"]))
  model.cls.copy_(_tensor(embed["cls"]))
  model.pos_embedding.copy_(_tensor(embed["pos_embedding"]))
  for i, block in enumerate(model.blocks):
    p = params[f"block{i}"]
    _norm(block.ln1, p["ln1"])
    _dense(block.attn.qkv, p["attn"]["qkv"])
    _dense(block.attn.proj, p["attn"]["proj"])
    _norm(block.ln2, p["ln2"])
    _dense(block.fc1, p["mlp"]["fc1"])
    _dense(block.fc2, p["mlp"]["fc2"])
  _norm(model.ln_final, params["ln_final"])
  _dense(model.head, params["head"])
  return model
