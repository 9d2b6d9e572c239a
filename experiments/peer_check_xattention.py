r"""Agreement of `bj.xattention.select_blocks` with the reference XAttention
estimate (mit-han-lab/x-attention's `xattn_estimate`), on identical inputs.

Needs PyTorch, Triton and a checkout of x-attention (not part of this
project); its `block_sparse_attn` import may be stubbed, only the estimate
runs:

    python -m experiments.peer_check_xattention --xattention_path=/path/to/x-attention

Prints, per (seq_len, stride, τ) and per estimate path (torch, triton), the
fraction of causal (q-block, kv-block) entries on which the two masks agree,
their Jaccard index and each side's selected fraction.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from blasst_jax import patterns
from blasst_jax import xattention

_PATH = flags.DEFINE_string("xattention_path", None,
                            "Directory holding the `xattn` package.")
_CASES = [(8192, 16, 0.9), (8192, 8, 0.9), (16384, 16, 0.95)]


def main(argv):
  del argv
  import torch  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, _PATH.value)
  from xattn.src.Xattention import xattn_estimate  # pylint: disable=g-import-not-at-top
  to_torch = lambda x: torch.from_numpy(np.array(x.astype(jnp.float32))).cuda(  # pylint: disable=g-long-lambda
  ).to(torch.bfloat16).transpose(1, 2).contiguous()
  for seq, stride, tau in _CASES:
    q, k, _ = patterns.sink_local_qkv(
        jax.random.PRNGKey(1), batch=1, seq_len=seq, q_heads=8, kv_heads=8,
        head_dim=128, sharpness=(2., 6., 10., 14., 18., 22., 26., 30.),
        window=256, dtype=jnp.bfloat16)
    ours = np.asarray(xattention.select_blocks(
        q, k, block_size=128, stride=stride, threshold=tau, causal=True))
    causal = np.tril(np.ones(ours.shape[2:], bool))
    for use_triton in (False, True):
      _, theirs = xattn_estimate(to_torch(q), to_torch(k), block_size=128,
                                 stride=stride, threshold=tau, causal=True,
                                 use_triton=use_triton,
                                 chunk_size=min(seq, 16384))
      theirs = theirs.cpu().numpy()[:, :, :ours.shape[2], :ours.shape[3]]
      same = (ours == theirs)[..., causal]
      jaccard = (ours & theirs).sum() / max((ours | theirs).sum(), 1)
      print(f"s{seq} stride{stride} τ={tau} "
            f"{'triton' if use_triton else 'torch'}: agreement "
            f"{same.mean():.4f} jaccard {jaccard:.4f} ours "
            f"{ours[..., causal].mean():.3f} theirs "
            f"{theirs[..., causal].mean():.3f}", flush=True)


if __name__ == "__main__":
  flags.mark_flag_as_required("xattention_path")
  app.run(main)
