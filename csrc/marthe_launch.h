// The raw-pointer interface between the pybind11 bindings and the two launchers (CPU loop,
// CUDA kernels). Plain C++ only: the CUDA launcher is compiled by nvcc without any torch
// header, so tensors cross this boundary as data pointers and element counts.
#pragma once

#include <cstdint>

#include "marthe_math.h"

namespace marthe {

// Element types of the buffers (what the bindings accept; not every list takes every type).
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// The lists of one fused update, in this order, as rows of a pointer table
// ``ptrs[list * n + i]``. Rows the dynamics does not use (and kHvps without HVPs) are null.
enum UpdateList : int {
  kParams = 0,
  kGrads = 1,
  kHvps = 2,
  kTangents = 3,
  kState0 = 4,          // sgdm: momentum_buffer; adam/adamw: exp_avg
  kState1 = 5,          // adam/adamw: exp_avg_sq
  kStateTangent0 = 6,   // tangent of kState0
  kStateTangent1 = 7,   // tangent of kState1
  kNumUpdateLists = 8,
};

// One fused update of a parameter group: ``n`` tensors, ``numel[i]`` elements each.
// Params, grads and hvps have ``param_dtype``; tangents, state and state tangents have
// ``state_dtype`` (float32 for bfloat16 params, else the params' type).
struct UpdateTable {
  DType param_dtype;
  DType state_dtype;
  void* const* ptrs;  // kNumUpdateLists rows of n pointers
  const int64_t* numel;
  int64_t n;
};

// sum_i <clip(a_i + extra_scale * extra_i), clip?(b_i)>; ``extra`` has a's element type, b
// may have another; the accumulation type is float64 when ``a`` is float64, else float32.
struct DotTable {
  DType a_dtype;
  DType b_dtype;
  const void* const* a;
  const void* const* b;
  const void* const* extra;  // null when there is no extra term
  const int64_t* numel;
  int64_t n;
  double extra_scale;
  int do_clip;
  int clip_b;
  double clip;
};

// Tensors of possibly different element types, checked for NaN/Inf.
struct FiniteTable {
  const DType* dtypes;
  const void* const* ptrs;
  const int64_t* numel;
  int64_t n;
};

}  // namespace marthe
