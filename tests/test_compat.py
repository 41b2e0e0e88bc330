"""pallas_kernels/_compat.py: the version-specific calls and the Triton fp8 wgmma fix."""

import re

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels as pk
from pallas_kernels import _compat
from tests.kernel_utils import lower_for_cuda


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.int8], ids=["fp8", "int8"])
def test_fp8_dots_may_use_hopper_wgmma(dtype, capsys):
  # JAX's Triton lowering leaves max_num_imprecise_acc at 0, and Triton then refuses wgmma
  # for fp8 with an f32 result (f16 HMMA instead; make gpu-check shows QGMMA with the fix).
  # The fix sets it to the dot's K on 8-bit float dots only.
  assert _compat.enable_triton_fp8_wgmma()
  mm = pk.fp8_matmul if dtype == jnp.float8_e4m3fn else pk.int8_matmul
  blocks = pk.MatmulBlocks(block_m=64, block_n=128, block_k=128)
  lower_for_cuda(lambda x, w: mm(x, w, blocks=blocks, debug=True), jnp.zeros((256, 512), dtype),
                 jnp.zeros((256, 512), dtype))
  dots = re.findall(r"tt\.dot .*", capsys.readouterr().out)
  assert dots
  for dot in dots:
    if dtype == jnp.int8:
      assert "maxNumImpreciseAcc" not in dot
    else:
      assert "maxNumImpreciseAcc = 128" in dot


def test_supported_range():
  lo, hi = _compat.SUPPORTED_JAX
  assert lo <= _compat.JAX_VERSION < hi


def test_fp8_wgmma_fix_leaves_other_kernels_alone(capsys):
  # The wrapped lowering rule is process-wide; it must only touch this package's kernels
  # (pallas_call names starting with OWN_KERNEL_PREFIX): another library's fp8 dot lowers
  # as JAX lowers it.
  assert _compat.enable_triton_fp8_wgmma()

  def kernel(x_ref, w_ref, o_ref):
    o_ref[...] = jax.lax.dot_general(x_ref[...], w_ref[...], (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32)

  for name, expect in (("someone_elses_fp8_dot", False), (_compat.OWN_KERNEL_PREFIX + "probe", True)):
    f = lambda x, w, name=name: _compat.triton_call(
        kernel, out_shape=jax.ShapeDtypeStruct((64, 64), jnp.float32), grid=(1,), num_warps=4, num_stages=1,
        interpret=False, name=name, debug=True)(x, w)
    lower_for_cuda(f, jnp.zeros((64, 64), jnp.float8_e4m3fn), jnp.zeros((64, 64), jnp.float8_e4m3fn))
    dots = re.findall(r"tt\.dot .*", capsys.readouterr().out)
    assert dots and all(("maxNumImpreciseAcc" in d) == expect for d in dots), (name, dots)
