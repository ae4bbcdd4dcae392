"""Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words").

A class token, a learned position embedding, pre-LayerNorm blocks (Eq. 2-3 of the
paper: z' = z + MSA(LN(z)), z = z' + MLP(LN(z'))) and a linear head on the final class
token (Eq. 4). `qkv_bias` puts biases on the query/key/value projection (3 x width per
block).

`ViT` is also the backbone of the variants in `models/dendritic_liquid_vit.py`: they
call its `embed_patches`, `encode` (the block loop, with a per-block hook) and
`classify`, so the blocks, their names and the head are defined once, here.

`compute_dtype` "bfloat16" multiplies every dense layer in bf16 with float32
accumulation forward and backward (`ponder.nn.dense.matmul`); parameters, the residual
stream, attention, LayerNorm and the loss stay float32. It pays off only where the
hardware multiplies bf16 natively (GPU/TPU, AVX512_BF16 CPUs).
"""

from typing import Callable, Optional

import flax.linen as nn
import jax.numpy as jnp

from ponder.nn import dense
from ponder.nn import token_pruning


class MlpBlock(nn.Module):
  """Two-layer MLP with GELU (the ViT MLP of Eq. 3)."""
  hidden_dim: int
  dropout: float = 0.0
  compute_dtype: str = "float32"  # matmul operands (module doc)

  @nn.compact
  def __call__(self, x, *, train: bool):
    out_dim = x.shape[-1]
    x = dense.Dense(self.hidden_dim, compute_dtype=self.compute_dtype, name="fc1")(x)
    x = nn.gelu(x, approximate=False)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = dense.Dense(out_dim, compute_dtype=self.compute_dtype, name="fc2")(x)
    return nn.Dropout(self.dropout, deterministic=not train)(x)


class SelfAttention(nn.Module):
  """Multi-head self-attention with one fused qkv projection.

  `policy` (a keep mask D [batch, n], soft or straight-through hard) applies DynamicViT's
  masked softmax (Eq. 7-9 of Rao et al. 2021, `ponder.nn.token_pruning.masked_attention`),
  through which D gets gradients; that path has no attention dropout. None is plain
  attention.
  """
  num_heads: int
  qkv_bias: bool = True
  dropout: float = 0.0
  compute_dtype: str = "float32"  # matmul operands of qkv and proj (module doc)

  @nn.compact
  def __call__(self, x, *, train: bool, policy: Optional[jnp.ndarray] = None):
    b, n, d = x.shape
    if d % self.num_heads:
      raise ValueError(f"width {d} is not divisible by num_heads {self.num_heads}")
    qkv = dense.Dense(3 * d, use_bias=self.qkv_bias, compute_dtype=self.compute_dtype,
                      name="qkv")(x)
    q, k, v = jnp.split(qkv.reshape(b, n, 3, self.num_heads, d // self.num_heads), 3, axis=2)
    if policy is not None:
      out = token_pruning.masked_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], policy)
    else:
      out = nn.dot_product_attention(
          q[:, :, 0], k[:, :, 0], v[:, :, 0],
          dropout_rate=self.dropout, deterministic=not train,
          dropout_rng=self.make_rng("dropout") if train and self.dropout > 0 else None)
    return dense.Dense(d, compute_dtype=self.compute_dtype, name="proj")(out.reshape(b, n, d))


class EncoderBlock(nn.Module):
  """Pre-LN Transformer block (Eq. 2-3); `policy` goes to `SelfAttention`."""
  num_heads: int
  mlp_dim: int
  qkv_bias: bool = True
  dropout: float = 0.0
  compute_dtype: str = "float32"  # matmul operands (module doc)

  @nn.compact
  def __call__(self, x, *, train: bool, policy: Optional[jnp.ndarray] = None):
    y = nn.LayerNorm(epsilon=1e-6, name="ln1")(x)
    y = SelfAttention(self.num_heads, self.qkv_bias, self.dropout, self.compute_dtype,
                      name="attn")(y, train=train, policy=policy)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
    y = nn.LayerNorm(epsilon=1e-6, name="ln2")(x)
    return x + MlpBlock(self.mlp_dim, self.dropout, self.compute_dtype, name="mlp")(
        y, train=train)


class PatchEmbed(nn.Module):
  """Non-overlapping patches, linearly projected (Eq. 1), plus class token and positions."""
  patch: int
  width: int

  @nn.compact
  def __call__(self, images):
    b, h, w, _ = images.shape
    if h % self.patch or w % self.patch:
      raise ValueError(f"image {h}x{w} is not divisible into {self.patch}x{self.patch} patches")
    x = nn.Conv(self.width, (self.patch, self.patch), strides=self.patch,
                padding="VALID", name="proj")(images)
    x = x.reshape(b, -1, self.width)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)), x], axis=1)
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                     (1, x.shape[1], self.width))
    return x + pos


# encode's per-block hook: hook(l, x, block) -> the tokens after block l, where
# block(x, policy=None) runs `block{l}` (EncoderBlock) on x.
BlockHook = Callable[..., jnp.ndarray]


def _run_block(l, x, block):
  del l
  return block(x)


class ViT(nn.Module):
  """ViT classifier: patch embedding, `depth` pre-LN blocks, LayerNorm, linear head.

  Parameters: `embed` (PatchEmbed), `block{l}` (EncoderBlock) for l < depth,
  `ln_final`, `head`.
  """
  num_classes: int
  patch: int = 4
  width: int = 256
  depth: int = 6
  heads: int = 8
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  dropout: float = 0.0
  compute_dtype: str = "float32"  # dense layers' matmul operands (module doc)

  def embed_patches(self, images, *, train: bool):
    """Eq. 1: patch embedding, class token and positions, then dropout."""
    x = PatchEmbed(self.patch, self.width, name="embed")(images)
    return nn.Dropout(self.dropout, deterministic=not train)(x)

  def encode(self, x, *, train: bool, hook: BlockHook = _run_block):
    """The `depth` blocks (Eq. 2-3). Block l's step is `hook(l, x, block)`; the default
    is `block(x)`. A variant's hook scores, prunes or mixes around the call."""
    for l in range(self.depth):
      block = EncoderBlock(self.heads, int(self.width * self.mlp_ratio), self.qkv_bias,
                           self.dropout, self.compute_dtype, name=f"block{l}")
      x = hook(l, x, lambda z, policy=None, block=block: block(z, train=train, policy=policy))
    return x

  def classify(self, x):
    """Eq. 4: final LayerNorm, linear head on the class token. Returns (logits, the
    normalised tokens)."""
    x = nn.LayerNorm(epsilon=1e-6, name="ln_final")(x)
    logits = dense.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                         compute_dtype=self.compute_dtype, name="head")(x[:, 0])
    return logits, x

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    x = self.encode(self.embed_patches(images, train=train), train=train)
    return self.classify(x)[0]


Model = ViT
