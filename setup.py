"""Build and install marthe_ext.

    pip install --no-build-isolation .     # install torch first: the extensions build against it

The compiled extensions are optional. A failed or impossible build only warns: the pure-Python
package always installs, and the compiled backends then build themselves on first use
(``backend="cpu"`` / ``"cuda"``, with ninja) or ``backend="auto"`` falls back to torch.

* ``marthe_ext._C_cpu``: the C++ CPU backend, built when a C++ compiler is found.
* ``marthe_ext._C_cuda``: the CUDA backend, built when torch has CUDA (``torch.version.cuda``)
  and nvcc is found (``CUDA_HOME``). Architectures: ``TORCH_CUDA_ARCH_LIST``, default
  ``"8.0;9.0"`` (A100, H100/H200). V100 (sm_70): CUDA 13 dropped Volta, so build with a CUDA 12
  toolkit and ``TORCH_CUDA_ARCH_LIST="7.0"`` (torch with CUDA 12 too).

Environment: ``MARTHE_NO_EXT=1`` builds no extension; ``MAX_JOBS`` bounds parallel compile
jobs; ``CXX`` picks the C++ compiler. Sources and flags: marthe_ext/_build_config.py (shared
with the JIT build). The C++ sources are also shipped in the package (``marthe_ext/_csrc``)
so that an installed package can JIT-build an extension later.
"""
from __future__ import annotations

import os
import re
import runpy
import shutil
import warnings
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CFG = runpy.run_path(str(ROOT / "marthe_ext" / "_build_config.py"))


def _version() -> str:
    text = (ROOT / "marthe_ext" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


class BuildPyWithSources(build_py):
    """Also copies csrc/ into the package as marthe_ext/_csrc (for JIT builds after install)."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "marthe_ext" / "_csrc"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(ROOT / "csrc", target, ignore=shutil.ignore_patterns("*.o", "*.so"))


def _skip(reason: str) -> None:
    warnings.warn(f"marthe_ext: {reason}; installing the pure-Python package only")


def _extensions():
    """(ext_modules, cmdclass additions); empty when nothing can or should be compiled."""
    if os.environ.get("MARTHE_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        _skip(f"torch is not importable at build time ({exc}); install torch first and use "
              "`pip install --no-build-isolation .`")
        return [], {}

    def src(names):
        return [f"csrc/{name}" for name in names]

    include = [str(ROOT / "csrc")]
    modules = []
    if shutil.which(os.environ.get("CXX", "c++")):
        modules.append(cpp_extension.CppExtension(
            f"marthe_ext.{CFG['MODULES']['cpu']}", src(CFG["CPU_SOURCES"]),
            include_dirs=include, extra_compile_args=list(CFG["CPU_CFLAGS"]),
            extra_link_args=list(CFG["CPU_LDFLAGS"])))
    else:
        _skip("no C++ compiler found (set CXX)")
    if torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", CFG["DEFAULT_CUDA_ARCH_LIST"])
        modules.append(cpp_extension.CUDAExtension(
            f"marthe_ext.{CFG['MODULES']['cuda']}", src(CFG["CUDA_SOURCES"]),
            include_dirs=include,
            extra_compile_args={"cxx": list(CFG["CUDA_CFLAGS"]),
                                "nvcc": list(CFG["NVCC_FLAGS"])}))
    if not modules:
        return [], {}

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """Builds each extension independently; a failure warns instead of failing."""

        def build_extensions(self):
            self._failed = {}
            try:
                super().build_extensions()
            except Exception as exc:  # before any extension: toolchain checks (CUDA version)
                cuda = [e for e in self.extensions if any(s.endswith(".cu") for s in e.sources)]
                for e in (cuda or self.extensions):
                    self._failed[e.name] = f"{type(exc).__name__}: {exc}"
                self.extensions = [e for e in self.extensions if e.name not in self._failed]
                if self.extensions:
                    try:
                        super().build_extensions()
                    except Exception as again:
                        for e in self.extensions:
                            self._failed[e.name] = f"{type(again).__name__}: {again}"
            self.extensions = [e for e in self.extensions if e.name not in self._failed]
            for name, reason in self._failed.items():
                warnings.warn(
                    f"marthe_ext: could not build {name} ({reason}); installing without it. "
                    f"backend='cpu'/'cuda' will try to build it on first use, "
                    f"backend='auto' uses torch")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # compiler or linker error: keep installing
                self._failed[ext.name] = f"{type(exc).__name__}: {exc}"

    return modules, {"build_ext": OptionalBuildExtension}


ext_modules, ext_cmdclass = _extensions()

setup(
    name="marthe_ext",
    version=_version(),
    description="Online learning-rate scheduling by hypergradients (MARTHE, HD, RTHO), fast",
    packages=find_packages(include=["marthe_ext*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    ext_modules=ext_modules,
    cmdclass={"build_py": BuildPyWithSources, **ext_cmdclass},
    zip_safe=False,
)
