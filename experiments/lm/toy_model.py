"""A small Flax NNX attention stack with planted, realistic score structure.

Freshly initialised attention layers score all keys about alike, so they skip
nothing and make poor subjects for sparsity measurements; no trained model
ships with this package. `SinkLocalTransformer` instead *sets* its query and
key projections so that head h of layer l scores, as
`blasst_jax.patterns.sink_local_qkv` does,

    s[i, j] ≈ sharpness[l][h] * L(i - j) + sink[l][h] * [j < sink_tokens] + noise

where `L(0) = 1` decays over about `window` positions. The residual stream
holds fixed positional features (cosines and sines of the position), a sink
flag, a constant 1 and the token content; the projections read the first
three for the structured part of the score and the content for the noise.
Attention outputs are written back into the content part only, so every
layer sees the same positional structure and content that earlier layers
have mixed.

Even layers are `blasst_jax.nn.SkipSelfAttention` (GQA), odd layers are
`flax.nnx.MultiHeadAttention` with `blasst_jax.nn.make_attention_fn`: the
two ways of putting skip-softmax into a Flax model.

    model = SinkLocalTransformer(rngs=nnx.Rngs(0))
    x = model.token_embeddings(jax.random.PRNGKey(1), batch=2, seq_len=1024)
    y = model(x)                                # [2, 1024, model.width]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from blasst_jax import nn as bjnn

DEFAULT_SHARPNESS = ((2.0, 6.0, 12.0, 20.0), (4.0, 10.0, 16.0, 24.0))


def _head_layout(head_dim: int) -> tuple[int, int]:
  """(position frequencies, noise dims) of one head: [cos, sin | sink | noise]."""
  n_freq = max(2, (head_dim * 3) // 8)
  n_noise = head_dim - 2 * n_freq - 1
  if n_noise < 1:
    raise ValueError(f"`head_dim` must be >= 8 for the planted pattern, got "
                     f"{head_dim}.")
  return n_freq, n_noise


class SinkLocalTransformer(nnx.Module):
  """Residual attention layers whose heads have sink + local-window scores.

  Attributes:
    layers: the attention layers (alternating `SkipSelfAttention` and
      `nnx.MultiHeadAttention`).
    width: residual stream width, `2 * n_freq + 2 + content_dim`.
  """

  def __init__(self, *, content_dim: int = 32, num_heads: int = 4,
               num_kv_heads: int = 2, head_dim: int = 32,
               sharpness: Sequence[Sequence[float]] = DEFAULT_SHARPNESS,
               sink_ratio: float = 0.75, window: int = 64,
               sink_tokens: int = 4, noise: float = 1.0, threshold=0.0,
               block_q: int | None = None, block_kv: int | None = None,
               rngs: nnx.Rngs):
    """Builds the stack.

    Args:
      content_dim: width of the token content part of the residual stream.
      num_heads: query heads per layer.
      num_kv_heads: key/value heads of the `SkipSelfAttention` layers
        (the `MultiHeadAttention` layers have `num_heads`).
      head_dim: per-head width (>= 8).
      sharpness: one sequence of per-head peak scores per layer (cycled over
        heads); its length is the number of layers.
      sink_ratio: sink score as a fraction of the head's sharpness.
      window: width of the local window in tokens.
      sink_tokens: how many leading tokens act as the sink.
      noise: standard deviation of the content part of each score.
      threshold, block_q, block_kv: the layers' skip-softmax settings.
      rngs: initialisation randomness (also draws the frequencies).
    """
    if not sharpness or any(len(s) == 0 for s in sharpness):
      raise ValueError("`sharpness` must hold one non-empty sequence of "
                       f"per-head values per layer, got {sharpness!r}.")
    if num_heads % num_kv_heads:
      raise ValueError(f"num_heads ({num_heads}) must be a multiple of "
                       f"num_kv_heads ({num_kv_heads}).")
    n_freq, _ = _head_layout(head_dim)
    self.n_freq = n_freq
    self.content_dim = content_dim
    self.sink_tokens = sink_tokens
    self.width = 2 * n_freq + 2 + content_dim
    # The planted parts are drawn with numpy from a seed of `rngs` (no
    # device work per draw); the frequencies are static floats.
    seed = int(jax.random.randint(rngs.params(), (), 0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    # Stratified over (0, π / window): every draw has the same spread of
    # frequencies, so the window looks alike from seed to seed.
    strata = (np.arange(n_freq) + rng.uniform(size=n_freq)) / n_freq
    self.omega = tuple(float(w) for w in strata * math.pi / window)

    layers = []
    for i, layer_sharpness in enumerate(sharpness):
      beta = np.array([layer_sharpness[h % len(layer_sharpness)]
                       for h in range(num_heads)], np.float32)
      if i % 2 == 0:
        layer = bjnn.SkipSelfAttention(
            num_heads, self.width, num_kv_heads=num_kv_heads,
            head_dim=head_dim, threshold=threshold, causal=True,
            block_q=block_q, block_kv=block_kv, rngs=rngs)
        kv_heads = num_kv_heads
      else:
        layer = nnx.MultiHeadAttention(
            num_heads=num_heads, in_features=self.width,
            qkv_features=num_heads * head_dim, out_features=self.width,
            use_bias=False, decode=False, rngs=rngs,
            attention_fn=bjnn.make_attention_fn(
                threshold, causal=True, block_q=block_q, block_kv=block_kv))
        kv_heads = num_heads
      w_q, w_k = self._planted_qk(rng, beta, sink_ratio * beta, kv_heads,
                                  head_dim, noise)
      self._set_projections(layer, w_q, w_k)
      layers.append(layer)
    self.layers = nnx.List(layers)

  def _planted_qk(self, rng: np.random.Generator, beta, sink, kv_heads: int,
                  head_dim: int, noise: float):
    """Query and key kernels [width, heads, head_dim] of one layer."""
    n_freq, n_noise = _head_layout(head_dim)
    heads = beta.shape[0]
    pos, sink_flag, const = (slice(0, 2 * n_freq), 2 * n_freq, 2 * n_freq + 1)
    content = slice(2 * n_freq + 2, self.width)
    noise_dims = slice(2 * n_freq + 1, head_dim)
    # Entries N(0, 1/content_dim): unit-variance projections of the content.
    scale = 1.0 / math.sqrt(self.content_dim)
    r_q = rng.normal(0.0, scale, (heads, self.content_dim, n_noise))
    r_k = rng.normal(0.0, scale, (kv_heads, self.content_dim, n_noise))
    # q carries sqrt(head_dim) to undo the default sm_scale.
    root_d = math.sqrt(head_dim)
    w_q = np.zeros((self.width, heads, head_dim), np.float32)
    w_k = np.zeros((self.width, kv_heads, head_dim), np.float32)
    eye = np.eye(2 * n_freq, dtype=np.float32)
    for h in range(heads):
      w_q[pos, h, :2 * n_freq] = root_d * beta[h] / n_freq * eye
      w_q[const, h, 2 * n_freq] = root_d * sink[h]
      w_q[content, h, noise_dims] = root_d * noise / math.sqrt(n_noise) * r_q[h]
    for g in range(kv_heads):
      w_k[pos, g, :2 * n_freq] = eye
      w_k[sink_flag, g, 2 * n_freq] = 1.0
      w_k[content, g, noise_dims] = r_k[g]
    return w_q, w_k

  def _set_projections(self, layer, w_q, w_k) -> None:
    """Writes the planted kernels; outputs go to the content part only."""
    structure = 2 * self.n_freq + 2
    if isinstance(layer, bjnn.SkipSelfAttention):
      layer.q_proj.kernel[...] = jnp.asarray(w_q.reshape(self.width, -1))
      layer.k_proj.kernel[...] = jnp.asarray(w_k.reshape(self.width, -1))
      layer.out_proj.kernel[...] = layer.out_proj.kernel[...].at[
          :, :structure].set(0.0)
    else:
      layer.query.kernel[...] = jnp.asarray(w_q)
      layer.key.kernel[...] = jnp.asarray(w_k)
      layer.out.kernel[...] = layer.out.kernel[...].at[..., :structure].set(
          0.0)

  def embed(self, content):
    """content [batch, seq_len, content_dim] -> stream [batch, seq_len, width]."""
    b, t, _ = content.shape
    angle = jnp.arange(t, dtype=jnp.float32)[:, None] * jnp.asarray(
        self.omega)[None, :]                                   # [t, n_freq]
    sink = (jnp.arange(t) < self.sink_tokens).astype(jnp.float32)[:, None]
    structure = jnp.concatenate(
        [jnp.cos(angle), jnp.sin(angle), sink, jnp.ones_like(sink)], axis=-1)
    structure = jnp.broadcast_to(structure[None], (b, t, structure.shape[-1]))
    return jnp.concatenate([structure, content.astype(jnp.float32)], axis=-1)

  def token_embeddings(self, key, *, batch: int, seq_len: int):
    """Random token content f32 [batch, seq_len, content_dim]."""
    return jax.random.normal(key, (batch, seq_len, self.content_dim))

  def __call__(self, content):
    """content [batch, seq_len, content_dim] -> [batch, seq_len, width].

    Raises:
      ValueError: for content of another rank or last dimension.
    """
    if content.ndim != 3 or content.shape[-1] != self.content_dim:
      raise ValueError(f"`content` must have shape [batch, seq_len, "
                       f"{self.content_dim}], got {content.shape}.")
    x = self.embed(content)
    for layer in self.layers:
      x = x + layer(x)
    return x
