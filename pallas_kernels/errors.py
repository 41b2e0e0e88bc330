"""The named errors the kernel packages (pallas_kernels, cpu_kernels) raise, and their bases.

Defined here, not in actquant_jax/errors.py, because importing anything under actquant_jax
runs actquant_jax/__init__.py, which imports (through quant.py, backends.py) the kernel
packages themselves: the kernels raising actquant_jax's errors would be an import cycle,
and `import pallas_kernels.reference` would load the whole library. This module imports
nothing and pallas_kernels/__init__.py has no side effects, so every package can import it.

actquant_jax.errors re-exports every class here: the public names are aq.ActquantError,
aq.BackendError, aq.BackendUnavailableError, aq.KernelArgumentError, aq.KernelTypeError.
Each derives from the builtin the kernels raised before (ValueError, TypeError,
RuntimeError), so `except ValueError` still works.
"""


class ActquantError(Exception):
  """Base class of every error actquant-jax raises on purpose."""


class BackendError(ActquantError, ValueError):
  """A backend cannot run this problem (wrong qtype, K, device); the message names one that can."""


class BackendUnavailableError(BackendError, RuntimeError):
  """The backend does not exist on this machine (no GPU, no AVX512-VNNI, no compiler)."""


class KernelArgumentError(ActquantError, ValueError):
  """A kernel (pallas_kernels.int8_matmul / fp8_matmul / quantize_rows, the reference
  formulas, cpu_kernels.s8_gemm / quantize_rows / marked_rows / decode_attention) or its
  block configuration (MatmulBlocks, MosaicBlocks, WsBlocks, QuantizeBlocks) is given an
  argument it cannot take: a shape, a rank, K too large, a tile size. The message names
  the argument and the fix."""


class KernelTypeError(KernelArgumentError, TypeError):
  """A kernel argument has the wrong dtype or type (e.g. float operands to int8_matmul)."""
