// The CUDA launcher: multi-tensor kernels for the fused update and the two reductions.
//
// No torch, ATen or c10 header: tensors arrive as raw device pointers and the stream as an
// integer (see marthe_cuda.h), so this file compiles with a bare nvcc. The kernels only
// forward their block and thread indices to the bodies of multi_tensor.cuh, which call the
// per-element maths of marthe_math.h (shared with the CPU loop). Nothing here waits for the
// device: coeffs (eta, mu, the ok flag, ...) are read by the kernels from device memory.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "marthe_cuda.h"
#include "multi_tensor.cuh"

namespace marthe {
namespace cuda {
namespace {

using mt::DotChunks;
using mt::FiniteChunks;
using mt::kChunk;
using mt::kThreads;
using mt::UpdateChunks;

static_assert(sizeof(UpdateChunks) + sizeof(UpdateOptions) + sizeof(void*) <= 4000,
              "update kernel arguments exceed 4 KiB");
static_assert(sizeof(DotChunks) + sizeof(mt::DotArgs) + 2 * sizeof(void*) <= 4000,
              "dot kernel arguments exceed 4 KiB");
static_assert(sizeof(FiniteChunks) + sizeof(void*) <= 4000,
              "all_finite kernel arguments exceed 4 KiB");

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("marthe_ext cuda: ") + what + ": " +
                             cudaGetErrorString(err));
  }
}

// Makes ``device`` current for the launches and restores the caller's device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) {
      check(cudaSetDevice(device), "cudaSetDevice");
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_) {
      cudaSetDevice(previous_);
    }
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

cudaStream_t as_stream(std::intptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// Sum over the block, in a fixed order; the result is valid in thread 0.
__device__ double block_sum(double v) {
  __shared__ double warp_sums[kThreads / 32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  if (lane == 0) {
    warp_sums[warp] = v;
  }
  __syncthreads();
  v = 0.0;
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / 32) ? warp_sums[lane] : 0.0;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      v += __shfl_down_sync(0xffffffffu, v, offset);
    }
  }
  return v;
}

template <Dynamics D, bool HAS_HZ, typename P, typename T>
__global__ void __launch_bounds__(kThreads)
    update_kernel(const UpdateChunks tab, const UpdateOptions opts, const double* coeffs) {
  mt::update_block<D, HAS_HZ, P, T>(tab, opts, coeffs, kChunk, blockIdx.x, threadIdx.x,
                                    blockDim.x);
}

template <typename A, typename TA, typename TB>
__global__ void __launch_bounds__(kThreads)
    dot_kernel(const DotChunks tab, const mt::DotArgs args, double* partials,
               int64_t first_block) {
  const double v = block_sum(
      mt::dot_thread<A, TA, TB>(tab, args, kChunk, blockIdx.x, threadIdx.x, blockDim.x));
  if (threadIdx.x == 0) {
    partials[first_block + blockIdx.x] = v;
  }
}

// One block adds the per-block partials of dot_kernel, always in the same order.
template <typename Out>
__global__ void __launch_bounds__(kThreads)
    sum_partials_kernel(const double* partials, int64_t n, Out* out) {
  double v = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    v += partials[i];
  }
  v = block_sum(v);
  if (threadIdx.x == 0) {
    *out = static_cast<Out>(v);
  }
}

template <typename S>
__global__ void __launch_bounds__(kThreads) finite_kernel(const FiniteChunks tab, uint8_t* out) {
  if (!mt::finite_thread<S>(tab, kChunk, blockIdx.x, threadIdx.x, blockDim.x)) {
    *out = 0;  // every writer writes the same value: the race is benign
  }
}

template <Dynamics D, bool HAS_HZ, typename P, typename T>
void launch_update(const UpdateOptions& opts, const UpdateTable& t, const double* coeffs,
                   cudaStream_t stream) {
  mt::plan_chunks<UpdateChunks>(t.ptrs, t.numel, t.n, kChunk,
                                [&](const UpdateChunks& tab, int n_blocks, int64_t) {
                                  update_kernel<D, HAS_HZ, P, T>
                                      <<<n_blocks, kThreads, 0, stream>>>(tab, opts, coeffs);
                                });
}

template <Dynamics D, typename P, typename T>
void launch_update_hz(const UpdateOptions& opts, const UpdateTable& t, const double* coeffs,
                      cudaStream_t stream) {
  if (opts.has_hz) {
    launch_update<D, true, P, T>(opts, t, coeffs, stream);
  } else {
    launch_update<D, false, P, T>(opts, t, coeffs, stream);
  }
}

template <typename P, typename T>
void launch_update_typed(const UpdateOptions& opts, const UpdateTable& t, const double* coeffs,
                         cudaStream_t stream) {
  switch (static_cast<Dynamics>(opts.dynamics)) {
    case Dynamics::kSgd:
      return launch_update_hz<Dynamics::kSgd, P, T>(opts, t, coeffs, stream);
    case Dynamics::kSgdm:
      return launch_update_hz<Dynamics::kSgdm, P, T>(opts, t, coeffs, stream);
    case Dynamics::kAdam:
      return launch_update_hz<Dynamics::kAdam, P, T>(opts, t, coeffs, stream);
    case Dynamics::kAdamW:
      return launch_update_hz<Dynamics::kAdamW, P, T>(opts, t, coeffs, stream);
  }
  throw std::invalid_argument("marthe_ext cuda: unknown dynamics id");
}

template <typename A, typename TA, typename TB>
void launch_dot(const DotTable& d, const std::vector<const void*>& rows, double* workspace,
                void* out, cudaStream_t stream) {
  const mt::DotArgs args{d.extra_scale, d.clip,
                         DotFlags{d.extra != nullptr, d.do_clip != 0, d.clip_b != 0}};
  mt::plan_chunks<DotChunks>(
      rows.data(), d.numel, d.n, kChunk,
      [&](const DotChunks& tab, int n_blocks, int64_t first_block) {
        dot_kernel<A, TA, TB><<<n_blocks, kThreads, 0, stream>>>(tab, args, workspace,
                                                                 first_block);
      });
  const int64_t total = mt::count_chunks(d.numel, d.n, kChunk);
  sum_partials_kernel<A><<<1, kThreads, 0, stream>>>(workspace, total, static_cast<A*>(out));
}

template <typename S>
void launch_finite(const FiniteTable& t, DType dtype, uint8_t* out, cudaStream_t stream) {
  std::vector<const void*> rows;
  std::vector<int64_t> numel;
  for (int64_t i = 0; i < t.n; ++i) {
    if (t.dtypes[i] == dtype) {
      rows.push_back(t.ptrs[i]);
      numel.push_back(t.numel[i]);
    }
  }
  if (rows.empty()) {
    return;
  }
  mt::plan_chunks<FiniteChunks>(rows.data(), numel.data(), static_cast<int64_t>(numel.size()),
                                kChunk, [&](const FiniteChunks& tab, int n_blocks, int64_t) {
                                  finite_kernel<S><<<n_blocks, kThreads, 0, stream>>>(tab, out);
                                });
}

}  // namespace

void fused_update(const UpdateOptions& opts, const UpdateTable& table, const double* coeffs,
                  int device, std::intptr_t stream) {
  if (table.n == 0) {
    return;
  }
  DeviceGuard guard(device);
  const cudaStream_t s = as_stream(stream);
  const DType p = table.param_dtype;
  const DType st = table.state_dtype;
  if (p == DType::kFloat32 && st == DType::kFloat32) {
    launch_update_typed<float, float>(opts, table, coeffs, s);
  } else if (p == DType::kBFloat16 && st == DType::kFloat32) {
    launch_update_typed<bf16, float>(opts, table, coeffs, s);
  } else if (p == DType::kFloat64 && st == DType::kFloat64) {
    launch_update_typed<double, double>(opts, table, coeffs, s);
  } else {
    throw std::invalid_argument("marthe_ext cuda: unsupported (param, state) dtype pair");
  }
  check(cudaGetLastError(), "fused_update launch");
}

int64_t dot_workspace(const int64_t* numel, int64_t n) {
  return mt::count_chunks(numel, n, kChunk);
}

void clipped_dot(const DotTable& table, double* workspace, void* out, int device,
                 std::intptr_t stream) {
  DeviceGuard guard(device);
  const cudaStream_t s = as_stream(stream);
  const int64_t n = table.n;
  std::vector<const void*> rows(3 * n, nullptr);
  for (int64_t i = 0; i < n; ++i) {
    rows[i] = table.a[i];
    rows[n + i] = table.b[i];
    rows[2 * n + i] = table.extra != nullptr ? table.extra[i] : nullptr;
  }
  const DType a = table.a_dtype;
  const DType b = table.b_dtype;
  if (a == DType::kFloat64 && b == DType::kFloat64) {
    launch_dot<double, double, double>(table, rows, workspace, out, s);
  } else if (a == DType::kFloat32 && b == DType::kFloat32) {
    launch_dot<float, float, float>(table, rows, workspace, out, s);
  } else if (a == DType::kFloat32 && b == DType::kBFloat16) {
    launch_dot<float, float, bf16>(table, rows, workspace, out, s);
  } else if (a == DType::kBFloat16 && b == DType::kFloat32) {
    launch_dot<float, bf16, float>(table, rows, workspace, out, s);
  } else if (a == DType::kBFloat16 && b == DType::kBFloat16) {
    launch_dot<float, bf16, bf16>(table, rows, workspace, out, s);
  } else {
    throw std::invalid_argument("marthe_ext cuda: unsupported dtypes for clipped_dot");
  }
  check(cudaGetLastError(), "clipped_dot launch");
}

void all_finite(const FiniteTable& table, uint8_t* out, int device, std::intptr_t stream) {
  DeviceGuard guard(device);
  const cudaStream_t s = as_stream(stream);
  check(cudaMemsetAsync(out, 1, 1, s), "all_finite init");
  launch_finite<float>(table, DType::kFloat32, out, s);
  launch_finite<double>(table, DType::kFloat64, out, s);
  launch_finite<bf16>(table, DType::kBFloat16, out, s);
  launch_finite<f16>(table, DType::kFloat16, out, s);
  check(cudaGetLastError(), "all_finite launch");
}

}  // namespace cuda
}  // namespace marthe
