"""blasst_jax: Skip-Softmax (BLASST) attention for JAX and Pallas.

    import blasst_jax as bj
    out, stats = bj.attention(q, k, v, threshold=1e-2, causal=True,
                              return_stats=True)
    print(stats.sparsity)           # skipped / visited blocks per (batch, head)
"""

from blasst_jax import analysis
from blasst_jax import calibration
from blasst_jax import reference
from blasst_jax import sharding
from blasst_jax import xattention
from blasst_jax.api import attention
from blasst_jax.api import default_implementation
from blasst_jax.config import DecodeStats
from blasst_jax.config import SkipSoftmaxConfig
from blasst_jax.config import SkipStats
from blasst_jax.decode import decode_attention
from blasst_jax.decode import paged_decode_attention

__version__ = "0.1.0"

__all__ = [
    "DecodeStats",
    "SkipSoftmaxConfig",
    "SkipStats",
    "analysis",
    "attention",
    "calibration",
    "decode_attention",
    "default_implementation",
    "paged_decode_attention",
    "reference",
    "sharding",
    "xattention",
]
