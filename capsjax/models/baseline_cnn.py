"""The paper's baseline CNN (Sabour, Frosst & Hinton 2017, Sec. 5): three 5x5 stride-1 ReLU
convolutions of 256, 256, 128 channels, fully connected ReLU layers of 328 and 192 units,
dropout, and a softmax layer over the classes.

Not a `common.CapsuleModel`: it has no capsules, routing or decoder. It is called like one,
`model(images, labels=None) -> dict`, with 'class_scores' (softmax probabilities) and 'pred'
as the capsule models give them, so accuracy code works unchanged.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from capsjax import layers
from capsjax.models import common


class BaselineCNN(nnx.Module):
  """Baseline CNN. Call as `model(images, labels=None, *, deterministic=None, dropout_key=None)`.

  The paper does not name the padding or pooling; with 'SAME' padding and no pooling the
  network has the 35.4M parameters it reports for 28x28x1 inputs and 10 classes
  (35,445,522: the 28 * 28 * 128 = 100,352 flattened features times 328 dominate), so
  these are the choices here: each conv keeps H x W. On a 40x40 canvas the same layers
  have 69,704,466 parameters.

  The authors' released baseline (Sarasra/models research/capsules,
  `models/conv_model.py`) is another network: two 5x5 convs of 512 and 256 channels,
  each followed by 2x2 max pooling, one fully connected layer of 1024 and no dropout. So
  the dropout rate is given in neither; `dropout_rate=0.5` is an assumption.

  Args:
    image_shape: (H, W, C) of the inputs.
    num_classes: K, the softmax outputs.
    channels: output channels of the convs, in order.
    kernel: side of every conv kernel (stride 1, 'SAME' padding).
    hidden: units of the fully connected ReLU layers, in order.
    dropout_rate: fraction of the last hidden layer's units dropped in training, in [0, 1).
    dtype: 'float32' or 'bfloat16', the conv/matmul dtype; parameters, logits and
      probabilities are float32.
    init: 'torch', 'keras' or 'tf' (`layers.initializers`). The convs use the 'conv1'
      role and the dense layers the 'decoder' role, so 'tf' gives the authors'
      `conv_model.py` initialisation: truncated normal stddev 0.05 for convs and 0.1 for
      dense layers, biases 0.1.
    conv_impl: a concrete conv lowering (one of `capsjax.conv.IMPLS`).
    rngs: nnx.Rngs with a `params` stream.

  Raises:
    ValueError (`errors.ConfigError` for the fields a config would hold): naming the bad
    value and what was expected.
  """

  def __init__(
    self,
    *,
    image_shape: Sequence[int],
    num_classes: int,
    channels: Sequence[int] = (256, 256, 128),
    kernel: int = 5,
    hidden: Sequence[int] = (328, 192),
    dropout_rate: float = 0.5,
    dtype: str = "float32",
    init: str = "torch",
    conv_impl: str = "xla",
    rngs: nnx.Rngs,
  ):
    h, w, c = common.check_image_shape(image_shape, num_classes)
    channels = common.check_sizes("channels", channels)
    hidden = common.check_sizes("hidden", hidden)
    kernel = common.positive_int("kernel", kernel)
    if (
      isinstance(dropout_rate, bool)
      or not isinstance(dropout_rate, numbers.Real)
      or not 0.0 <= dropout_rate < 1.0
    ):
      raise ValueError(f"dropout_rate must be a number in [0, 1), got {dropout_rate!r}")
    if dtype not in common.DTYPES:
      raise ValueError(f"dtype must be one of {sorted(common.DTYPES)}, got {dtype!r}")
    if init not in layers.INITS:
      raise ValueError(f"init must be one of {layers.INITS}, got {init!r}")
    conv_impl = common.check_conv_impl(conv_impl)
    compute = common.DTYPES[dtype]
    self.image_shape = (h, w, c)
    self.num_classes = int(num_classes)
    self.kernel = kernel
    convs = []
    for c_in, c_out in zip((c, *channels[:-1]), channels, strict=True):
      convs.append(
        layers.Conv2D(
          c_in, c_out, kernel, impl=conv_impl, dtype=compute, init=init, role="conv1", rngs=rngs
        )
      )
    self.convs = nnx.List(convs)
    sizes = (h * w * channels[-1], *hidden, self.num_classes)
    dense = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
      kernel_init, bias_init = layers.initializers(init, "decoder", a)
      dense.append(
        nnx.Linear(
          a,
          b,
          kernel_init=kernel_init,
          bias_init=bias_init,
          dtype=compute,
          param_dtype=jnp.float32,
          rngs=rngs,
        )
      )
    self.dense = nnx.List(dense)
    # No rngs of its own: the key comes with each call, so the model's state holds only
    # parameters and a jitted step stays a pure function of (state, batch, key).
    self.dropout = nnx.Dropout(float(dropout_rate))

  def __call__(
    self,
    images: jax.Array,
    labels: jax.Array | None = None,
    *,
    deterministic: bool | None = None,
    dropout_key: jax.Array | None = None,
  ) -> dict[str, jax.Array]:
    """Runs the network.

    Args:
      images: [B, H, W, C] float in [0, 1].
      labels: [B] int, ignored (the capsule models' call signature).
      deterministic: True: no dropout; False: dropout with `dropout_key`; None: the
        module's mode, `self.dropout.deterministic` (False after construction and
        `model.train()`, True after `model.eval()`).
      dropout_key: PRNG key of the dropout mask; required when dropout is on.

    Returns:
      dict with 'logits' float32 [B, K], 'class_scores' float32 [B, K] (softmax
      probabilities) and 'pred' int32 [B] (their argmax).

    Raises:
      ValueError: images of the wrong shape, or dropout on without a key.
    """
    if tuple(images.shape[1:]) != self.image_shape or images.ndim != 4:
      raise ValueError(
        f"images must have shape [B, {', '.join(map(str, self.image_shape))}] for this "
        f"model, got {tuple(images.shape)}"
      )
    if deterministic is None:
      deterministic = bool(self.dropout.deterministic)
    if not deterministic and self.dropout.rate > 0 and dropout_key is None:
      raise ValueError(
        "dropout is on (deterministic=False, or the model is in train mode) but no "
        "dropout_key was given; pass dropout_key, or deterministic=True / model.eval() "
        "for evaluation"
      )
    k = self.kernel
    # 'SAME' for stride 1: (k - 1) // 2 zeros before and k // 2 after, as XLA pads.
    pad = ((0, 0), ((k - 1) // 2, k // 2), ((k - 1) // 2, k // 2), (0, 0))
    x = images
    for conv in self.convs:
      x = jax.nn.relu(conv(jnp.pad(x, pad)))  # [B, H, W, channels_i]
    x = x.reshape(x.shape[0], -1)  # [B, H*W*channels[-1]]
    for layer in self.dense[:-1]:
      x = jax.nn.relu(layer(x))  # [B, hidden_i]
    x = self.dropout(x, deterministic=deterministic, rngs=dropout_key)  # [B, hidden[-1]]
    logits = self.dense[-1](x).astype(jnp.float32)  # [B, K]
    return {
      "logits": logits,
      "class_scores": jax.nn.softmax(logits, axis=-1),  # [B, K]
      "pred": jnp.argmax(logits, axis=-1).astype(jnp.int32),  # [B]
    }
