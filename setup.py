"""Builds the native CPU int8 GEMM (cpu_kernels/s8_gemm.cc) with the package, against the
XLA FFI headers of the jaxlib in the build environment, so users need no compiler or
writable cache at run time. Everything else is in pyproject.toml.

The extension is optional: where it cannot be built (no C++ compiler, not x86-64) the
install still succeeds and cpu_kernels falls back to a first-use build, then to XLA's
dot (with a warning). The jaxlib version it was built against is compiled into the
library with the source's sha256; cpu_kernels rebuilds on first use when the runtime
jaxlib (or, in an editable install, the source) differs. With pip's
build isolation the build env gets the newest jaxlib in the build-system range; for an
exact match install with `pip install --no-build-isolation .` next to jaxlib.
"""

import hashlib
import importlib.metadata
import importlib.util
import os
import platform

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _jaxlib_include_and_version():
  spec = importlib.util.find_spec("jaxlib")  # jax.ffi.include_dir() without importing jax
  if spec is None or not spec.submodule_search_locations:
    raise RuntimeError("jaxlib is not installed in the build environment")
  root = list(spec.submodule_search_locations)[0]
  return os.path.join(root, "include"), importlib.metadata.version("jaxlib")


class BuildS8Gemm(build_ext):
  """Adds jaxlib's include dir and version at build time (the build env has jaxlib)."""

  def build_extensions(self):
    include, version = _jaxlib_include_and_version()
    for ext in self.extensions:
      with open(ext.sources[0], "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
      ext.include_dirs.append(include)
      ext.define_macros += [("ACTQUANT_JAXLIB_VERSION", f'"{version}"'), ("ACTQUANT_SOURCE_SHA256", f'"{digest}"')]
    super().build_extensions()


ext_modules = []
if platform.machine().lower() in ("x86_64", "amd64") and os.environ.get("ACTQUANT_NO_NATIVE") != "1":
  ext_modules.append(Extension(
      "cpu_kernels._s8_gemm", sources=["cpu_kernels/s8_gemm.cc"], language="c++",
      extra_compile_args=["-O3", "-std=c++17", "-fopenmp-simd", "-w"], optional=True))

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildS8Gemm})
