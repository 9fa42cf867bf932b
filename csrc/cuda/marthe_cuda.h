// The CUDA launcher's host interface. Plain C++ (no CUDA or torch type): the binding,
// compiled by the host compiler against torch, calls it with raw device pointers.
//
// Every function enqueues its kernels on ``stream`` (a cudaStream_t passed as an integer,
// from torch.cuda.current_stream().cuda_stream) on device ``device`` and returns without
// waiting for the device. Errors (launch failures) are thrown as std::runtime_error.
#pragma once

#include <cstdint>

#include "../marthe_launch.h"

namespace marthe {
namespace cuda {

// ``coeffs``: kNumCoeffs float64 values in device memory, read by the kernels.
void fused_update(const UpdateOptions& opts, const UpdateTable& table, const double* coeffs,
                  int device, std::intptr_t stream);

// Size (in doubles) of the workspace clipped_dot needs for these tensors.
int64_t dot_workspace(const int64_t* numel, int64_t n);

// Writes the sum to ``out`` (one float64 when a is float64, else one float32), in a fixed
// order (deterministic), accumulated in float64 through ``workspace``.
void clipped_dot(const DotTable& table, double* workspace, void* out, int device,
                 std::intptr_t stream);

// Writes 1 to the byte ``out`` when every element is finite, else 0.
void all_finite(const FiniteTable& table, uint8_t* out, int device, std::intptr_t stream);

}  // namespace cuda
}  // namespace marthe
