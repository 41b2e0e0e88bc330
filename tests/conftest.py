import jax
import numpy as np
import pytest

# f32 matmuls at full precision so references compare tightly.
jax.config.update("jax_default_matmul_precision", "highest")


def _has_gpu() -> bool:
  try:
    return any(d.platform == "gpu" for d in jax.devices())
  except RuntimeError:
    return False


HAS_GPU = _has_gpu()


def pytest_collection_modifyitems(config, items):
  skip = pytest.mark.skip(reason="needs a CUDA GPU")
  for item in items:
    if "gpu" in item.keywords and not HAS_GPU:
      item.add_marker(skip)


@pytest.fixture
def rng():
  return np.random.default_rng(0)
