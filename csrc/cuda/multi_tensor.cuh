// Multi-tensor launches (apex's layout): many tensors' addresses and sizes travel in the
// kernel arguments, each thread block works on one fixed-size chunk of one tensor, and a
// new launch starts only when the table of tensors or of blocks is full. The number of
// launches per call is at most ceil(chunks / MAX_BLOCKS) + ceil(tensors / MAX_TENSORS).
//
// Everything here is plain C++ or __host__ __device__: the host planner and the per-block
// bodies. The kernels in marthe_cuda.cu only forward blockIdx/threadIdx to these bodies, so
// tests/cuda_emulation.cpp can run the very same code on the CPU, block by block and thread
// by thread, and check it against the torch reference on a machine without a GPU.
#pragma once

#include <cstdint>
#include <cstring>

#include "../marthe_launch.h"
#include "../marthe_math.h"

// Host compilers (the emulation test) do not know the pragma.
#if defined(__CUDACC__)
#define MARTHE_UNROLL _Pragma("unroll")
#else
#define MARTHE_UNROLL
#endif

namespace marthe {
namespace mt {

// Elements per thread per access: 16-byte loads for float32, 8 for bfloat16, 2 x 16 for
// float64.
constexpr int kIlp = 4;

// The kernel arguments of one launch. ``ptr[row][slot]`` is the data of tensor ``slot`` in
// list ``row``; block b works on chunk ``chunk[b]`` of tensor ``tensor[b]``.
template <int DEPTH, int MAX_TENSORS, int MAX_BLOCKS>
struct ChunkTable {
  static constexpr int kDepth = DEPTH;
  static constexpr int kMaxTensors = MAX_TENSORS;
  static constexpr int kMaxBlocks = MAX_BLOCKS;
  static_assert(MAX_TENSORS <= 256, "tensor slots are stored in a byte");
  void* ptr[DEPTH][MAX_TENSORS];
  int64_t numel[MAX_TENSORS];
  int32_t chunk[MAX_BLOCKS];
  uint8_t tensor[MAX_BLOCKS];
};

// The production configuration (marthe_cuda.cu; the emulation test runs it too).
// 256 threads: the Adam kernel needs up to ~100 registers per thread, so two or three such
// blocks fit on an SM and one launch of 320 blocks is about one wave on an H100/H200.
// Table capacities keep a launch's arguments under the classic 4 KiB limit.
constexpr int kThreads = 256;
constexpr int64_t kChunk = 65536;  // elements per block
static_assert(kChunk % kIlp == 0, "chunks must keep vector alignment");
using UpdateChunks = ChunkTable<kNumUpdateLists, 24, 320>;
using DotChunks = ChunkTable<3, 48, 320>;
using FiniteChunks = ChunkTable<1, 96, 320>;

// Host: packs the non-empty tensors of ``rows`` (Table::kDepth rows of n pointers,
// ``rows[d * n + i]``) into tables and calls ``launch(table, n_blocks, first_block)`` for
// each, ``first_block`` counting the blocks of earlier launches. A tensor whose chunks do
// not all fit stays in slot 0 of the next table.
template <typename Table, typename Launch>
void plan_chunks(const void* const* rows, const int64_t* numel, int64_t n, int64_t chunk_size,
                 Launch&& launch) {
  Table tab;
  std::memset(&tab, 0, sizeof(tab));
  int n_tensors = 0;
  int n_blocks = 0;
  int64_t first_block = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (numel[i] == 0) {
      continue;
    }
    int slot = n_tensors++;
    for (int d = 0; d < Table::kDepth; ++d) {
      tab.ptr[d][slot] = const_cast<void*>(rows[d * n + i]);
    }
    tab.numel[slot] = numel[i];
    const int64_t chunks = (numel[i] + chunk_size - 1) / chunk_size;
    for (int64_t c = 0; c < chunks; ++c) {
      tab.tensor[n_blocks] = static_cast<uint8_t>(slot);
      tab.chunk[n_blocks] = static_cast<int32_t>(c);
      ++n_blocks;
      const bool last_chunk = c == chunks - 1;
      const bool blocks_full = n_blocks == Table::kMaxBlocks;
      const bool tensors_full = n_tensors == Table::kMaxTensors && last_chunk;
      if (blocks_full || tensors_full) {
        launch(tab, n_blocks, first_block);
        first_block += n_blocks;
        n_blocks = 0;
        if (last_chunk) {
          n_tensors = 0;
        } else {
          for (int d = 0; d < Table::kDepth; ++d) {
            tab.ptr[d][0] = tab.ptr[d][slot];
          }
          tab.numel[0] = tab.numel[slot];
          slot = 0;
          n_tensors = 1;
        }
      }
    }
  }
  if (n_blocks > 0) {
    launch(tab, n_blocks, first_block);
  }
}

// Host: how many blocks (= chunks) plan_chunks launches in all.
inline int64_t count_chunks(const int64_t* numel, int64_t n, int64_t chunk_size) {
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    total += (numel[i] + chunk_size - 1) / chunk_size;
  }
  return total;
}

template <typename S>
MARTHE_HD bool is_aligned(const S* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(S) * kIlp) == 0;
}

template <typename S>
struct alignas(sizeof(S) * kIlp) Vec {
  S v[kIlp];
};

// N consecutive elements; VEC (N == kIlp, aligned address): one vector access.
template <int N, bool VEC, typename S>
MARTHE_HD void load(S (&dst)[N], const S* src) {
  if constexpr (VEC) {
    static_assert(N == kIlp, "vector accesses move kIlp elements");
#if defined(__CUDA_ARCH__)
    const Vec<S> x = *reinterpret_cast<const Vec<S>*>(src);
MARTHE_UNROLL
    for (int j = 0; j < N; ++j) {
      dst[j] = x.v[j];
    }
#else
    std::memcpy(dst, src, sizeof(S) * N);
#endif
  } else {
MARTHE_UNROLL
    for (int j = 0; j < N; ++j) {
      dst[j] = src[j];
    }
  }
}

template <int N, bool VEC, typename S>
MARTHE_HD void store(S* dst, const S (&src)[N]) {
  if constexpr (VEC) {
    static_assert(N == kIlp, "vector accesses move kIlp elements");
#if defined(__CUDA_ARCH__)
    Vec<S> x;
MARTHE_UNROLL
    for (int j = 0; j < N; ++j) {
      x.v[j] = src[j];
    }
    *reinterpret_cast<Vec<S>*>(dst) = x;
#else
    std::memcpy(dst, src, sizeof(S) * N);
#endif
  } else {
MARTHE_UNROLL
    for (int j = 0; j < N; ++j) {
      dst[j] = src[j];
    }
  }
}

// ---- The fused update -------------------------------------------------------------------

// The buffers of one chunk, already offset to its first element.
template <typename P, typename T>
struct UpdatePtrs {
  P* w;
  const P* g;
  const P* h;
  T* zw;
  T* s0;
  T* s1;
  T* z0;
  T* z1;
};

// Elements [i, i + N) of one chunk through the shared per-element maths.
template <int N, bool VEC, Dynamics D, bool HAS_HZ, typename P, typename T, typename F>
MARTHE_HD void update_elements(const UpdatePtrs<P, T>& p, int64_t i, const StepCoeffs<T>& k,
                               const F& f) {
  constexpr int NS = state_count(D);
  P w[N], g[N], h[N];
  T zw[N], s0[N], s1[N], z0[N], z1[N];
  load<N, VEC>(w, p.w + i);
  load<N, VEC>(g, p.g + i);
  if constexpr (HAS_HZ) {
    load<N, VEC>(h, p.h + i);
  }
  load<N, VEC>(zw, p.zw + i);
  if constexpr (NS >= 1) {
    load<N, VEC>(s0, p.s0 + i);
    load<N, VEC>(z0, p.z0 + i);
  }
  if constexpr (NS >= 2) {
    load<N, VEC>(s1, p.s1 + i);
    load<N, VEC>(z1, p.z1 + i);
  }
MARTHE_UNROLL
  for (int j = 0; j < N; ++j) {
    Element<T> e;
    e.w = to_compute<T>(w[j]);
    e.g = to_compute<T>(g[j]);
    if constexpr (HAS_HZ) {
      e.hz = to_compute<T>(h[j]);
    }
    e.zw = zw[j];
    if constexpr (NS >= 1) {
      e.s[0] = s0[j];
      e.zs[0] = z0[j];
    }
    if constexpr (NS >= 2) {
      e.s[1] = s1[j];
      e.zs[1] = z1[j];
    }
    step_element<D, HAS_HZ>(k, f, e);
    w[j] = to_storage<P>(e.w);
    zw[j] = e.zw;
    if constexpr (NS >= 1) {
      s0[j] = e.s[0];
      z0[j] = e.zs[0];
    }
    if constexpr (NS >= 2) {
      s1[j] = e.s[1];
      z1[j] = e.zs[1];
    }
  }
  store<N, VEC>(p.w + i, w);
  store<N, VEC>(p.zw + i, zw);
  if constexpr (NS >= 1) {
    store<N, VEC>(p.s0 + i, s0);
    store<N, VEC>(p.z0 + i, z0);
  }
  if constexpr (NS >= 2) {
    store<N, VEC>(p.s1 + i, s1);
    store<N, VEC>(p.z1 + i, z1);
  }
}

// One thread's share of one block of the fused update. Rows of ``tab`` follow UpdateList.
// ``coeffs`` (device memory) is read here, so the host never waits for the device; with
// ok == 0 nothing is written at all.
template <Dynamics D, bool HAS_HZ, typename P, typename T, typename Table>
MARTHE_HD void update_block(const Table& tab, const UpdateOptions& o, const double* coeffs,
                            int64_t chunk_size, int block, int tid, int nthreads) {
  if (coeffs[kCoeffOk] == 0.0) {
    return;
  }
  constexpr int NS = state_count(D);
  const StepCoeffs<T> k = make_step_coeffs<T>(coeffs, o);
  const RuntimeFlags f = make_flags(o);
  const int slot = tab.tensor[block];
  const int64_t start = static_cast<int64_t>(tab.chunk[block]) * chunk_size;
  const int64_t rest = tab.numel[slot] - start;
  const int64_t n = rest < chunk_size ? rest : chunk_size;
  UpdatePtrs<P, T> p;
  p.w = static_cast<P*>(tab.ptr[kParams][slot]) + start;
  p.g = static_cast<const P*>(tab.ptr[kGrads][slot]) + start;
  p.h = HAS_HZ ? static_cast<const P*>(tab.ptr[kHvps][slot]) + start : nullptr;
  p.zw = static_cast<T*>(tab.ptr[kTangents][slot]) + start;
  p.s0 = NS >= 1 ? static_cast<T*>(tab.ptr[kState0][slot]) + start : nullptr;
  p.z0 = NS >= 1 ? static_cast<T*>(tab.ptr[kStateTangent0][slot]) + start : nullptr;
  p.s1 = NS >= 2 ? static_cast<T*>(tab.ptr[kState1][slot]) + start : nullptr;
  p.z1 = NS >= 2 ? static_cast<T*>(tab.ptr[kStateTangent1][slot]) + start : nullptr;
  // chunk_size is a multiple of kIlp, so a chunk is aligned when its tensor is.
  bool aligned = is_aligned(p.w) && is_aligned(p.g) && is_aligned(p.zw);
  if (HAS_HZ) {
    aligned = aligned && is_aligned(p.h);
  }
  if (NS >= 1) {
    aligned = aligned && is_aligned(p.s0) && is_aligned(p.z0);
  }
  if (NS >= 2) {
    aligned = aligned && is_aligned(p.s1) && is_aligned(p.z1);
  }
  int64_t done = 0;
  if (aligned) {
    const int64_t n_vec = n / kIlp;
    for (int64_t v = tid; v < n_vec; v += nthreads) {
      update_elements<kIlp, true, D, HAS_HZ>(p, v * kIlp, k, f);
    }
    done = n_vec * kIlp;
  }
  for (int64_t i = done + tid; i < n; i += nthreads) {
    update_elements<1, false, D, HAS_HZ>(p, i, k, f);
  }
}

// ---- clipped_dot ------------------------------------------------------------------------

// Rows: a, b, extra (null without extra).
struct DotArgs {
  double extra_scale;
  double clip;
  DotFlags flags;
};

template <int N, bool VEC, typename A, typename TA, typename TB>
MARTHE_HD double dot_elements(const TA* a, const TB* b, const TA* x, int64_t i, A scale,
                              A clip, const DotFlags& f) {
  TA av[N], xv[N];
  TB bv[N];
  load<N, VEC>(av, a + i);
  load<N, VEC>(bv, b + i);
  if (f.has_extra) {
    load<N, VEC>(xv, x + i);
  }
  double acc = 0.0;
MARTHE_UNROLL
  for (int j = 0; j < N; ++j) {
    const A xe = f.has_extra ? to_compute<A>(xv[j]) : A(0);
    acc += static_cast<double>(
        clipped_product<A>(to_compute<A>(av[j]), to_compute<A>(bv[j]), xe, scale, clip, f));
  }
  return acc;
}

// One thread's partial sum (float64) over its share of one block's chunk.
template <typename A, typename TA, typename TB, typename Table>
MARTHE_HD double dot_thread(const Table& tab, const DotArgs& args, int64_t chunk_size, int block,
                            int tid, int nthreads) {
  const int slot = tab.tensor[block];
  const int64_t start = static_cast<int64_t>(tab.chunk[block]) * chunk_size;
  const int64_t rest = tab.numel[slot] - start;
  const int64_t n = rest < chunk_size ? rest : chunk_size;
  const TA* a = static_cast<const TA*>(tab.ptr[0][slot]) + start;
  const TB* b = static_cast<const TB*>(tab.ptr[1][slot]) + start;
  const TA* x = args.flags.has_extra ? static_cast<const TA*>(tab.ptr[2][slot]) + start : nullptr;
  const A scale = static_cast<A>(args.extra_scale);
  const A clip = static_cast<A>(args.clip);
  const bool aligned = is_aligned(a) && is_aligned(b) && (x == nullptr || is_aligned(x));
  double acc = 0.0;
  int64_t done = 0;
  if (aligned) {
    const int64_t n_vec = n / kIlp;
    for (int64_t v = tid; v < n_vec; v += nthreads) {
      acc += dot_elements<kIlp, true, A>(a, b, x, v * kIlp, scale, clip, args.flags);
    }
    done = n_vec * kIlp;
  }
  for (int64_t i = done + tid; i < n; i += nthreads) {
    acc += dot_elements<1, false, A>(a, b, x, i, scale, clip, args.flags);
  }
  return acc;
}

// ---- all_finite -------------------------------------------------------------------------

// Whether one thread's share of one block's chunk is free of NaN and Inf (one list, one
// storage type S per launch).
template <typename S, typename Table>
MARTHE_HD bool finite_thread(const Table& tab, int64_t chunk_size, int block, int tid,
                             int nthreads) {
  const int slot = tab.tensor[block];
  const int64_t start = static_cast<int64_t>(tab.chunk[block]) * chunk_size;
  const int64_t rest = tab.numel[slot] - start;
  const int64_t n = rest < chunk_size ? rest : chunk_size;
  const S* x = static_cast<const S*>(tab.ptr[0][slot]) + start;
  bool ok = true;
  int64_t done = 0;
  if (is_aligned(x)) {
    const int64_t n_vec = n / kIlp;
    for (int64_t v = tid; v < n_vec; v += nthreads) {
      S xv[kIlp];
      load<kIlp, true>(xv, x + v * kIlp);
MARTHE_UNROLL
      for (int j = 0; j < kIlp; ++j) {
        ok = ok && is_finite(xv[j]);
      }
    }
    done = n_vec * kIlp;
  }
  for (int64_t i = done + tid; i < n; i += nthreads) {
    ok = ok && is_finite(x[i]);
  }
  return ok;
}

}  // namespace mt
}  // namespace marthe
