import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import actquant_jax as aq


@pytest.mark.parametrize("dtype,param_dtype", [(None, jnp.float32), (jnp.bfloat16, jnp.float32),
                                               (None, jnp.bfloat16), (jnp.float32, jnp.bfloat16)])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 24), (2, 3, 24)])
def test_quantized_dense_off_equals_nn_dense_exactly(dtype, param_dtype, use_bias, shape):
  x = jax.random.normal(jax.random.key(1), shape)
  ref = nn.Dense(16, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                 bias_init=nn.initializers.normal(1.0))
  q = aq.QuantizedDense(16, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                        bias_init=nn.initializers.normal(1.0), quantize=False)
  p_ref = ref.init(jax.random.key(0), x)
  p_q = q.init(jax.random.key(0), x)
  # same names, shapes, dtypes and initial values as nn.Dense
  assert jax.tree_util.tree_structure(p_ref) == jax.tree_util.tree_structure(p_q)
  for a, b in zip(jax.tree_util.tree_leaves(p_ref), jax.tree_util.tree_leaves(p_q)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  y_ref, y_q = ref.apply(p_ref, x), q.apply(p_ref, x)
  assert y_ref.dtype == y_q.dtype
  np.testing.assert_array_equal(np.asarray(y_q, np.float32), np.asarray(y_ref, np.float32))


@pytest.mark.parametrize("use_bias", [True, False])
def test_quantized_linear_off_equals_nnx_linear_exactly(use_bias):
  x = jax.random.normal(jax.random.key(1), (3, 7, 24))
  ref = nnx.Linear(24, 16, use_bias=use_bias, rngs=nnx.Rngs(0), bias_init=nnx.initializers.normal(1.0))
  q = aq.QuantizedLinear(24, 16, use_bias=use_bias, rngs=nnx.Rngs(0), bias_init=nnx.initializers.normal(1.0),
                         quantize=False)
  np.testing.assert_array_equal(np.asarray(q.kernel.get_value()), np.asarray(ref.kernel.get_value()))
  np.testing.assert_array_equal(np.asarray(q(x)), np.asarray(ref(x)))
  q2 = aq.QuantizedLinear.from_linear(ref, ref.kernel.get_value(), quantize=False)
  np.testing.assert_array_equal(np.asarray(q2(x)), np.asarray(ref(x)))


def test_quantized_dense_with_quantized_kernel_is_w8a8_dot():
  x = jax.random.normal(jax.random.key(1), (4, 32))
  m = aq.QuantizedDense(8)
  p = m.init(jax.random.key(0), x)
  qk = aq.quantize_kernel(p["params"]["kernel"], act_scale=0.03)
  qp = {"params": {"kernel": qk, "bias": p["params"]["bias"]}}
  y = jax.jit(m.apply)(qp, x)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(aq.w8a8_dot(x, qk, p["params"]["bias"])))
  # quantize=True with a float kernel: weights quantized on the fly, dynamic per token
  y_fly = m.apply(p, x)
  np.testing.assert_array_equal(np.asarray(y_fly), np.asarray(aq.w8a8_dot(x, aq.quantize_kernel(p["params"]["kernel"]),
                                                                         p["params"]["bias"])))
  rel = jnp.linalg.norm(y_fly - x @ p["params"]["kernel"]) / jnp.linalg.norm(x @ p["params"]["kernel"])
  assert rel < 0.03


def test_quantized_linear_fp8_and_errors():
  x = jax.random.normal(jax.random.key(1), (4, 32))
  lin = aq.QuantizedLinear(32, 8, qtype="float8_e4m3fn", rngs=nnx.Rngs(0))
  ref = x @ lin.kernel.get_value() + lin.bias.get_value()
  assert float(jnp.linalg.norm(lin(x) - ref) / jnp.linalg.norm(ref)) < 0.06
  with pytest.raises(ValueError, match="rngs"):
    aq.QuantizedLinear(3, 4)
  with pytest.raises(ValueError, match=r"kernel shape \(3, 5\) != \(3, 4\)"):
    aq.QuantizedLinear(3, 4, kernel=jnp.ones((3, 5)), bias=jnp.ones(4))
  with pytest.raises(ValueError, match="QuantizedDense: input of shape"):
    m = aq.QuantizedDense(8)
    p = m.init(jax.random.key(0), x)
    qp = {"params": {"kernel": aq.quantize_kernel(p["params"]["kernel"]), "bias": p["params"]["bias"]}}
    m.apply(qp, jnp.ones((2, 31)))
