"""The backend registry (actquant_jax/backends.py): each backend says whether it can run a
problem and why not; auto picks by GPU generation and shape, once, logged, inspectable."""

import logging
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import actquant_jax as aq
from actquant_jax import backends, ops
from actquant_jax.backends import BackendUnavailableError, Problem

H100, A100, ADA = (9, 0), (8, 0), (8, 9)


def _gpu(cc, **kw):
  kw = {"k": 4096, "n": 4096, **kw}
  return Problem(platform="gpu", compute_capability=cc, **kw)


@pytest.mark.parametrize("cc,qtype,m,expect", [
    (H100, "int8", 2048, "mosaic"), (H100, "int8", 64, "mosaic"), (H100, "int8", 16, "triton"),
    (H100, "float8_e4m3fn", 16, "mosaic"), (H100, "float8_e4m3fn", 2048, "mosaic"),
    (A100, "int8", 16, "triton"), (A100, "int8", 2048, "triton"),
    (ADA, "float8_e4m3fn", 2048, "triton"), ((10, 0), "int8", 2048, "triton"),
])
def test_auto_per_generation_and_shape(cc, qtype, m, expect):
  assert backends.choose("auto", _gpu(cc, qtype=qtype, m=m)).backend == expect


def test_hopper_falls_back_to_triton_with_the_reason():
  choice = backends.choose("auto", _gpu(H100, m=2048, k=4100))  # K % 16 != 0
  assert choice.backend == "triton"
  assert choice.rejected[0][0] == "mosaic" and "multiple of 16" in choice.rejected[0][1]
  assert choice in backends.decisions()
  assert "mosaic" in str(choice)


def test_clear_errors():
  with pytest.raises(BackendUnavailableError, match="fp8 tensor cores.*sm_80"):
    backends.choose("triton", _gpu(A100, qtype="float8_e4m3fn", m=128))
  with pytest.raises(BackendUnavailableError, match="only Hopper.*sm_80"):
    backends.choose("mosaic", _gpu(A100, m=128))
  cpu = Problem(k=64, platform="cpu")
  for name in ("triton", "mosaic"):
    with pytest.raises(BackendUnavailableError, match=f"backend='{name}' needs a .*GPU.*interpret=True"):
      backends.choose(name, cpu)
  with pytest.raises(ValueError, match="backend must be one of"):
    backends.choose("cuda", cpu)
  assert set(backends.explain(cpu)) == {"xla", "cpu", "triton", "mosaic"}
  assert backends.explain(cpu)["xla"] is None


def test_w8a8_dot_names_the_backend_and_the_fix_without_a_gpu():
  if jax.default_backend() == "gpu":
    pytest.skip("has a GPU")
  qk = aq.quantize_kernel(jnp.ones((8, 4)))
  with pytest.raises(BackendUnavailableError, match="backend='triton' needs a CUDA GPU.*interpret=True"):
    aq.w8a8_dot(jnp.ones((2, 8)), qk, backend="triton")
  with pytest.raises(BackendUnavailableError, match="backend='mosaic'"):
    aq.w8a8_dot(jnp.ones((2, 8)), qk, backend="mosaic")


def test_choice_made_once_and_logged_once(caplog):
  p = _gpu(H100, m=333)
  with caplog.at_level(logging.INFO, logger="actquant_jax"):
    first = backends.choose("auto", p)
    assert backends.choose("auto", p) is first
  assert sum("w8a8 kernel" in r.message and "M=333" in r.message for r in caplog.records) == 1


def test_xla_fallback_warns_once():
  p = _gpu(A100, qtype="float8_e4m3fn", m=2048, k=1234 * 16)
  with pytest.warns(RuntimeWarning, match="falls back to XLA"):
    assert backends.choose("auto", p).backend == "xla"


def test_import_loads_no_gpu_backend():
  # Lazy kernels: importing the library on a CPU imports neither Mosaic GPU nor Triton
  # beyond what `import jax, flax` themselves load (flax imports jax.extend.pallas, which
  # brings Pallas core and the interpret-mode parameter modules).
  code = ("import sys, jax, flax\n"
          "base = set(sys.modules)\n"
          "import actquant_jax, pallas_kernels\n"
          "from pallas_kernels import reference\n"
          "new = sorted(m for m in set(sys.modules) - base if 'mosaic' in m or 'triton' in m)\n"
          "print(new)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[]", out.stdout


def test_cpu_preference_by_amx_and_rows():
  # With AMX-INT8, XLA's int8 dot (YNNPACK) outruns the VNNI kernel from M = 3 (measured
  # 2.5x at M >= 64); the native kernel keeps decode's M <= 2. Without AMX it is native first.
  pref = lambda **kw: backends.preference(Problem(k=64, platform="cpu", **kw))
  assert pref(m=1, cpu_amx=True)[0] == pref(m=2, cpu_amx=True)[0] == "cpu"
  assert pref(m=3, cpu_amx=True)[0] == pref(m=4096, cpu_amx=True)[0] == pref(cpu_amx=True)[0] == "xla"
  assert pref(m=4096, cpu_amx=False)[0] == "cpu"
  assert pref(m=1, cpu_amx=True, qtype="float8_e4m3fn") == ("xla",)
  assert "(AMX)" in Problem(k=64, platform="cpu", cpu_amx=True).describe()
  assert backends.problem_for(k=64).cpu_amx == backends.cpu_has_amx()


@pytest.mark.parametrize("native", [True, False], ids=["native-lib", "no-native-lib"])
def test_every_stage_is_decided_in_the_kernel(native, monkeypatch):
  # The policy alone (the native library faked present or absent): backend='xla' is XLA
  # in every stage; auto/cpu quantize int8 (dynamic and static) natively and find NaN/Inf
  # rows by marks the native GEMM reads (under XLA's GEMM: the pass's NaN scale); fp8 and
  # Pallas never mix.
  monkeypatch.setattr(backends, "_native_cpu", lambda: (native, "" if native else "faked absent"))
  monkeypatch.setattr(backends, "_decisions", {})
  cpu = lambda **kw: Problem(k=64, platform="cpu", **kw)
  stages = lambda req, p: (lambda k: (k.backend, k.quantizer, k.marks))(backends.choose(req, p))
  for act in ("dynamic", "static"):
    assert stages("xla", cpu(m=8, act=act)) == ("xla", "xla", "scale")
    assert stages("auto", cpu(m=8, act=act, qtype="float8_e4m3fn")) == ("xla", "xla", "scale")
    assert stages("auto", _gpu(H100, m=8, act=act))[1:] == ("triton", "scale")
  if native:
    assert stages("auto", cpu(m=8)) == stages("cpu", cpu(m=8)) == ("cpu", "cpu", "gemm")
    assert stages("auto", cpu(m=8, act="static")) == ("cpu", "cpu", "gemm")
    assert stages("auto", cpu(m=8, cpu_amx=True)) == ("xla", "cpu", "scale")  # AMX: XLA's GEMM from M = 3
    assert stages("auto", cpu(m=8, cpu_amx=True, act="static")) == ("xla", "cpu", "scale")
  else:
    assert stages("auto", cpu(m=8)) == stages("auto", cpu(m=8, act="static")) == ("xla", "xla", "scale")
  kernel = backends.choose("xla", cpu(m=8))
  assert "xla GEMM, quantize by the reference formulas as XLA fusions" in str(kernel)
  with pytest.raises(aq.BackendError, match="static"):
    kernel.quantize(jnp.ones((2, 64)), None, jnp.float32(0.1))


@pytest.mark.parametrize("act_scale", [None, 0.03])
def test_stages_compose_to_w8a8_dot(act_scale, rng):
  # quantize -> accumulate -> epilogue (what the sharded path and the alpha search do) is
  # w8a8_dot, bit for bit; a weight in its own (K, N) layout accumulates to the same sums.
  k, n = 96, 24
  x = jnp.asarray(rng.standard_normal((5, k)), jnp.float32)
  qk = aq.quantize_kernel(jnp.asarray(rng.standard_normal((k, n)), jnp.float32), act_scale=act_scale,
                          inv_smooth=jnp.asarray(rng.uniform(0.5, 2, k), jnp.float32))
  kernel = ops.choose_kernel(qk, m=5, out_dtype=jnp.float32, backend="xla")
  xq, sx = kernel.quantize(x, qk.inv_smooth, qk.act_scale)
  acc, flags = kernel.accumulate(xq, qk.values)
  y = kernel.epilogue(acc, sx + flags, qk.scale, None, jnp.float32)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(aq.w8a8_dot(x, qk, backend="xla")))
  np.testing.assert_array_equal(np.asarray(kernel.accumulate(xq, qk.values.T, w_k_axis=0)[0]), np.asarray(acc))
  exact = np.asarray(xq, np.int64) @ np.asarray(qk.values, np.int64).T  # independent of the code under test
  np.testing.assert_array_equal(np.asarray(acc), exact)
