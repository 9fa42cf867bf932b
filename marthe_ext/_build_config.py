"""Sources and compiler flags of the compiled extensions, in one place.

Read by ``setup.py`` (ahead-of-time build), by ``marthe_ext._ext`` (JIT build) and by the
tests (the nvcc compile check), so that the three builds cannot disagree. Plain data, no
imports: setup.py loads this file by path, before the package is importable.

Flag rationale:

* ``-fopenmp`` (CPU): ``at::parallel_for`` is a header template that runs serially unless
  the extension itself is compiled with OpenMP; the extension then shares torch's libgomp
  (same soname, already loaded), hence torch's thread pool and ``torch.set_num_threads``.
* ``-fno-math-errno -fno-trapping-math`` (CPU): change no computed value (no reassociation,
  no finite-math assumption, unlike ``-ffast-math``) but let GCC vectorise ``sqrt`` and the
  selects of the update.
* ``--fmad=false`` (CUDA): no contraction of ``a * b + c`` into an FMA, so the kernels round
  exactly where the torch reference and the CPU loop round and the three can be compared
  bit for bit. The kernels are memory-bound; the FMA would buy nothing. Never
  ``--use_fast_math``.
"""

# Paths relative to the C++ source root (``csrc/`` in a checkout, ``marthe_ext/_csrc`` in an
# installed package).
CPU_SOURCES = ("bindings_cpu.cpp", "cpu/marthe_cpu.cpp")
CUDA_SOURCES = ("bindings_cuda.cpp", "cuda/marthe_cuda.cu")

CPU_CFLAGS = ("-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math")
CPU_LDFLAGS = ("-fopenmp",)

# Host-compiled files of the CUDA extension (the binding) need no special flag.
CUDA_CFLAGS = ("-O3",)
NVCC_FLAGS = ("-O3", "--fmad=false")

# Architectures built by setup.py when TORCH_CUDA_ARCH_LIST is unset. CUDA 13 cannot target
# sm_70 (V100): building for it needs a CUDA 12 toolkit and TORCH_CUDA_ARCH_LIST="7.0".
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"

# Module names: ``marthe_ext._C_cpu`` when installed, ``JIT_PREFIX + "_C_cpu"`` when JIT-built.
MODULES = {"cpu": "_C_cpu", "cuda": "_C_cuda"}
JIT_PREFIX = "marthe_ext"
