// Runs the CUDA launcher's logic on the CPU, for tests/test_ext_backend.py: the host planner
// and the per-block bodies of csrc/cuda/multi_tensor.cuh (the code the kernels forward to),
// executed launch by launch, block by block, thread by thread. Device-only parts (the
// kernel wrappers, the warp-shuffle block sum) are not covered; every index computation,
// the chunking over launches, the vector and tail paths and the alignment test are.
//
// Built with the host compiler as a plain shared library (no torch, no CUDA) and called
// through ctypes; errors come back as -1 (or NaN) instead of crossing the C boundary. ``small`` selects tiny table capacities (3 tensors, 5 blocks) so that
// small inputs exercise tensors that straddle launches and full tables.
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/multi_tensor.cuh"

using namespace marthe;

namespace {

using SmallUpdate = mt::ChunkTable<kNumUpdateLists, 3, 5>;
using SmallDot = mt::ChunkTable<3, 3, 5>;
using SmallFinite = mt::ChunkTable<1, 3, 5>;

template <Dynamics D, bool HAS_HZ, typename P, typename T, typename Table>
int64_t run_update(const UpdateOptions& o, const UpdateTable& t, const double* coeffs,
                   int64_t chunk, int nthreads) {
  int64_t launches = 0;
  mt::plan_chunks<Table>(t.ptrs, t.numel, t.n, chunk,
                         [&](const Table& tab, int n_blocks, int64_t) {
                           ++launches;
                           for (int b = 0; b < n_blocks; ++b) {
                             for (int th = 0; th < nthreads; ++th) {
                               mt::update_block<D, HAS_HZ, P, T>(tab, o, coeffs, chunk, b, th,
                                                                 nthreads);
                             }
                           }
                         });
  return launches;
}

template <Dynamics D, typename P, typename T, typename Table>
int64_t run_update_hz(const UpdateOptions& o, const UpdateTable& t, const double* c,
                      int64_t chunk, int nthreads) {
  return o.has_hz ? run_update<D, true, P, T, Table>(o, t, c, chunk, nthreads)
                  : run_update<D, false, P, T, Table>(o, t, c, chunk, nthreads);
}

template <typename P, typename T, typename Table>
int64_t run_update_typed(const UpdateOptions& o, const UpdateTable& t, const double* c,
                         int64_t chunk, int nthreads) {
  switch (static_cast<Dynamics>(o.dynamics)) {
    case Dynamics::kSgd:
      return run_update_hz<Dynamics::kSgd, P, T, Table>(o, t, c, chunk, nthreads);
    case Dynamics::kSgdm:
      return run_update_hz<Dynamics::kSgdm, P, T, Table>(o, t, c, chunk, nthreads);
    case Dynamics::kAdam:
      return run_update_hz<Dynamics::kAdam, P, T, Table>(o, t, c, chunk, nthreads);
    case Dynamics::kAdamW:
      return run_update_hz<Dynamics::kAdamW, P, T, Table>(o, t, c, chunk, nthreads);
  }
  throw std::invalid_argument("unknown dynamics");
}

template <typename Table>
int64_t run_update_any(const UpdateOptions& o, const UpdateTable& t, const double* c,
                       int64_t chunk, int nthreads) {
  if (t.param_dtype == DType::kFloat32) return run_update_typed<float, float, Table>(o, t, c, chunk, nthreads);
  if (t.param_dtype == DType::kFloat64) return run_update_typed<double, double, Table>(o, t, c, chunk, nthreads);
  return run_update_typed<bf16, float, Table>(o, t, c, chunk, nthreads);
}

template <typename A, typename TA, typename TB, typename Table>
double run_dot(const std::vector<const void*>& rows, const int64_t* numel, int64_t n,
               const mt::DotArgs& args, int64_t chunk, int nthreads, int64_t* launches) {
  std::vector<double> partials;
  mt::plan_chunks<Table>(rows.data(), numel, n, chunk,
                         [&](const Table& tab, int n_blocks, int64_t first_block) {
                           ++*launches;
                           if (static_cast<int64_t>(partials.size()) != first_block) {
                             throw std::logic_error("first_block does not count the blocks");
                           }
                           for (int b = 0; b < n_blocks; ++b) {
                             double block = 0.0;
                             for (int th = 0; th < nthreads; ++th) {
                               block += mt::dot_thread<A, TA, TB>(tab, args, chunk, b, th,
                                                                  nthreads);
                             }
                             partials.push_back(block);
                           }
                         });
  if (static_cast<int64_t>(partials.size()) != mt::count_chunks(numel, n, chunk)) {
    throw std::logic_error("count_chunks disagrees with the planner");
  }
  double sum = 0.0;
  for (double p : partials) sum += p;
  return sum;
}

template <typename Table>
double run_dot_any(int a_dtype, int b_dtype, const std::vector<const void*>& rows,
                   const int64_t* numel, int64_t n, const mt::DotArgs& args, int64_t chunk,
                   int nthreads, int64_t* launches) {
  const auto a = static_cast<DType>(a_dtype);
  const auto b = static_cast<DType>(b_dtype);
  if (a == DType::kFloat64) return run_dot<double, double, double, Table>(rows, numel, n, args, chunk, nthreads, launches);
  if (a == DType::kFloat32 && b == DType::kFloat32) return run_dot<float, float, float, Table>(rows, numel, n, args, chunk, nthreads, launches);
  if (a == DType::kFloat32) return run_dot<float, float, bf16, Table>(rows, numel, n, args, chunk, nthreads, launches);
  if (b == DType::kFloat32) return run_dot<float, bf16, float, Table>(rows, numel, n, args, chunk, nthreads, launches);
  return run_dot<float, bf16, bf16, Table>(rows, numel, n, args, chunk, nthreads, launches);
}

template <typename S, typename Table>
bool run_finite(const void* const* ptrs, const int64_t* numel, int64_t n, int64_t chunk,
                int nthreads) {
  bool ok = true;
  mt::plan_chunks<Table>(ptrs, numel, n, chunk, [&](const Table& tab, int n_blocks, int64_t) {
    for (int b = 0; b < n_blocks; ++b) {
      for (int th = 0; th < nthreads; ++th) {
        ok = mt::finite_thread<S>(tab, chunk, b, th, nthreads) && ok;
      }
    }
  });
  return ok;
}

template <typename Table>
bool run_finite_any(int dtype, const void* const* ptrs, const int64_t* numel, int64_t n,
                    int64_t chunk, int nthreads) {
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32: return run_finite<float, Table>(ptrs, numel, n, chunk, nthreads);
    case DType::kFloat64: return run_finite<double, Table>(ptrs, numel, n, chunk, nthreads);
    case DType::kBFloat16: return run_finite<bf16, Table>(ptrs, numel, n, chunk, nthreads);
    case DType::kFloat16: return run_finite<f16, Table>(ptrs, numel, n, chunk, nthreads);
  }
  throw std::invalid_argument("unknown dtype");
}

// Names as torch spells them, so the Python side duplicates no enum value.
Dynamics parse_dynamics(const char* name) {
  const std::string s(name);
  if (s == "sgd") return Dynamics::kSgd;
  if (s == "sgdm") return Dynamics::kSgdm;
  if (s == "adam") return Dynamics::kAdam;
  if (s == "adamw") return Dynamics::kAdamW;
  throw std::invalid_argument("unknown dynamics");
}

int parse_dtype(const char* name) {
  const std::string s(name);
  if (s == "float32") return static_cast<int>(DType::kFloat32);
  if (s == "float64") return static_cast<int>(DType::kFloat64);
  if (s == "bfloat16") return static_cast<int>(DType::kBFloat16);
  if (s == "float16") return static_cast<int>(DType::kFloat16);
  throw std::invalid_argument("unknown dtype");
}

}  // namespace

extern "C" {

// Production capacities and block size unless ``small``; chunk <= 0 means mt::kChunk.
// Returns the number of launches.
int64_t emulate_fused_update(int small, const char* dynamics, int nesterov, int has_hz,
                             int do_clip, double weight_decay, double clip, double momentum,
                             double beta1, double beta2, double eps, const char* param_dtype,
                             const char* state_dtype, void* const* ptrs, const int64_t* numel,
                             int64_t n, const double* coeffs, int64_t chunk,
                             int nthreads) try {
  const UpdateOptions o{static_cast<int>(parse_dynamics(dynamics)), nesterov, has_hz, do_clip,
                        weight_decay, clip, momentum, beta1, beta2, eps};
  const UpdateTable t{static_cast<DType>(parse_dtype(param_dtype)),
                      static_cast<DType>(parse_dtype(state_dtype)), ptrs, numel, n};
  chunk = chunk > 0 ? chunk : mt::kChunk;
  nthreads = nthreads > 0 ? nthreads : mt::kThreads;
  return small ? run_update_any<SmallUpdate>(o, t, coeffs, chunk, nthreads)
               : run_update_any<mt::UpdateChunks>(o, t, coeffs, chunk, nthreads);
} catch (const std::exception&) {
  return -1;
}

double emulate_clipped_dot(int small, const char* a_dtype, const char* b_dtype,
                           const void* const* a, const void* const* b, const void* const* extra,
                           const int64_t* numel, int64_t n, double extra_scale, int do_clip,
                           int clip_b, double clip, int64_t chunk, int nthreads,
                           int64_t* launches) try {
  std::vector<const void*> rows(3 * n, nullptr);
  for (int64_t i = 0; i < n; ++i) {
    rows[i] = a[i];
    rows[n + i] = b[i];
    rows[2 * n + i] = extra ? extra[i] : nullptr;
  }
  const mt::DotArgs args{extra_scale, clip,
                         DotFlags{extra != nullptr, do_clip != 0, clip_b != 0}};
  chunk = chunk > 0 ? chunk : mt::kChunk;
  nthreads = nthreads > 0 ? nthreads : mt::kThreads;
  *launches = 0;
  const int ad = parse_dtype(a_dtype);
  const int bd = parse_dtype(b_dtype);
  return small ? run_dot_any<SmallDot>(ad, bd, rows, numel, n, args, chunk, nthreads, launches)
               : run_dot_any<mt::DotChunks>(ad, bd, rows, numel, n, args, chunk, nthreads,
                                            launches);
} catch (const std::exception&) {
  return std::numeric_limits<double>::quiet_NaN();
}

// One storage type per call (the launcher groups tensors by dtype the same way).
int emulate_all_finite(int small, const char* dtype, const void* const* ptrs,
                       const int64_t* numel, int64_t n, int64_t chunk, int nthreads) try {
  chunk = chunk > 0 ? chunk : mt::kChunk;
  nthreads = nthreads > 0 ? nthreads : mt::kThreads;
  const int d = parse_dtype(dtype);
  return small ? run_finite_any<SmallFinite>(d, ptrs, numel, n, chunk, nthreads)
               : run_finite_any<mt::FiniteChunks>(d, ptrs, numel, n, chunk, nthreads);
} catch (const std::exception&) {
  return -1;
}

// Capacities of the tables (max tensors, max blocks per launch) and the chunk size, for the
// test's bound on the number of launches: ``which`` is "update", "dot" or "finite".
int emulate_capacity(const char* which, int small, int64_t* out) {
  const std::string w(which);
  const auto put = [&](auto table) {
    out[0] = decltype(table)::kMaxTensors;
    out[1] = decltype(table)::kMaxBlocks;
    out[2] = mt::kChunk;
    return 0;
  };
  if (w == "update") return small ? put(SmallUpdate{}) : put(mt::UpdateChunks{});
  if (w == "dot") return small ? put(SmallDot{}) : put(mt::DotChunks{});
  if (w == "finite") return small ? put(SmallFinite{}) : put(mt::FiniteChunks{});
  return -1;
}

}  // extern "C"
