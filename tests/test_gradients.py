"""Shared gradient suite: every differentiable implementation of
`bj.attention` runs it (tokamax's `test_base` pattern).

Add an implementation with one line at the bottom of this file:

    class TestNewGradients(GradientTestBase): implementation = "new"

The gradient of skip-softmax attention is that of the sparse forward
(skipped blocks carry zero probability). At λ > 0 the forward is only
piecewise smooth: a skip decision flips where a block's gap
(`max_rows(block_max - running_max)`) crosses log λ. Tests that compare with
finite differences, or with a second implementation, first check that every
decision is clear of log λ.

On CPU the Pallas kernels run in interpret mode, where the time goes into
compiling: the functions below are jitted once per module with λ traced, so
that one compile serves every λ of a test.
"""

from __future__ import annotations

import functools
import math

from flax import nnx
import jax
import jax.numpy as jnp
from jax import test_util as jtu
import numpy as np
import optax
import pytest

import blasst_jax as bj
from blasst_jax import nn as bjnn
from blasst_jax import testing
# Imported before anything is traced: importing Pallas registers config
# options, and a function traced before that is traced (and compiled) again.
from blasst_jax.kernels import pallas_triton  # pylint: disable=unused-import
from blasst_jax.kernels import pallas_triton_bwd  # pylint: disable=unused-import

key_for = testing.key_for

BLOCK = 16
# λ candidates, largest (most pruning) first.
THRESHOLDS = (0.3, 0.2, 0.1, 0.05, 0.02, 0.01)
# For finite differences: large λ, so that the skipped blocks carry enough
# weight for the sparse and the dense gradient to differ far beyond the
# finite-difference noise.
FD_THRESHOLDS = (0.9, 0.7, 0.5, 0.4, 0.3, 0.2, 0.1)
# Smallest |gap - log λ| (natural log) allowed at any decision when two
# implementations are compared: far above f32 rounding of the scores.
MARGIN = 0.05
# Finite-difference step: in f32 jax's default (1e-4) leaves ~3e-3 relative
# rounding noise at these score magnitudes; 1e-3 leaves ~4e-4.
FD_EPS = 1e-3
FD_TOL = 2e-3
# Realistic score structure: attention sink + local window.
PATTERN = dict(sharpness=(8.0, 16.0), window=8)

# Finite-difference problems: odd lengths, GQA, q_len != kv_len.
FD_SHAPE = testing.AttentionShape(batch=1, q_len=53, kv_len=61, q_heads=2,
                                  kv_heads=1, head_dim=16)
FD_CAUSAL_SHAPE = testing.AttentionShape(batch=2, q_len=93, kv_len=93,
                                         q_heads=2, kv_heads=1, head_dim=16)
# Comparisons with other gradients (head_dim 24 is padded to 32 inside the
# Triton kernels).
GQA_SHAPE = testing.AttentionShape(batch=2, q_len=61, kv_len=77, q_heads=4,
                                   kv_heads=2, head_dim=24)


# ---------------------------------------------------------------- oracles
@functools.partial(jax.jit, static_argnames=("causal",))
def oracle(q, k, v, threshold, kv_lengths=None, block_mask=None, *,
           causal):
  return bj.reference.blockwise_attention(
      q, k, v, block_q=BLOCK, block_kv=BLOCK, threshold=threshold,
      causal=causal, kv_lengths=kv_lengths, block_mask=block_mask)


@functools.partial(jax.jit, static_argnames=("causal",))
def oracle_vjp(q, k, v, d_out, threshold, kv_lengths=None, block_mask=None,
               *, causal):
  """(dq, dk, dv) of the oracle's autodiff with the same skip rule."""
  _, vjp = jax.vjp(lambda q, k, v: oracle(
      q, k, v, threshold, kv_lengths, block_mask, causal=causal).out, q, k, v)
  return vjp(d_out)


@functools.partial(jax.jit, static_argnames=("implementation", "causal"))
def attention(q, k, v, threshold=None, kv_lengths=None, block_mask=None, *,
              implementation, causal):
  """(out, SkipStats) of bj.attention on BLOCK tiles; threshold None is
  λ = 0 known at trace time (the dense build), an array is a traced λ."""
  return bj.attention(
      q, k, v, threshold=0.0 if threshold is None else threshold,
      causal=causal, kv_lengths=kv_lengths, block_mask=block_mask,
      implementation=implementation, block_q=BLOCK, block_kv=BLOCK,
      return_stats=True)


@functools.partial(jax.jit, static_argnames=("implementation", "causal"))
def attention_vjp(q, k, v, d_out, threshold=None, kv_lengths=None,
                  block_mask=None, *, implementation, causal):
  """(out, (dq, dk, dv), SkipStats) of bj.attention."""
  fn = lambda q, k, v: bj.attention(
      q, k, v, threshold=0.0 if threshold is None else threshold,
      causal=causal, kv_lengths=kv_lengths, block_mask=block_mask,
      implementation=implementation, block_q=BLOCK, block_kv=BLOCK,
      return_stats=True)
  out, vjp, stats = jax.vjp(fn, q, k, v, has_aux=True)
  return out, vjp(d_out), stats


# ---------------------------------------------------------------- helpers
def decision_blocks(result) -> jax.Array:
  """bool [b, hq, nq, nk]: visited blocks that are not a tile's first visited
  block, i.e. those the skip rule decides on."""
  visited = result.visited_mask
  first = visited & (jnp.cumsum(visited, axis=-1) == 1)
  return visited & ~first


def decision_margin(result, threshold: float) -> float:
  """min |gap - log λ| over the blocks the skip rule decides on."""
  dist = jnp.abs(result.block_gap - math.log(threshold))
  return float(jnp.min(jnp.where(decision_blocks(result), dist, jnp.inf)))


def clear_threshold(*problems, margin=MARGIN, thresholds=THRESHOLDS, causal,
                    **options) -> float:
  """The largest λ of `thresholds` that skips at least one block in each
  (q, k, v) of `problems` while every decision lies more than `margin` from
  log λ.

  The gaps do not depend on λ (a block is skipped only when no row's max
  rises, so the running max is that of the dense walk): one oracle call at
  λ = 0 per problem serves every candidate.
  """
  results = [oracle(*p, jnp.float32(0), causal=causal, **options)
             for p in problems]

  def clear(result, threshold):
    skipped = jnp.sum(decision_blocks(result)
                      & (result.block_gap < math.log(threshold)))
    return int(skipped) > 0 and decision_margin(result, threshold) > margin

  for threshold in thresholds:
    if all(clear(result, threshold) for result in results):
      return threshold
  gaps = [np.sort(np.asarray(r.block_gap)[np.asarray(decision_blocks(r))])
          for r in results]
  raise AssertionError(f"No λ in {thresholds} skips a block with every gap "
                       f"{margin} away from log λ; gaps: {gaps}")


def fd_step_bound(q, k, eps: float) -> float:
  """How far a finite-difference step (q, k) ± eps·(t_q, t_k), t standard
  normal, can move a block gap: per score |Δs| <= sm_scale·eps·(|t_q||k| +
  |q||t_k| + eps|t_q||t_k|) with |t| <= 2·sqrt(head_dim) per row (|t|
  concentrates at sqrt(head_dim)); a gap is a difference of two maxima."""
  d = q.shape[-1]
  t = 2.0 * math.sqrt(d)
  q_norm = float(jnp.max(jnp.linalg.norm(q, axis=-1)))
  k_norm = float(jnp.max(jnp.linalg.norm(k, axis=-1)))
  return 2.0 * d ** -0.5 * eps * (t * k_norm + q_norm * t + eps * t * t)


def assert_grads_close(got, want, *, rtol=1e-4, atol_scale=2e-5,
                       names=("dq", "dk", "dv")):
  """Each gradient equals `want` up to rtol, with atol relative to its
  largest entry, and holds no NaN."""
  for g, w, name in zip(got, want, names):
    assert g.shape == w.shape and g.dtype == w.dtype, name
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert not np.isnan(g).any(), f"NaN in {name}"
    scale = max(float(np.max(np.abs(w))), 1e-6)
    np.testing.assert_allclose(g, w, rtol=rtol, atol=atol_scale * scale,
                               err_msg=name)


def relative_difference(a, b) -> float:
  """max over (dq, dk, dv) of max|a - b| / max|b|."""
  return max(float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y)))
             for x, y in zip(a, b))


def random_block_mask(key, shape, density=0.75):
  nq, nk = -(-shape.q_len // BLOCK), -(-shape.kv_len // BLOCK)
  return jax.random.bernoulli(key, density,
                              (shape.batch, shape.q_heads, nq, nk))


# -------------------------------------------------------------- the suite
class GradientTestBase:
  """The suite; subclasses set `implementation`."""

  implementation: str = ""

  def attention(self, q, k, v, **kwargs):
    return bj.attention(q, k, v, implementation=self.implementation,
                        block_q=BLOCK, block_kv=BLOCK, **kwargs)

  # 1. Finite differences, at λ = 0 and at a λ that skips blocks.
  @pytest.mark.parametrize("causal", [False, True],
                           ids=["full", "causal_ragged"])
  def test_finite_differences(self, causal):
    shape = FD_CAUSAL_SHAPE if causal else FD_SHAPE
    q, k, v = shape.inputs(key_for("grad_fd", causal), **PATTERN)
    kv_lengths = None
    if causal:   # The second sequence is 16 keys shorter.
      kv_lengths = jnp.array([shape.kv_len, shape.kv_len - 16], jnp.int32)
    # The step cannot carry a gap across log λ.
    threshold = clear_threshold((q, k, v), kv_lengths=kv_lengths, causal=causal,
                                margin=fd_step_bound(q, k, FD_EPS),
                                thresholds=FD_THRESHOLDS)
    d_out = jax.random.normal(key_for("grad_fd_cotangent"), q.shape)
    grads = {}
    for lam in (0.0, threshold):
      # λ is traced: both values share one compile.
      call = functools.partial(attention, threshold=jnp.float32(lam),
                               kv_lengths=kv_lengths, causal=causal,
                               implementation=self.implementation)
      fn = lambda q, k, v, call=call: call(q, k, v)[0]
      jtu.check_grads(fn, (q, k, v), order=1, modes=("rev",), eps=FD_EPS,
                      atol=FD_TOL, rtol=FD_TOL)
      skipped = int(jnp.sum(call(q, k, v)[1].skipped_blocks))
      assert skipped > 0 if lam else skipped == 0
      grads[lam] = jax.vjp(fn, q, k, v)[1](d_out)
    # The sparse gradient is not the dense one, far beyond FD_TOL.
    assert relative_difference(grads[threshold], grads[0.0]) > 10 * FD_TOL

  # 2. λ > 0 with kv_lengths and a block mask: the oracle's autodiff.
  @pytest.mark.parametrize("causal", [False, True])
  def test_sparse_gradients_match_oracle(self, causal):
    shape = GQA_SHAPE
    key = key_for("grad_oracle", causal)
    q, k, v = shape.inputs(key, **PATTERN)
    block_mask = random_block_mask(jax.random.fold_in(key, 1), shape)
    kv_lengths = jnp.array([shape.kv_len, 50], jnp.int32)
    masks = dict(kv_lengths=kv_lengths, block_mask=block_mask)
    threshold = clear_threshold((q, k, v), causal=causal, **masks)
    d_out = jax.random.normal(jax.random.fold_in(key, 2), q.shape)
    lam = jnp.float32(threshold)
    out, grads, stats = attention_vjp(q, k, v, d_out, lam, causal=causal,
                                      implementation=self.implementation,
                                      **masks)
    expected = oracle(q, k, v, lam, causal=causal, **masks)
    assert int(jnp.sum(expected.stats.skipped_blocks)) > 0, "nothing skipped"
    np.testing.assert_array_equal(stats.skipped_blocks,
                                  expected.stats.skipped_blocks)
    testing.assert_close(out, expected.out, jnp.float32)
    want = oracle_vjp(q, k, v, d_out, lam, causal=causal, **masks)
    assert_grads_close(grads, want)
    # Keys past a sequence's length get no gradient.
    for g in grads[1:]:
      np.testing.assert_array_equal(g[1, 50:], 0.0)
    # Skipping changed the gradient (well beyond the tolerance above).
    dense = oracle_vjp(q, k, v, d_out, jnp.float32(0), causal=causal,
                       **masks)
    assert relative_difference(want, dense) > 1e-2

  # 3. Dense: jax.nn.dot_product_attention's gradients (GQA, odd lengths).
  @pytest.mark.parametrize("causal", [False, True])
  def test_dense_gradients_match_jax(self, causal):
    shape = GQA_SHAPE
    key = key_for("grad_dense", causal)
    q, k, v = shape.inputs(key, sharpness=(4.0, 10.0), window=8)
    d_out = jax.random.normal(jax.random.fold_in(key, 1), q.shape)
    out, grads, stats = attention_vjp(q, k, v, d_out, causal=causal,
                                      implementation=self.implementation)
    assert int(jnp.sum(stats.skipped_blocks)) == 0
    want_out, want_vjp = jax.jit(lambda q, k, v: jax.vjp(functools.partial(
        jax.nn.dot_product_attention, is_causal=causal), q, k, v))(q, k, v)
    testing.assert_close(out, want_out, jnp.float32)
    assert_grads_close(grads, want_vjp(d_out))

  # 4. Composition with jit, checkpoint and vmap.
  def test_jit_checkpoint_and_vmap_match_plain(self):
    shape = FD_SHAPE
    key = key_for("grad_compose")
    problems = [shape.inputs(jax.random.fold_in(key, i), **PATTERN)
                for i in range(2)]
    # Clear decisions in both problems: jit, remat and vmap may round the
    # scores differently.
    threshold = clear_threshold(*problems, causal=False)
    w = jax.random.normal(jax.random.fold_in(key, 2), problems[0][0].shape)

    def attn(q, k, v):
      return self.attention(q, k, v, threshold=threshold)

    def loss(q, k, v, attn=attn):
      return jnp.sum(jnp.sin(attn(q, k, v)) * w)

    grad_fn = jax.grad(loss, argnums=(0, 1, 2))
    plain = grad_fn(*problems[0])   # no transformation
    jit_grad = jax.jit(grad_fn)
    jitted = [jit_grad(*args) for args in problems]
    assert_grads_close(jitted[0], plain, rtol=1e-5, atol_scale=1e-6)
    remat = jax.jit(jax.grad(
        lambda q, k, v: loss(q, k, v, attn=jax.checkpoint(attn)),
        argnums=(0, 1, 2)))(*problems[0])
    assert_grads_close(remat, plain, rtol=1e-5, atol_scale=1e-6)
    # vmap over a leading axis holding the two problems, against a loop.
    stacked = [jnp.stack(x) for x in zip(*problems)]
    batched = jax.jit(jax.vmap(grad_fn))(*stacked)
    expected = [jnp.stack(g) for g in zip(*jitted)]
    assert_grads_close(batched, expected, rtol=1e-5, atol_scale=1e-6)
    # The two problems have different gradients (the map is not a copy).
    assert relative_difference(*jitted) > 1e-2

  # 5. One bf16 training step with skipping.
  def test_bf16_training_step(self):
    hq, hkv, d, t = 4, 2, 16, 111
    shape = testing.AttentionShape(batch=2, q_len=t, kv_len=t, q_heads=hq,
                                   kv_heads=hkv, head_dim=d)
    key = key_for("grad_train")
    # x holds sink + local-window q, k, v side by side and the projections
    # start near selectors, so that the scores have a trained model's
    # structure (at random init nothing would be skipped).
    q, k, v = shape.inputs(key, **PATTERN)
    x = jnp.concatenate([a.reshape(2, t, -1) for a in (q, k, v)], axis=-1)
    target = jax.random.normal(jax.random.fold_in(key, 1), x.shape)

    def layer(dtype):
      return bjnn.SkipSelfAttention(
          hq, x.shape[-1], num_kv_heads=hkv, head_dim=d, threshold=0.2,
          causal=True, implementation=self.implementation, block_q=BLOCK,
          block_kv=BLOCK, dtype=dtype, rngs=nnx.Rngs(0))

    def loss_fn(graphdef, params):
      layer = nnx.merge(graphdef, params)
      y, stats = layer(x, return_stats=True)
      return jnp.mean((y.astype(jnp.float32) - target) ** 2), stats

    model = layer(jnp.bfloat16)
    offsets = np.cumsum([0, hq * d, hkv * d, hkv * d])
    for i, proj in enumerate((model.q_proj, model.k_proj, model.v_proj)):
      select = jnp.eye(x.shape[-1])[:, offsets[i]:offsets[i + 1]]
      proj.kernel[...] = select + 0.01 * proj.kernel[...]
    graphdef, params = nnx.split(model)
    tx = optax.adamw(1e-3)

    @jax.jit
    def train_step(params, opt_state):
      (loss, stats), grads = jax.value_and_grad(loss_fn, argnums=1,
                                                has_aux=True)(graphdef, params)
      updates, opt_state = tx.update(grads, opt_state, params)
      new_params = optax.apply_updates(params, updates)
      return new_params, loss, stats, grads, loss_fn(graphdef, new_params)[0]

    new_params, loss, stats, grads, new_loss = train_step(params,
                                                          tx.init(params))
    assert np.isfinite(float(loss)) and np.isfinite(float(new_loss))
    assert int(jnp.sum(stats.skipped_blocks)) > 0, "nothing skipped"
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
      name = jax.tree_util.keystr(path)
      assert g.dtype == jnp.float32, name
      assert bool(jnp.all(jnp.isfinite(g))), f"non-finite gradient {name}"
      assert float(jnp.max(jnp.abs(g))) > 0, f"zero gradient {name}"
    for old, new in zip(jax.tree.leaves(params), jax.tree.leaves(new_params)):
      assert not np.array_equal(np.asarray(old), np.asarray(new))
    assert float(new_loss) < float(loss)   # the step goes downhill
    # bf16 gradients point where f32 ones do (same params, f32 compute).
    graphdef32, _ = nnx.split(nnx.eval_shape(lambda: layer(jnp.float32)))
    grads32 = jax.jit(jax.grad(lambda p: loss_fn(graphdef32, p)[0]))(params)
    for g, g32 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads32)):
      g, g32 = g.ravel(), g32.ravel()
      cosine = jnp.dot(g, g32) / (jnp.linalg.norm(g) * jnp.linalg.norm(g32))
      assert float(cosine) > 0.98

  # 6. Rows that see no key: zero output and gradient, never NaN.
  def test_rows_without_keys_have_zero_gradient(self):
    shape = GQA_SHAPE
    key = key_for("grad_empty", 1)
    q, k, v = shape.inputs(key, **PATTERN)
    # The second sequence has no keys at all. In the first, causal tile 0
    # sees only kv block 0 and the mask drops it; head 3 drops all of tile 2.
    kv_lengths = jnp.array([shape.kv_len, 0], jnp.int32)
    block_mask = random_block_mask(jax.random.fold_in(key, 1), shape)
    block_mask = block_mask.at[0, :, 0, 0].set(False).at[0, 3, 2].set(False)
    masks = dict(kv_lengths=kv_lengths, block_mask=block_mask)
    threshold = jnp.float32(clear_threshold((q, k, v), causal=True, **masks))
    d_out = jax.random.normal(jax.random.fold_in(key, 2), q.shape)
    out, grads, stats = attention_vjp(q, k, v, d_out, threshold, causal=True,
                                      implementation=self.implementation,
                                      **masks)
    assert int(jnp.sum(stats.skipped_blocks[0])) > 0
    assert int(jnp.sum(stats.visited_blocks[1])) == 0
    for x in (out,) + tuple(grads):
      assert not np.isnan(np.asarray(x)).any()
    for x in (out,) + tuple(grads):
      np.testing.assert_array_equal(x[1], 0.0)
    dq = grads[0]
    for rows, heads in ((slice(0, BLOCK), slice(None)),
                        (slice(2 * BLOCK, 3 * BLOCK), 3)):
      np.testing.assert_array_equal(out[0, rows, heads], 0.0)
      np.testing.assert_array_equal(dq[0, rows, heads], 0.0)
    assert float(jnp.max(jnp.abs(dq[0, BLOCK:2 * BLOCK]))) > 0
    assert_grads_close(grads, oracle_vjp(q, k, v, d_out, threshold,
                                         causal=True, **masks))


class TestReferenceGradients(GradientTestBase): implementation = "reference"  # pylint: disable=multiple-statements
class TestPallasTritonGradients(GradientTestBase): implementation = "pallas_triton"  # pylint: disable=multiple-statements
