"""What every op shares: the result dataclass, where the kernels compile, and
the one registry of implementations.

An op is one backend of one family ("attention": prefill, "decode"): it
checks what it can run (`supports` for the automatic choice, `prepare` with
a `ValueError` naming the fix), resolves its tiles and kernel config once,
and returns an `AttentionResult`. The public calls (`blasst_jax.api`,
`blasst_jax.decode`) validate, pick an op from this registry and unwrap the
result once.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, ClassVar

import jax

from blasst_jax import validation
from blasst_jax.config import SkipStats

GPU_BACKENDS = ("gpu", "cuda", "rocm")


def on_gpu(backend: str | None = None) -> bool:
  """Whether `backend` (default `jax.default_backend()`) is a GPU: where the
  Pallas kernels compile (elsewhere they run in interpret mode)."""
  return (backend or jax.default_backend()) in GPU_BACKENDS


def is_hopper(device=None) -> bool:
  """True for an NVIDIA Hopper GPU (H100, H200, H800, GH200: sm_90).

  Args:
    device: a `jax.Device`, default the first device.
  """
  device = device or jax.devices()[0]
  if not on_gpu(device.platform):
    return False
  capability = getattr(device, "compute_capability", None)
  if capability is not None:
    return str(capability).split(".")[0] == "9"
  return any(name in device.device_kind for name in ("H100", "H200", "H800"))


def gpu_interpret_params(interpret):
  """Pallas' GPU interpret settings (Mosaic GPU ops) for the caller's
  `interpret`: None when off, defaults for True, and a
  `plgpu.InterpretGPUParams` as given (e.g. `detect_races=True`)."""
  import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  if isinstance(interpret, plgpu.InterpretGPUParams):
    return interpret
  return plgpu.InterpretGPUParams() if interpret else None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionResult:
  """What an op returns; the public calls unwrap it once.

  Attributes:
    out: the attention output in q's dtype (prefill [batch, q_len, q_heads,
      head_dim]; decode [batch, q_heads, head_dim]).
    lse: f32 natural-log log-sum-exp of each row's kept scores ([batch,
      q_heads, q_len] / [batch, q_heads]; -inf for rows that kept none), or
      None where the call did not ask for it (the differentiable Pallas
      forward leaves it out: it has no gradient).
    stats: `SkipStats` (decode: `DecodeStats`) per (batch, q-head), with the
      tiles that decided.
    skip_mask: bool, the blocks each tile skipped ([batch, q_heads,
      n_q_tiles, n_kv_blocks]), where the op recorded them, else None.
    row_max: f32 [batch, q_heads, q_len], the running max at the end, when
      the call started from an `initial_max`, else None.
  """

  out: jax.Array
  lse: jax.Array | None
  stats: SkipStats
  skip_mask: jax.Array | None = None
  row_max: jax.Array | None = None


class Op:
  """One backend of one family.

  Attributes:
    name: the `implementation` string that selects it.
    family: "attention" or "decode".
    config_class: the kernel config dataclass it takes as `kernel_config`
      (None: it takes none).
  """

  name: ClassVar[str]
  family: ClassVar[str]
  config_class: ClassVar[type | None] = None

  @property
  def label(self) -> str:
    """How error messages name it, e.g. "'pallas_mosaic' decode"."""
    return repr(self.name) + ("" if self.family == "attention"
                              else f" {self.family}")

  def kernel_config(self, kernel_config):
    """`kernel_config`, or this op's default config for None."""
    if self.config_class is None:
      if kernel_config is not None:
        raise ValueError(
            f"`kernel_config` tunes a Pallas kernel; implementation="
            f"{self.name!r} takes none (pass kernel_config=None).")
      return None
    return validation.kernel_config_or_default(kernel_config,
                                               self.config_class, self.label)

  def supports(self, **problem) -> bool:
    """Whether `implementation=None` may pick this op for `problem`."""
    raise NotImplementedError

  def __repr__(self):
    return f"<{self.family} op {self.name!r}>"


# The registry: (family, implementation) -> module holding its `OP`. The
# modules are imported on first use (the kernels import Pallas backends).
_OP_MODULES = {
    ("attention", "reference"): "blasst_jax.ops.attention.reference",
    ("attention", "pallas_triton"): "blasst_jax.ops.attention.pallas_triton",
    ("attention", "pallas_mosaic"):
        "blasst_jax.ops.attention.pallas_mosaic_gpu",
    ("decode", "reference"): "blasst_jax.ops.decode.reference",
    ("decode", "pallas_triton"): "blasst_jax.ops.decode.pallas_triton",
    ("decode", "pallas_mosaic"): "blasst_jax.ops.decode.pallas_mosaic_gpu",
}
# The order `implementation=None` tries them in: the first that supports
# the problem runs.
PREFERENCE = ("pallas_mosaic", "pallas_triton", "reference")
assert {name for _, name in _OP_MODULES} == set(
    validation.IMPLEMENTATIONS) == set(PREFERENCE)


def get_op(family: str, implementation: str) -> Any:
  """The op of `family` ("attention" or "decode") named `implementation`."""
  validation.check_implementation(implementation)
  return importlib.import_module(_OP_MODULES[family, implementation]).OP


def default_op(family: str, **problem) -> Any:
  """The first op of `family` (in `PREFERENCE` order) that supports
  `problem` (keywords of its `supports`)."""
  for name in PREFERENCE:
    op = get_op(family, name)
    if op.supports(**problem):
      return op
  raise AssertionError(f"no {family} op supports {problem}")
