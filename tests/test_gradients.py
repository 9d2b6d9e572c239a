"""The gradient suite (`test_base.GradientTestBase`) on CPU: the reference,
the Triton kernels in interpret mode, and the Hopper kernels (forward
`kernels/pallas_mosaic.py`, backward `kernels/pallas_mosaic_bwd.py`) in
Pallas' GPU interpret mode with race detection. The compiled kernels run it
in tests/test_gpu.py and tests/test_gpu_mosaic.py.
"""

import pytest

from tests import test_base


class TestReferenceGradients(test_base.GradientTestBase):
  implementation = "reference"


class TestPallasTritonGradients(test_base.GradientTestBase):
  implementation = "pallas_triton"


class TestMosaicInterpretGradients(test_base.RaceChecked,
                                   test_base.WideGradientTestBase):
  """Every call race-checked."""

  implementation = "pallas_mosaic"
  # Race-checked interpretation takes about half a minute a call on two
  # cores: these run on the compiled kernels (tests/test_gpu_mosaic.py).
  supports_transforms = False
  supports_training_step = False

  def marks_for(self, test_name, causal):
    # The causal sparse case's checks are the rows test's (causal, a block
    # mask, skips, gradients against the oracle's); the non-causal dense
    # case runs the kernel paths of the non-causal sparse one.
    if (test_name, causal) in (("test_sparse_gradients_match_oracle", True),
                               ("test_dense_gradients_match_jax", False)):
      return [pytest.mark.skip(reason="covered on CPU by the other cases; "
                               "runs compiled in tests/test_gpu_mosaic.py")]
    return []
