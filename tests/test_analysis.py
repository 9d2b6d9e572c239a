"""Analysis: statistics against hand-computed cases and the oracle, capture
from Flax models, reports, plots and the progress bar."""

import functools
import io
import json
import math

from flax import linen
from flax import nnx
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blasst_jax as bj
import blasst_jax.nn as bjnn
from blasst_jax import analysis
from blasst_jax import plotting
from blasst_jax import testing
from experiments.lm import toy_model
from blasst_jax._progress import ProgressBar
from blasst_jax.testing import key_for

# ----------------------------------------------------------------------------
# A case small enough to compute by hand.
#
# One q tile of 16 identical rows, three KV blocks of 16 identical keys each,
# sm_scale = 1, so every row's scores are one value per block:
#   head 0: blocks score (0, -5, -1)   gaps (+inf, -5, -1)
#   head 1: blocks score (-2, 0, -4)   gaps (+inf, +2, -4): block 1 raises
#                                      the running max to 0.
# Values are constant per block in feature 0: (1, 3, -2); other features 0.
SCORES = np.array([[0.0, -5.0, -1.0], [-2.0, 0.0, -4.0]])   # [heads, blocks]
VALUES = np.array([1.0, 3.0, -2.0])                         # [blocks]
BLOCK = 16


def hand_case():
  """q [1, 16, 2, 16], k/v [1, 48, 2, 16]."""
  e0 = np.eye(BLOCK)[0]
  q = np.broadcast_to(e0, (1, BLOCK, 2, BLOCK))
  k = np.repeat(SCORES.T, BLOCK, axis=0)[None, :, :, None] * e0  # [1,48,2,16]
  v = np.repeat(VALUES, BLOCK)[None, :, None, None] * e0
  v = np.broadcast_to(v, (1, 3 * BLOCK, 2, BLOCK))
  return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))


def analyze_hand_case(thresholds, **options):
  q, k, v = hand_case()
  return analysis.analyze_attention(q, k, v, thresholds=thresholds,
                                    sm_scale=1.0, block_q=BLOCK,
                                    block_kv=BLOCK, **options)


def softmax_output(scores, kept):
  """Attention output (feature 0) over the kept blocks, by hand."""
  w = np.exp(scores) * kept
  return float(np.sum(w * VALUES) / np.sum(w))


def test_hand_case_statistics():
  lam = math.exp(-3.0)   # skips gaps below -3: head 0 block 1, head 1 block 2
  report = analyze_hand_case([0.0, lam, 0.5], heatmap_threshold=lam,
                             gap_edges=(-6.0, -4.5, -3.0, 0.0, 3.0))
  np.testing.assert_array_equal(report.visited_blocks, [3, 3])
  # λ = 0.5 (log -0.69) also skips head 0's block 2 (gap -1).
  np.testing.assert_array_equal(report.skipped_blocks,
                                [[0, 0], [1, 1], [2, 1]])
  np.testing.assert_allclose(report.sparsity[1], [1 / 3, 1 / 3])
  np.testing.assert_allclose(report.sparsity_by_q_tile[2], [[2 / 3], [1 / 3]])

  kept = np.array([[1, 0, 1], [1, 1, 0]])
  for h in range(2):
    p = np.exp(SCORES[h]) / np.exp(SCORES[h]).sum()
    dropped = float(np.sum(p * (1 - kept[h])))
    # Every row is the same: mean and max agree.
    assert report.dropped_mass_mean[1][h] == pytest.approx(dropped, rel=1e-5)
    assert report.dropped_mass_max[1][h] == pytest.approx(dropped, rel=1e-5)
    dense = softmax_output(SCORES[h], np.ones(3))
    sparse = softmax_output(SCORES[h], kept[h])
    assert report.max_abs_error[1][h] == pytest.approx(abs(sparse - dense),
                                                       rel=1e-4)
    assert report.rel_l2_error[1][h] == pytest.approx(
        abs(sparse - dense) / abs(dense), rel=1e-4)
    assert report.max_abs_error[0][h] < 1e-6
  assert report.dropped_mass_mean[0] == [0.0, 0.0]

  hist = report.gap_histogram
  # head 0 gaps {-5, -1}; head 1 gaps {-4, +2}; the first blocks (+inf) are
  # not counted.
  assert hist.counts == [[1, 0, 1, 0], [0, 1, 0, 1]]
  assert hist.below == [0, 0] and hist.above == [0, 0]
  np.testing.assert_allclose(hist.quantiles["p50"], [-3.0, -1.0])
  assert report.block_map == [[[1, 2, 1]], [[1, 1, 2]]]


def test_hand_case_context_sweep():
  # q keeps its 16 rows (not self-attention); keys are cut to 16 / 32 / 48.
  report = analyze_hand_case([0.0], context_lengths=(16, 32, 48),
                             context_thresholds=(math.exp(-3.0),),
                             context_scale_factors=(32 * math.exp(-4.5),))
  ctx = report.context
  assert ctx.context_lengths == [16, 32, 48]
  assert ctx.labels[0].startswith("λ=") and ctx.labels[1].startswith("c=")
  # Fixed λ = e^-3: one block, nothing to skip; two blocks: head 0 skips
  # block 1 (gap -5); three blocks: one skip per head.
  np.testing.assert_allclose(ctx.sparsity[0], [[0, 0], [0.5, 0], [1 / 3,
                                                                  1 / 3]])
  # λ = c / length: e^-4.5 at 32 (block 1 of head 0 skipped), 2/3 of that
  # at 48 (log λ = -4.9: head 0's -5 still skipped, head 1's -4 not).
  np.testing.assert_allclose(ctx.sparsity[1], [[0, 0], [0.5, 0], [1 / 3, 0]])


# ----------------------------------------------------------------------------
# Against the oracle on fresh structured inputs.


# (shape, causal, kv_lengths, block_q, block_kv): odd lengths, GQA/MHA,
# padding; one compile each, fresh inputs per example.
REPLAY_CASES = (
    (testing.AttentionShape(2, 70, 90, 4, 2, 16), True, (90, 41), 32, 16),
    (testing.AttentionShape(1, 33, 100, 2, 2, 16), False, None, 16, 32),
)


@functools.partial(jax.jit, static_argnames=("causal", "block_q",
                                              "block_kv"))
def replay_and_oracle(q, k, v, kv_lengths, lam, *, causal, block_q,
                      block_kv):
  options = dict(causal=causal, kv_lengths=kv_lengths, block_q=block_q,
                 block_kv=block_kv)
  base = bj.reference.blockwise_attention(q, k, v, threshold=0.0, **options)
  at_lam = bj.reference.blockwise_attention(q, k, v, threshold=lam, **options)
  return (analysis.replay_skip_mask(base, lam), at_lam.skip_mask,
          base.block_gap, at_lam.block_gap)


@pytest.mark.parametrize("case", range(len(REPLAY_CASES)))
@hypothesis.given(lam=st.floats(1e-5, 0.9), sharpness=st.floats(2.0, 30.0),
                  seed=st.integers(0, 2**16))
@hypothesis.settings(max_examples=4)
def test_replayed_decisions_equal_the_oracle(case, lam, sharpness, seed):
  """One oracle run at λ = 0 gives the decisions at any λ (the running max
  does not depend on λ): what the context sweep and calibration rely on."""
  shape, causal, lengths, block_q, block_kv = REPLAY_CASES[case]
  q, k, v = shape.inputs(jax.random.PRNGKey(seed), sharpness=sharpness,
                         window=8)
  kv_lengths = None if lengths is None else jnp.asarray(lengths)
  # A per-sequence λ, as a scale factor gives.
  lams = jnp.asarray([lam, lam / 7][:shape.batch], jnp.float32)
  replayed, expected, gap, gap_at_lam = replay_and_oracle(
      q, k, v, kv_lengths, lams, causal=causal, block_q=block_q,
      block_kv=block_kv)
  np.testing.assert_array_equal(replayed, expected)
  np.testing.assert_array_equal(gap, gap_at_lam)


@pytest.mark.parametrize("max_mode", ["split", "anchored", "global"])
def test_replayed_decode_decisions_equal_the_oracle(max_mode):
  q, k, v = testing.AttentionShape(3, 1, 200, 4, 2, 32).inputs(
      key_for("replay-decode", max_mode), sharpness=(8.0, 20.0), window=16)
  kv_lengths = jnp.array([200, 131, 64])
  oracle = jax.jit(lambda lam: bj.reference.blockwise_decode_attention(
      q[:, 0], k, v, kv_lengths, threshold=lam, block_kv=16, num_splits=3,
      max_mode=max_mode))
  base = oracle(jnp.float32(0.0))
  for lam in (1e-4, 1e-2, 0.3):
    expected = oracle(jnp.float32(lam))
    np.testing.assert_array_equal(analysis.replay_skip_mask(base, lam),
                                  expected.skip_mask)
  assert int(expected.skip_mask.sum()) > 0


def test_sweep_statistics_match_direct_oracle_runs():
  shape = testing.AttentionShape(2, 80, 80, 4, 2, 16)
  q, k, v = shape.inputs(key_for("sweep-oracle"), sharpness=(3.0, 9.0, 15.0,
                                                             25.0), window=6)
  kv_lengths = jnp.array([80, 45])
  thresholds = [0.0, 1e-3, 3e-2]
  report = analysis.analyze_attention(
      q, k, v, thresholds=thresholds, causal=True, kv_lengths=kv_lengths,
      block_q=16, block_kv=16)
  dense = bj.reference.dense_attention(q, k, v, causal=True,
                                       kv_lengths=kv_lengths)
  assert report.shape == dict(batch=2, q_len=80, kv_len=80, q_heads=4,
                              kv_heads=2, head_dim=16)
  oracle = jax.jit(lambda lam: bj.reference.blockwise_attention(
      q, k, v, threshold=lam, causal=True, kv_lengths=kv_lengths, block_q=16,
      block_kv=16))
  for t, lam in enumerate(thresholds):
    r = oracle(jnp.float32(lam))
    np.testing.assert_array_equal(report.skipped_blocks[t],
                                  r.stats.skipped_blocks.sum(0))
    np.testing.assert_array_equal(report.visited_blocks,
                                  r.stats.visited_blocks.sum(0))
    mass = analysis.dropped_attention_mass(q, k, r.skip_mask, block_q=16,
                                           block_kv=16, causal=True,
                                           kv_lengths=kv_lengths)
    np.testing.assert_allclose(report.dropped_mass_mean[t],
                               mass.mean(axis=(0, 2)), rtol=1e-4, atol=1e-8)
    diff = (r.out - dense).transpose(2, 0, 1, 3).reshape(4, -1)
    # Both sides round (jit and eager): compare above that level.
    np.testing.assert_allclose(report.max_abs_error[t],
                               jnp.abs(diff).max(-1), rtol=1e-3, atol=2e-6)
    err = analysis.error_summary(r.out, dense)
    assert report.layer_rel_l2_error[t] == pytest.approx(
        float(err["rel_l2"]), rel=1e-3, abs=2e-6)
  sparsity = report.sparsity
  assert sparsity[0].sum() == 0 and sparsity[-1].sum() > 0
  assert np.all(np.diff(sparsity, axis=0) >= 0)      # more λ, more skipping
  # Per-position counts add up to the totals.
  visited_tiles = report.visited_blocks
  assert len(report.sparsity_by_q_tile[0][0]) == 5   # 80 / 16 tiles
  gaps = sum(sum(c) + b + a for c, b, a in zip(
      report.gap_histogram.counts, report.gap_histogram.below,
      report.gap_histogram.above))
  # Every visited block but each tile's first has a finite gap.
  first_blocks = 2 * 4 * 5
  assert gaps == sum(visited_tiles) - first_blocks


# ----------------------------------------------------------------------------
# Capture from Flax models.


@pytest.fixture(scope="module", name="model")
def fixture_model():
  """Two layers (SkipSelfAttention, nnx.MultiHeadAttention), a diffuse and
  a sharp head each; MHA in both, so that they share compiles."""
  return toy_model.SinkLocalTransformer(
      content_dim=8, num_heads=2, num_kv_heads=2, head_dim=16,
      sharpness=((4.0, 16.0), (8.0, 20.0)), window=8, block_q=16,
      block_kv=16, rngs=nnx.Rngs(3))


@pytest.fixture(scope="module", name="report")
def fixture_report(model):
  x = model.token_embeddings(key_for("analyze-model"), batch=1, seq_len=64)
  return analysis.analyze_model(
      model, x, thresholds=(0.0, 1e-3, 1e-2, 0.2), context_lengths=(32, 64),
      context_thresholds=(1e-2,), context_scale_factors=(1.0,),
      heatmap_threshold=1e-2)


def test_capture_nnx_model_records_each_layer_unchanged(model):
  x = model.token_embeddings(key_for("capture"), batch=2, seq_len=48)
  before = model(x)
  captured = analysis.capture_attention_inputs(model, x)
  assert list(captured) == ["layers/0", "layers/1"]
  first = captured["layers/0"]
  q, k, v = model.layers[0].project_qkv(model.embed(x))
  np.testing.assert_allclose(first.q, q, rtol=1e-6)
  np.testing.assert_allclose(first.k, k, rtol=1e-6)
  assert first.q.shape == (2, 48, 2, 16) and first.k.shape == (2, 48, 2, 16)
  # The MultiHeadAttention layer reports through its blasst attention_fn.
  second = captured["layers/1"]
  assert second.q.shape == (2, 48, 2, 16) and second.k.shape == (2, 48, 2, 16)
  for inputs in captured.values():
    assert inputs.causal and inputs.block_q == 16 and inputs.block_kv == 16
  # Nothing of the capture stays behind.
  np.testing.assert_array_equal(model(x), before)
  assert bjnn.attention_input_recorder.get() is None


def test_capture_plain_flax_attention_and_masks():
  mha = nnx.MultiHeadAttention(num_heads=2, in_features=16, decode=False,
                               rngs=nnx.Rngs(0))
  x = jax.random.normal(key_for("plain-mha"), (2, 24, 16))
  causal = analysis.capture_attention_inputs(
      mha, x, mask=nnx.make_causal_mask(jnp.ones((2, 24))))
  (inputs,) = causal.values()
  assert inputs.causal and inputs.q.shape == (2, 24, 2, 8)
  assert not analysis.capture_attention_inputs(mha, x)[
      "MultiHeadAttention"].causal
  padding = nnx.make_attention_mask(jnp.ones((2, 24)),
                                    jnp.arange(24)[None] < jnp.array([[24],
                                                                      [10]]))
  with pytest.raises(ValueError, match="no mask or a causal mask"):
    analysis.capture_attention_inputs(mha, x, mask=padding)
  assert mha.attention_fn is nnx.dot_product_attention


def test_capture_linen_names_layers_by_path():

  class Block(linen.Module):

    @linen.compact
    def __call__(self, x):
      for i in range(2):
        x = x + linen.MultiHeadDotProductAttention(
            num_heads=2, name=f"attn{i}",
            attention_fn=bjnn.make_attention_fn(causal=True))(x)
      return x

  x = jax.random.normal(key_for("linen"), (1, 32, 8))
  block = Block()
  variables = block.init(jax.random.PRNGKey(0), x)
  captured = analysis.capture_attention_inputs(block, variables, x)
  assert list(captured) == ["attn0", "attn1"]
  assert all(c.causal and c.q.shape == (1, 32, 2, 4)
             for c in captured.values())


def test_capture_errors(model):
  x = model.token_embeddings(key_for("jit"), batch=1, seq_len=32)
  with pytest.raises(ValueError, match="eagerly"):
    jax.jit(lambda x: analysis.capture_attention_inputs(
        lambda y: model(y), x))(x)
  with pytest.raises(ValueError, match="No attention call"):
    analysis.capture_attention_inputs(lambda y: y * 2, x)
  with pytest.raises(ValueError, match="callable"):
    analysis.capture_attention_inputs(3, x)


def test_analyze_model_report_table_and_json_round_trip(report, tmp_path):
  assert [l.name for l in report.layers] == ["layers/0", "layers/1"]
  table = report.table(1e-2)
  for name in ("layers/0", "layers/1"):
    rows = [line for line in table.splitlines() if line.startswith(name)]
    assert len(rows) == 3          # two heads and "all"
  assert report.layers[1].sparsity[-1].max() > 0   # the sharp head skips
  path = tmp_path / "report.json"
  report.save_json(str(path))
  loaded = analysis.ModelReport.load_json(str(path))
  assert loaded.to_dict() == json.loads(path.read_text())
  assert loaded.table(1e-2) == table
  with pytest.raises(ValueError, match="not one of the analysed"):
    report.table(0.5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(thresholds=()), "at least one"),
    (dict(thresholds=(0.1, 1.0)), r"\[0, 1\)"),
    (dict(thresholds=(0.1,), context_lengths=(64,)), "context_lengths"),
    (dict(thresholds=(0.1,), context_lengths=(16,)), "context_thresholds"),
    (dict(thresholds=(0.1,), context_lengths=(16,),
          context_scale_factors=(-1.0,)), "non-negative"),
    (dict(thresholds=(0.1,), heatmap_threshold=2.0), r"\[0, 1\)"),
    (dict(thresholds=(0.1,), gap_edges=(1.0, 0.0)), "increasing"),
])
def test_bad_options_raise_value_error(kwargs, match):
  q, k, v = hand_case()
  with pytest.raises(ValueError, match=match):
    analysis.analyze_attention(q, k, v, **kwargs)


def test_bad_shapes_raise_value_error():
  q, k, v = hand_case()
  with pytest.raises(ValueError, match="rank 4"):
    analysis.analyze_attention(q[0], k, v, thresholds=(0.1,))
  with pytest.raises(ValueError, match="kv_lengths"):
    analysis.analyze_attention(q, k, v, thresholds=(0.1,),
                               kv_lengths=jnp.array([3, 4]))


# ----------------------------------------------------------------------------
# Plots (headless) and the progress bar.


def test_plots_are_written_headless(report, tmp_path):
  paths = plotting.plot_report(report, str(tmp_path), block_map_heads=[1])
  names = sorted(p.split("/")[-1] for p in paths)
  assert names == sorted([
      "sparsity_vs_threshold.png", "error_vs_sparsity.png",
      "sparsity_vs_context.png", "gap_histogram_layers_0.png",
      "gap_histogram_layers_1.png", "block_map_layers_0_head1.png",
      "block_map_layers_1_head1.png"])
  for path in paths:
    with open(path, "rb") as f:
      data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000, path
  fig = plotting.plot_error_vs_sparsity(report, metric="dropped_mass_mean")
  assert fig.axes[0].get_ylabel() == "mean dropped softmax mass"
  with pytest.raises(ValueError, match="metric"):
    plotting.plot_error_vs_sparsity(report, metric="nope")
  no_map = analysis.analyze_attention(*hand_case(), thresholds=(0.1,),
                                      sm_scale=1.0)
  with pytest.raises(ValueError, match="heatmap_threshold"):
    plotting.plot_block_map(no_map)


def test_progress_bar_in_a_log_writes_few_lines():
  stream = io.StringIO()
  with ProgressBar(40, desc="sweep", stream=stream) as bar:
    for _ in range(40):
      bar.update()
  lines = stream.getvalue().splitlines()
  assert 10 <= len(lines) <= 11
  assert lines[-1].startswith("[" + "#" * 30 + "] 40/40 sweep")
  quiet = io.StringIO()
  with ProgressBar(5, stream=quiet, enabled=False) as bar:
    bar.update(5)
  assert quiet.getvalue() == "" and bar.count == 5
