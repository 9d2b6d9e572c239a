"""Skip-softmax attention on inputs sharded over a `jax.sharding.Mesh`.

Batch and head sharding need no communication: each device holds whole
sequences of some (batch, head) pairs, so the kernel runs per shard inside
`jax.shard_map` and its skip decisions are the single-device ones (a
block's running max never crosses a batch row or a head).

    mesh = jax.make_mesh((2, 4), ("data", "model"))
    out, stats = bj.sharding.attention(
        q, k, v, mesh=mesh, batch_axis="data", head_axis="model",
        threshold=1e-2, causal=True, return_stats=True)

Head sharding cuts q heads and KV heads into the same number of contiguous
chunks, so every GQA group stays on one device: kv_heads must divide by the
head axis size. Works under `jax.jit` and `jax.grad` (the kernels' own VJP
runs per shard).

Both can also shard the sequence (`context_axis`, context parallelism):
each device attends over its part of the keys and the parts are merged by
log-sum-exp (`merge_parts`, `merge_by_lse`). Each part skips against its
own running max, like one split of split-K: it never skips a block that one
device would keep, and may keep some that one device would skip. With
`share_max=True` the devices take one device's decisions: in prefill a
device chains the running max through its parts in key order (no extra
communication); in decode the devices share the reference max of
`max_mode` (a `pmax` of one float per query head). Causal prefill with
`load_balance=True` gives every device the same work (query chunks i and
2n-1-i of 2n) instead of 1..n parts.
"""

from __future__ import annotations

import collections
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from blasst_jax import api
from blasst_jax import config as config_lib
from blasst_jax import decode as decode_lib
from blasst_jax import reference
from blasst_jax import validation
from blasst_jax.config import SkipStats

AxisName = str | tuple[str, ...] | None


def _names(axis: AxisName) -> tuple[str, ...]:
  if axis is None:
    return ()
  return (axis,) if isinstance(axis, str) else tuple(axis)


def axis_size(mesh: Mesh, axis: AxisName) -> int:
  """Devices along a mesh axis or tuple of axes (1 for None)."""
  size = 1
  for name in _names(axis):
    size *= mesh.shape[name]
  return size


def check_mesh(mesh, **axes: AxisName) -> None:
  """ValueError unless `mesh` is a Mesh holding every named axis once."""
  if not isinstance(mesh, Mesh):
    raise ValueError(f"`mesh` must be a jax.sharding.Mesh (e.g. "
                     f"jax.make_mesh((2, 4), ('data', 'model'))), got "
                     f"{type(mesh).__name__}.")
  used = []
  for arg, axis in axes.items():
    for name in _names(axis):
      if name not in mesh.axis_names:
        raise ValueError(f"`{arg}` {name!r} is not an axis of the mesh "
                         f"{tuple(mesh.axis_names)}.")
      if name in used:
        raise ValueError(f"Mesh axis {name!r} is named twice: shard each "
                         "array dimension over different axes.")
      used.append(name)


def check_divides(size: int, n: int, what: str, axis_arg: str) -> None:
  """ValueError unless `size` (named `what`) divides by `n`, the size of
  the mesh axis passed as `axis_arg`."""
  if size % n:
    raise ValueError(f"{what} ({size}) must divide by the size of "
                     f"`{axis_arg}` ({n}): pad it, or shard over a smaller "
                     "mesh axis.")


def auto_mesh(mesh: Mesh) -> Mesh:
  """`mesh` with every axis of type Auto (XLA reshards inputs as needed)."""
  return Mesh(mesh.devices, mesh.axis_names,
              axis_types=(AxisType.Auto,) * len(mesh.axis_names))


# Jitted shard_maps by static configuration: called eagerly, a fresh
# `shard_map` closure would be traced and compiled again on every call
# (a Flax layer's decode step with a mesh: 7 s each on CPU).
_SHARDED_FNS: collections.OrderedDict = collections.OrderedDict()
_MAX_SHARDED_FNS = 64


def _run_sharded(body, mesh: Mesh, in_specs, out_specs, *args, key=None,
                 traced=None):
  """`jax.shard_map(body)(*args)`, the inputs laid out as `in_specs` first.

  Inside a `jax.set_mesh` context with Explicit axes the inputs are
  resharded on that mesh; otherwise the map runs on an Auto-axes copy of
  `mesh`, which reshards whatever layout the inputs have.

  key: None, or a hashable value that determines `body` (everything it
  closes over): the jitted map is then reused by later calls with an equal
  key, mesh and specs. traced: a dict `body` fills while it is traced;
  a reused map's is copied into it.
  """
  context = jax.sharding.get_abstract_mesh()
  explicit = not context.empty and any(
      t == AxisType.Explicit for t in context.axis_types)
  if explicit:
    args = tuple(jax.reshard(x, spec) for x, spec in zip(args, in_specs))
  else:
    mesh = auto_mesh(mesh)
  # check_vma=False: the kernels' loop carries start as per-device
  # constants, which the varying-axes type check would reject.
  make = lambda: jax.jit(jax.shard_map(  # pylint: disable=g-long-lambda
      body, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
      check_vma=False))
  if key is not None:
    # Shapes too: what `body` records while tracing may depend on them.
    key = (key, mesh, tuple(in_specs), tuple(out_specs), explicit,
           tuple((jnp.shape(x), jnp.result_type(x)) for x in args))
    try:
      hash(key)
    except TypeError:    # e.g. an unhashable kernel config
      key = None
  if key is None:
    return make()(*args)
  if key not in _SHARDED_FNS:
    fn = make()
    out = fn(*args)     # traces body, which fills `traced`
    _SHARDED_FNS[key] = (fn, dict(traced or {}))
    if len(_SHARDED_FNS) > _MAX_SHARDED_FNS:
      _SHARDED_FNS.popitem(last=False)
    return out
  _SHARDED_FNS.move_to_end(key)
  fn, filled = _SHARDED_FNS[key]
  if traced is not None:
    traced.update(filled)
  return fn(*args)


def _split_threshold(threshold, batch: int):
  """(per-row array or None, the static rest): an array λ [batch] is
  sharded with the batch; a float or SkipSoftmaxConfig is passed as is."""
  if isinstance(threshold, (jax.Array, jnp.ndarray)) and jnp.ndim(
      threshold) == 1:
    if threshold.shape[0] != batch:
      raise ValueError(f"`threshold` array must have shape [batch={batch}], "
                       f"got {threshold.shape}.")
    return threshold, None
  return None, threshold


def attention(q, k, v, *, mesh: Mesh, batch_axis: AxisName = None,
              head_axis: AxisName = None, context_axis: AxisName = None,
              threshold=0.0, kv_lengths=None, block_mask=None,
              return_stats: bool = False, share_max: bool = False,
              load_balance: bool = False, **kwargs: Any):
  """`bj.attention` with batch and/or heads sharded over mesh axes.

  Args:
    q: [batch, q_len, q_heads, head_dim].
    k, v: [batch, kv_len, kv_heads, head_dim].
    mesh: the device mesh.
    batch_axis: mesh axis (or tuple of axes) the batch is sharded over, or
      None.
    head_axis: mesh axis (or axes) the heads are sharded over, or None;
      q_heads and kv_heads must divide by its size.
    context_axis: mesh axis (or axes) the sequence is sharded over
      (context-parallel prefill), or None. q, k and v are cut into n equal
      parts (q_len = kv_len, a multiple of n x the tiles); device i gathers
      K/V and attends its queries to parts 0..i (causal: the part i
      diagonal causal, later parts not at all), merging by log-sum-exp.
      Each part skips against its own running max (no block that one
      device would keep; see `share_max`). Inference only (no gradient);
      no block_mask.
    threshold: as `bj.attention`; an f32 [batch] array is sharded with the
      batch.
    kv_lengths: optional int [batch].
    block_mask: optional bool [batch, q_heads, n_q_tiles, n_kv_blocks].
    return_stats: also return a `SkipStats` (global shapes [batch, q_heads]).
    share_max: with a context axis, each device walks its key parts in
      order and starts each from the running max the previous one ended
      with (`bj.attention(initial_max=...)`), so it takes one device's
      skip decisions (the part size a multiple of block_q and block_kv) at
      no extra communication; runs on every implementation.
    load_balance: with a context axis, cut the sequence into 2n chunks
      and let device i attend the queries of chunks i and 2n-1-i (then
      route the outputs back to their parts): causal prefill does equal
      work on every device instead of 1..n parts (device n-1 the most).
      Costs gathering Q and the output besides K and V; q_len must divide
      by 2n. The same outputs; with share_max one device's decisions
      (without it each of the 2n key chunks skips against its own max).
    **kwargs: the other `bj.attention` arguments (causal, sm_scale,
      implementation, block_q, block_kv, interpret, kernel_config).

  Returns:
    out [batch, q_len, q_heads, head_dim] sharded as q, or (out, SkipStats).
    Without a context axis equal to `bj.attention` on one device, skip
    decisions included.

  Raises:
    ValueError: for a mesh without the named axes, an axis named twice,
      sizes that do not divide, or anything `bj.attention` rejects.
  """
  check_mesh(mesh, batch_axis=batch_axis, head_axis=head_axis,
             context_axis=context_axis)
  b, hq, hkv = q.shape[0], q.shape[2], k.shape[2]
  nb, nh = axis_size(mesh, batch_axis), axis_size(mesh, head_axis)
  check_divides(b, nb, "The batch", "batch_axis")
  check_divides(hq, nh, "q_heads", "head_axis")
  check_divides(hkv, nh, "kv_heads", "head_axis")
  if context_axis is not None:
    return _context_parallel_attention(
        q, k, v, mesh=mesh, batch_axis=batch_axis, head_axis=head_axis,
        context_axis=context_axis, threshold=threshold, kv_lengths=kv_lengths,
        block_mask=block_mask, return_stats=return_stats,
        share_max=share_max, load_balance=load_balance, **kwargs)
  if share_max or load_balance:
    raise ValueError("`share_max` and `load_balance` arrange the parts of a "
                     "context axis: pass context_axis.")
  thr_array, thr_static = _split_threshold(threshold, b)
  qkv_spec = P(batch_axis, None, head_axis, None)
  row_spec = P(batch_axis)
  head_spec = P(batch_axis, head_axis)
  mask_spec = P(batch_axis, head_axis, None, None)
  # Optional inputs travel as a tuple so shard_map sees arrays only.
  extras = {name: (x, spec) for name, x, spec in (
      ("threshold", thr_array, row_spec),
      ("kv_lengths", kv_lengths, row_spec),
      ("block_mask", block_mask, mask_spec)) if x is not None}
  names = tuple(extras)
  tiles = {}    # the tiles that decided, static: recorded while tracing

  def body(q, k, v, *extra):
    opts = dict(zip(names, extra))
    if "threshold" not in opts:
      opts["threshold"] = thr_static
    out, stats = api.attention(q, k, v, return_stats=True, **opts, **kwargs)
    tiles.update(block_q=stats.block_q, block_kv=stats.block_kv)
    masked = (stats.masked_blocks if stats.masked_blocks is not None else
              jnp.zeros_like(stats.skipped_blocks))
    return out, stats.skipped_blocks, stats.visited_blocks, masked

  out, skipped, visited, masked = _run_sharded(
      body, mesh,
      (qkv_spec, qkv_spec, qkv_spec) + tuple(
          spec for _, spec in extras.values()),
      (qkv_spec, head_spec, head_spec, head_spec),
      q, k, v, *(x for x, _ in extras.values()),
      key=("attention", names, thr_static, tuple(sorted(kwargs.items()))),
      traced=tiles)
  if not return_stats:
    return out
  return out, SkipStats(skipped_blocks=skipped, visited_blocks=visited,
                        masked_blocks=masked if block_mask is not None
                        else None, **tiles)


def merge_by_lse(out, lse, axis_name: AxisName):
  """Softmax-merges partial attention results held along a mesh axis.

  Inside `shard_map`: each device holds attention over its part of the
  keys, `out` f32 [..., d] (normalized over that part) and `lse` [...] (its
  natural-log log-sum-exp; -inf where it kept no key). Returns f32 [..., d],
  attention over all the parts (0 where no part kept a key).
  """
  return merge_parts(jax.lax.all_gather(out.astype(jnp.float32), axis_name),
                     jax.lax.all_gather(lse, axis_name))


def merge_parts(outs, lses):
  """outs f32 [n, ..., d], lses [n, ...] of n key parts -> f32 [..., d]."""
  outs = outs.astype(jnp.float32)
  m = jnp.max(lses, axis=0)
  m = jnp.where(m == -jnp.inf, 0.0, m)
  w = jnp.where(lses == -jnp.inf, 0.0, jnp.exp(lses - m))
  total = jnp.sum(w, axis=0)
  merged = jnp.sum(w[..., None] * outs, axis=0)
  return merged / jnp.where(total > 0, total, 1.0)[..., None]


def _branch(pred, if_true, if_false, operand):
  """`lax.cond`, or a plain `if` when `pred` is a Python bool (a chunk
  index known at trace time traces one branch only)."""
  if isinstance(pred, bool):
    return if_true(operand) if pred else if_false(operand)
  return jax.lax.cond(pred, if_true, if_false, operand)


def attend_query_chunk(q, c, ks, vs, lengths, threshold, *, causal: bool,
                       share_max: bool, **kwargs):
  """Attention of one chunk of queries to the key chunks before it.

  The per-device work of context-parallel prefill (also timed alone by
  `experiments/bench_multigpu.py`).

  Args:
    q: [batch, chunk, q_heads, head_dim], queries at positions
      c*chunk..(c+1)*chunk of the sequence.
    c: the chunk's index: an int or an int32 scalar (e.g. from
      `lax.axis_index`).
    ks, vs: [m, batch, chunk, kv_heads, head_dim], the sequence's m key and
      value chunks.
    lengths: int32 [batch], the whole sequences' lengths.
    threshold: f32 [batch], λ per row.
    causal: attend key chunks 0..c (chunk c causal) rather than all m.
    share_max: walk the key chunks in order and start each from the running
      max the previous one ended with (one device's skip decisions).
    **kwargs: other `bj.attention` arguments (sm_scale, implementation, ...).

  Returns:
    out f32 [batch, chunk, q_heads, head_dim] merged over the key chunks,
    skipped and visited int32 [batch, q_heads] summed over them.
  """
  b, chunk, hq, _ = q.shape
  empty = (jnp.zeros(q.shape, jnp.float32),
           jnp.full((b, hq, chunk), -jnp.inf, jnp.float32),
           jnp.zeros((b, hq), jnp.int32), jnp.zeros((b, hq), jnp.int32))

  def key_chunk(j, is_causal, row_max):
    local = jnp.clip(lengths - j * chunk, 0, chunk)
    (out, lse, *row_max), stats = api.attention(
        q, ks[j], vs[j], threshold=threshold, kv_lengths=local,
        causal=is_causal, return_stats=True, return_lse=True,
        initial_max=row_max, **kwargs)
    return (out.astype(jnp.float32), lse, stats.skipped_blocks,
            stats.visited_blocks), (row_max[0] if share_max else None)

  # share_max: the running max [b, hq, chunk] carried from chunk to chunk.
  row_max = (jnp.full((b, hq, chunk), -jnp.inf, jnp.float32) if share_max
             else None)
  parts = []
  for j in range(ks.shape[0]):     # key chunk j against these queries
    if causal:
      part, row_max = _branch(
          j < c, lambda m, j=j: key_chunk(j, False, m),
          lambda m, j=j: _branch(j == c,
                                 lambda m: key_chunk(j, True, m),
                                 lambda m: (empty, m), m), row_max)
    else:
      part, row_max = key_chunk(j, False, row_max)
    parts.append(part)
  outs, lses, skipped, visited = (jnp.stack(x) for x in zip(*parts))
  # lse [m, b, hq, chunk] -> the out layout [m, b, chunk, hq]
  out = merge_parts(outs, jnp.swapaxes(lses, 2, 3))
  return out, jnp.sum(skipped, axis=0), jnp.sum(visited, axis=0)


def sequence_chunks(x, m: int):
  """[batch, m * chunk, heads, d] -> [m, batch, chunk, heads, d]."""
  return jnp.moveaxis(x.reshape(x.shape[0], m, -1, *x.shape[2:]), 1, 0)


def _context_parallel_attention(q, k, v, *, mesh, batch_axis, head_axis,
                                context_axis, threshold, kv_lengths,
                                block_mask, return_stats, share_max,
                                load_balance, **kwargs):
  """`attention` with the sequence sharded over `context_axis`."""
  if block_mask is not None:
    raise ValueError("`block_mask` is not supported with `context_axis`: "
                     "shard the batch or heads instead.")
  b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
  n = axis_size(mesh, context_axis)
  if lq != lk:
    raise ValueError(f"`context_axis` needs q_len == kv_len (one sequence "
                     f"cut into parts), got {lq} and {lk}.")
  if load_balance:
    check_divides(lq, 2 * n, "q_len (load_balance: 2 chunks per device)",
                   "context_axis")
  else:
    check_divides(lq, n, "q_len", "context_axis")
  causal = kwargs.pop("causal", False)
  lengths = (jnp.full((b,), lk, jnp.int32) if kv_lengths is None
             else jnp.asarray(kv_lengths, jnp.int32))
  # λ per row from the whole sequence, as one device's.
  thr_array = config_lib.resolve_threshold(threshold, lengths, lk, b)
  dense = validation.is_static_zero(threshold)
  qkv_spec = P(batch_axis, context_axis, head_axis, None)
  row_spec = P(batch_axis)
  head_spec = P(batch_axis, head_axis)
  attend = functools.partial(attend_query_chunk, causal=causal,
                             share_max=share_max, **kwargs)

  def body(q, k, v, lengths, thr):
    if dense:        # the kernels without the skip check
      thr = 0.0
    i = jax.lax.axis_index(context_axis)
    def gathered(x, m):      # the whole sequence in m chunks
      return sequence_chunks(
          jax.lax.all_gather(x, context_axis, axis=1, tiled=True), m)

    if not load_balance:     # queries of part i against key parts 0..i
      out, skipped, visited = attend(q, i, gathered(k, n), gathered(v, n),
                                     lengths, thr)
    else:   # chunks i and 2n-1-i of 2n: equal causal work on every device
      ks, vs, qs = (gathered(x, 2 * n) for x in (k, v, q))
      results = [attend(qs[c], c, ks, vs, lengths, thr)
                 for c in (i, 2 * n - 1 - i)]
      # Every device's two chunks -> the output in sequence order, then
      # this device's part of it.
      pair = jnp.stack([r[0] for r in results])       # [2, b, chunk, h, d]
      pairs = jax.lax.all_gather(pair, context_axis)  # [n, 2, ...]
      ordered = jnp.concatenate([pairs[:, 0], pairs[::-1, 1]])  # [2n, ...]
      out = jax.lax.dynamic_slice_in_dim(ordered, 2 * i, 2)
      out = jnp.concatenate([out[0], out[1]], axis=1)
      skipped = results[0][1] + results[1][1]
      visited = results[0][2] + results[1][2]
    skipped = jax.lax.psum(skipped, context_axis)
    visited = jax.lax.psum(visited, context_axis)
    return out.astype(q.dtype), skipped, visited

  out, skipped, visited = _run_sharded(
      body, mesh, (qkv_spec, qkv_spec, qkv_spec, row_spec, row_spec),
      (qkv_spec, head_spec, head_spec), q, k, v, lengths, thr_array)
  if not return_stats:
    return out
  return out, SkipStats(skipped_blocks=skipped, visited_blocks=visited)


def decode_attention(q, k_cache, v_cache, kv_lengths, *, mesh: Mesh,
                     batch_axis: AxisName = None, head_axis: AxisName = None,
                     context_axis: AxisName = None, threshold=0.0,
                     return_stats: bool = False, share_max: bool = False,
                     **kwargs: Any):
  """`bj.decode_attention` with the batch, heads and/or cache sharded.

  Args:
    q: [batch, q_heads, head_dim] or [batch, 1, q_heads, head_dim].
    k_cache, v_cache: [batch, max_len, kv_heads, head_dim].
    kv_lengths: int [batch].
    mesh, batch_axis, head_axis: as `attention`.
    context_axis: mesh axis (or axes) the cache's positions are sharded
      over (context parallelism), or None. Each device attends over its
      max_len / n positions (skipping against its own running max, as one
      split of split-K: more devices skip less) and the parts are merged by
      their log-sum-exp. λ is resolved from the whole sequence's length.
    threshold: as `bj.decode_attention`; an f32 [batch] array is sharded
      with the batch.
    return_stats: also return a `DecodeStats` (counts and bytes_read summed
      over the head and context shards).
    share_max: with a context axis, the devices share the reference max of
      `max_mode` so that they decide as one device: "global" takes the max
      over all parts between its two passes (one device's decisions for
      any lengths and split counts); "anchored" scores the sequence's first
      and last block on the devices that hold them and starts every split
      there (one device's decisions when its splits fall on the part
      boundaries, e.g. full-length rows with num_splits = n there and 1 per
      part here). Each is a `pmax` of [batch, q_heads] floats; "split" has
      no shared max (ValueError).
    **kwargs: the other `bj.decode_attention` arguments (sm_scale,
      block_kv, num_splits, max_mode, implementation, interpret,
      kernel_config); num_splits and max_mode apply within each part.

  Returns:
    out with q's shape, or (out, DecodeStats). Without a context axis equal
    to one device's; with one equal to one device's split-K over the same
    parts (e.g. full-length rows, num_splits=1 per part and max_mode
    "split" match one device's num_splits = n).

  Raises:
    ValueError: as `attention`, a max_len that does not divide by the
      context axis size, or anything `bj.decode_attention` rejects.
  """
  check_mesh(mesh, batch_axis=batch_axis, head_axis=head_axis,
             context_axis=context_axis)
  b, max_len, hkv = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
  hq = q.shape[-2]
  nb, nh = axis_size(mesh, batch_axis), axis_size(mesh, head_axis)
  nc = axis_size(mesh, context_axis)
  check_divides(b, nb, "The batch", "batch_axis")
  check_divides(hq, nh, "q_heads", "head_axis")
  check_divides(hkv, nh, "kv_heads", "head_axis")
  check_divides(max_len, nc, "The cache length max_len", "context_axis")
  max_mode = kwargs.get("max_mode", decode_lib.DEFAULT_MAX_MODE)
  block_kv = kwargs.get("block_kv", decode_lib.DEFAULT_BLOCK_KV)
  if share_max:
    _check_decode_share_max(context_axis, max_mode, max_len // nc, block_kv)
  if context_axis is None:
    thr_array, thr_static = _split_threshold(threshold, b)
  elif validation.is_static_zero(threshold):
    thr_array, thr_static = None, 0.0     # the kernels without the check
  else:
    # λ per row from the whole sequence (a scale factor divides by its
    # length), not from a part.
    thr_array, thr_static = config_lib.resolve_threshold(
        threshold, jnp.asarray(kv_lengths, jnp.int32), max_len, b,
        phase="decode"), None
  q_spec = (P(batch_axis, head_axis, None) if q.ndim == 3 else
            P(batch_axis, None, head_axis, None))
  cache_spec = P(batch_axis, context_axis, head_axis, None)
  row_spec = P(batch_axis)
  head_spec = P(batch_axis, head_axis)
  summed = _names(head_axis) + _names(context_axis)

  def body(q, k_cache, v_cache, kv_lengths, *thr):
    threshold = thr[0] if thr else thr_static
    if context_axis is None:
      out, stats = decode_lib.decode_attention(
          q, k_cache, v_cache, kv_lengths, return_stats=True,
          threshold=threshold, **kwargs)
    else:
      part = k_cache.shape[1]
      start = jax.lax.axis_index(context_axis) * part
      local = jnp.clip(kv_lengths - start, 0, part).astype(jnp.int32)
      opts = dict(kwargs)
      if share_max and max_mode == "global":
        opts["max_axis_name"] = context_axis
      elif share_max:     # "anchored": the whole sequence's anchors
        opts["max_mode"] = "split"
        opts["initial_max"] = jax.lax.pmax(anchor_max_in_part(
            q, k_cache, kv_lengths, start, block_kv=block_kv,
            sm_scale=kwargs.get("sm_scale")), context_axis)
      (out, lse), stats = decode_lib.decode_attention(
          q, k_cache, v_cache, local, return_stats=True, return_lse=True,
          threshold=threshold, **opts)
      rows = out.reshape(out.shape[0], out.shape[-2], out.shape[-1])
      out = merge_by_lse(rows, lse, context_axis).reshape(out.shape)
      out = out.astype(q.dtype)
    skipped, visited = stats.skipped_blocks, stats.visited_blocks
    bytes_read = stats.bytes_read
    if context_axis is not None:
      skipped = jax.lax.psum(skipped, context_axis)
      visited = jax.lax.psum(visited, context_axis)
    if summed:      # each shard read its own heads' / positions' blocks
      bytes_read = jax.lax.psum(bytes_read, summed)
    return out, skipped, visited, bytes_read

  thr_args = () if thr_array is None else (thr_array,)
  out, skipped, visited, bytes_read = _run_sharded(
      body, mesh,
      (q_spec, cache_spec, cache_spec, row_spec) + (row_spec,) * len(thr_args),
      (q_spec, head_spec, head_spec, row_spec),
      q, k_cache, v_cache, kv_lengths, *thr_args,
      key=("decode", context_axis, summed, share_max, max_mode, block_kv,
           thr_static, tuple(sorted(kwargs.items()))))
  if not return_stats:
    return out
  return out, decode_lib.DecodeStats(skipped_blocks=skipped,
                                     visited_blocks=visited,
                                     block_kv=block_kv, bytes_read=bytes_read)


def _check_decode_share_max(context_axis, max_mode, part: int,
                            block_kv: int) -> None:
  if context_axis is None:
    raise ValueError("`share_max` shares the reference max across the parts "
                     "of a context axis: pass context_axis.")
  if max_mode == "split":
    raise ValueError("`share_max` needs max_mode 'anchored' or 'global': "
                     "'split' has no max to share (each split keeps its "
                     "own).")
  if max_mode == "anchored" and part % block_kv:
    raise ValueError(f"`share_max` with max_mode='anchored' needs the part "
                     f"of the cache on each device (max_len / n = {part}) "
                     f"to be a multiple of block_kv ({block_kv}), so that "
                     "each anchor block is whole on one device.")


def anchor_max_in_part(q, k_part, kv_lengths, start, *, block_kv: int,
                        sm_scale=None):
  """This device's share of each sequence's anchor max.

  Args:
    q: [batch, q_heads, head_dim] or [batch, 1, q_heads, head_dim].
    k_part: [batch, part, kv_heads, head_dim], cache positions
      start..start+part (part a multiple of block_kv).
    kv_lengths: int [batch], the whole sequences' lengths.
    start: this part's first position.
    block_kv: keys per block; sm_scale: default 1/sqrt(head_dim).

  Returns:
    f32 [batch, q_heads]: the row max of sm_scale·q·kᵀ over the sequence's
    first and last block (`reference.decode_anchor_max`) where this part
    holds them, -inf elsewhere: a `pmax` over the parts gives one device's
    anchor max.
  """
  b, part, hkv, d = k_part.shape
  q = q.reshape(b, hkv, q.shape[-2] // hkv, d)                  # [b,hkv,g,d]
  if sm_scale is None:
    sm_scale = reference.default_sm_scale(d)
  kv_lengths = jnp.asarray(kv_lengths, jnp.int32)
  last = jnp.maximum(-(-kv_lengths // block_kv) - 1, 0) * block_kv  # [b]
  m = jnp.full(q.shape[:3], -jnp.inf, jnp.float32)
  for first in (jnp.zeros_like(last), last):      # block starts, global [b]
    offset = jnp.clip(first - start, 0, part - block_kv)
    keys = jax.vmap(lambda k, o: jax.lax.dynamic_slice_in_dim(
        k, o, block_kv))(k_part, offset)                  # [b, bkv, hkv, d]
    s = jnp.einsum("bhgd,bkhd->bhgk", q, keys,
                   preferred_element_type=jnp.float32,
                   precision=jax.lax.Precision.HIGHEST) * sm_scale
    pos = first[:, None] + jnp.arange(block_kv)[None, :]         # [b, bkv]
    held = (first >= start) & (first < start + part)             # [b]
    valid = held[:, None] & (pos < kv_lengths[:, None])
    s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
    m = jnp.maximum(m, jnp.max(s, axis=-1))
  return m.reshape(b, -1)
