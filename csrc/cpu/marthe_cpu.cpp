// The CPU launcher: one pass over memory per update, the per-element maths from
// marthe_math.h, parallel over the threads torch uses (at::parallel_for).
//
// Work is cut into spans of at most kSpan elements of one tensor, so one huge tensor and a
// thousand tiny ones both spread over the threads. The inner loops are plain counted loops
// over __restrict__ pointers with the maths inlined and every switch a template constant,
// which the compiler vectorises. Build flags (marthe_ext/_build_config.py): -fopenmp, which
// at::parallel_for needs to run in parallel at all; -fno-math-errno and -fno-trapping-math,
// which change no computed value but let sqrt and the selects of the maths vectorise.
// Reductions write one partial per span and add the partials in span order, so results do
// not depend on the number of threads.
#include "marthe_cpu.h"

#include <ATen/Parallel.h>

#include <stdexcept>
#include <type_traits>
#include <vector>

namespace marthe {
namespace cpu {
namespace {

constexpr int64_t kSpan = int64_t{1} << 14;
// Below this many elements in all, waking the thread pool costs more than it saves.
constexpr int64_t kMinParallel = int64_t{1} << 16;

struct Span {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

struct Work {
  std::vector<Span> spans;
  int64_t total = 0;
};

Work make_work(const int64_t* numel, int64_t n) {
  Work w;
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t b = 0; b < numel[t]; b += kSpan) {
      w.spans.push_back({t, b, b + kSpan < numel[t] ? b + kSpan : numel[t]});
    }
    w.total += numel[t];
  }
  return w;
}

// Calls f(span, span_index) for every span, in parallel when the work is large enough.
template <typename F>
void for_each_span(const Work& w, const F& f) {
  const int64_t count = static_cast<int64_t>(w.spans.size());
  const int64_t grain = w.total < kMinParallel ? count : 1;
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      f(w.spans[i], i);
    }
  });
}

template <typename S>
S* row(void* const* ptrs, int list, int64_t n, int64_t t) {
  return static_cast<S*>(ptrs[list * n + t]);
}

// Calls f(std::true_type) when ENABLED and b, else f(std::false_type): turns a runtime
// switch into a compile-time one, instantiating the true branch only where it can matter.
template <bool ENABLED, typename F>
void with_flag(bool b, const F& f) {
  if constexpr (ENABLED) {
    if (b) {
      f(std::true_type());
      return;
    }
  }
  f(std::false_type());
}

// P: params/grads/hvps storage type; T: compute, state and tangent type. The buffers are
// __restrict__ parameters (GCC honours restrict on parameters, not on locals): without it the
// loop is versioned on run-time alias checks, and Adam's eight buffers exceed their limit.
template <Dynamics D, bool HAS_HZ, typename Flags, typename P, typename T>
void update_loop(const StepCoeffs<T> k, int64_t begin, int64_t end, P* __restrict__ w,
                 const P* __restrict__ g, const P* __restrict__ h, T* __restrict__ zw,
                 T* __restrict__ s0, T* __restrict__ s1, T* __restrict__ z0,
                 T* __restrict__ z1) {
  constexpr int NS = state_count(D);
  const Flags f{};
  for (int64_t i = begin; i < end; ++i) {
    Element<T> e;
    e.w = to_compute<T>(w[i]);
    e.g = to_compute<T>(g[i]);
    if constexpr (HAS_HZ) {
      e.hz = to_compute<T>(h[i]);
    }
    e.zw = zw[i];
    if constexpr (NS >= 1) {
      e.s[0] = s0[i];
      e.zs[0] = z0[i];
    }
    if constexpr (NS >= 2) {
      e.s[1] = s1[i];
      e.zs[1] = z1[i];
    }
    step_element<D, HAS_HZ>(k, f, e);
    w[i] = to_storage<P>(e.w);
    zw[i] = e.zw;
    if constexpr (NS >= 1) {
      s0[i] = e.s[0];
      z0[i] = e.zs[0];
    }
    if constexpr (NS >= 2) {
      s1[i] = e.s[1];
      z1[i] = e.zs[1];
    }
  }
}

template <Dynamics D, bool HAS_HZ, typename Flags, typename P, typename T>
void update_span(const StepCoeffs<T>& k, void* const* ptrs, int64_t n, const Span& s) {
  constexpr int NS = state_count(D);
  const int64_t t = s.tensor;
  update_loop<D, HAS_HZ, Flags, P, T>(
      k, s.begin, s.end, row<P>(ptrs, kParams, n, t), row<P>(ptrs, kGrads, n, t),
      HAS_HZ ? row<P>(ptrs, kHvps, n, t) : nullptr, row<T>(ptrs, kTangents, n, t),
      NS >= 1 ? row<T>(ptrs, kState0, n, t) : nullptr,
      NS >= 2 ? row<T>(ptrs, kState1, n, t) : nullptr,
      NS >= 1 ? row<T>(ptrs, kStateTangent0, n, t) : nullptr,
      NS >= 2 ? row<T>(ptrs, kStateTangent1, n, t) : nullptr);
}

template <Dynamics D, typename P, typename T>
void run_update(const UpdateOptions& o, const UpdateTable& tab, const double* coeffs) {
  const StepCoeffs<T> k = make_step_coeffs<T>(coeffs, o);
  const RuntimeFlags rf = make_flags(o);
  const Work w = make_work(tab.numel, tab.n);
  with_flag<true>(o.has_hz != 0, [&](auto hz) {
    with_flag<D != Dynamics::kAdamW>(rf.coupled_wd, [&](auto wd) {
      with_flag<true>(rf.do_clip, [&](auto clip) {
        with_flag<D == Dynamics::kSgdm>(rf.nesterov, [&](auto nesterov) {
          using Flags = StaticFlags<decltype(wd)::value, decltype(clip)::value,
                                    decltype(nesterov)::value>;
          for_each_span(w, [&](const Span& s, int64_t) {
            update_span<D, decltype(hz)::value, Flags, P, T>(k, tab.ptrs, tab.n, s);
          });
        });
      });
    });
  });
}

template <typename P, typename T>
void run_update_typed(const UpdateOptions& o, const UpdateTable& tab, const double* coeffs) {
  switch (static_cast<Dynamics>(o.dynamics)) {
    case Dynamics::kSgd:
      return run_update<Dynamics::kSgd, P, T>(o, tab, coeffs);
    case Dynamics::kSgdm:
      return run_update<Dynamics::kSgdm, P, T>(o, tab, coeffs);
    case Dynamics::kAdam:
      return run_update<Dynamics::kAdam, P, T>(o, tab, coeffs);
    case Dynamics::kAdamW:
      return run_update<Dynamics::kAdamW, P, T>(o, tab, coeffs);
  }
  throw std::invalid_argument("marthe_ext cpu: unknown dynamics id");
}

// A: accumulation type of the products; TA (also extra's type) and TB: storage types.
template <typename A, typename TA, typename TB, typename Flags>
double dot_loop(int64_t begin, int64_t end, const TA* __restrict__ a, const TB* __restrict__ b,
                const TA* __restrict__ x, A scale, A clip) {
  const Flags f{};
  double acc = 0.0;
  // The simd reduction lets the compiler keep several partial sums (a fixed order for a
  // given build, so results stay reproducible).
#pragma omp simd reduction(+ : acc)
  for (int64_t i = begin; i < end; ++i) {
    A xe = A(0);
    if constexpr (Flags::has_extra) {
      xe = to_compute<A>(x[i]);
    }
    acc += static_cast<double>(
        clipped_product<A>(to_compute<A>(a[i]), to_compute<A>(b[i]), xe, scale, clip, f));
  }
  return acc;
}

template <typename A, typename TA, typename TB, typename Flags>
double dot_span(const DotTable& d, const Span& s) {
  return dot_loop<A, TA, TB, Flags>(
      s.begin, s.end, static_cast<const TA*>(d.a[s.tensor]),
      static_cast<const TB*>(d.b[s.tensor]),
      Flags::has_extra ? static_cast<const TA*>(d.extra[s.tensor]) : nullptr,
      static_cast<A>(d.extra_scale), static_cast<A>(d.clip));
}

template <typename A, typename TA, typename TB>
double run_dot(const DotTable& d) {
  const Work w = make_work(d.numel, d.n);
  std::vector<double> partial(w.spans.size(), 0.0);
  with_flag<true>(d.extra != nullptr, [&](auto extra) {
    with_flag<true>(d.do_clip != 0, [&](auto clip) {
      with_flag<decltype(clip)::value>(d.clip_b != 0, [&](auto clip_b) {
        using Flags = StaticDotFlags<decltype(extra)::value, decltype(clip)::value,
                                     decltype(clip_b)::value>;
        for_each_span(w, [&](const Span& s, int64_t i) {
          partial[i] = dot_span<A, TA, TB, Flags>(d, s);
        });
      });
    });
  });
  double sum = 0.0;
  for (double p : partial) {
    sum += p;
  }
  return sum;
}

template <typename S>
bool span_finite(const void* p, const Span& s) {
  const S* x = static_cast<const S*>(p);
  const int64_t end = s.end;
  int bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t i = s.begin; i < end; ++i) {
    bad |= is_finite(x[i]) ? 0 : 1;
  }
  return bad == 0;
}

}  // namespace

void fused_update(const UpdateOptions& opts, const UpdateTable& table, const double* coeffs) {
  if (coeffs[kCoeffOk] == 0.0) {
    return;
  }
  const DType p = table.param_dtype;
  const DType s = table.state_dtype;
  if (p == DType::kFloat32 && s == DType::kFloat32) {
    run_update_typed<float, float>(opts, table, coeffs);
  } else if (p == DType::kFloat64 && s == DType::kFloat64) {
    run_update_typed<double, double>(opts, table, coeffs);
  } else if (p == DType::kBFloat16 && s == DType::kFloat32) {
    run_update_typed<bf16, float>(opts, table, coeffs);
  } else {
    throw std::invalid_argument("marthe_ext cpu: unsupported (param, state) dtype pair");
  }
}

double clipped_dot(const DotTable& d) {
  const DType a = d.a_dtype;
  const DType b = d.b_dtype;
  if (a == DType::kFloat64 && b == DType::kFloat64) {
    return run_dot<double, double, double>(d);
  }
  if (a == DType::kFloat32 && b == DType::kFloat32) {
    return run_dot<float, float, float>(d);
  }
  if (a == DType::kFloat32 && b == DType::kBFloat16) {
    return run_dot<float, float, bf16>(d);
  }
  if (a == DType::kBFloat16 && b == DType::kFloat32) {
    return run_dot<float, bf16, float>(d);
  }
  if (a == DType::kBFloat16 && b == DType::kBFloat16) {
    return run_dot<float, bf16, bf16>(d);
  }
  throw std::invalid_argument("marthe_ext cpu: unsupported dtypes for clipped_dot");
}

bool all_finite(const FiniteTable& table) {
  const Work w = make_work(table.numel, table.n);
  std::vector<char> ok(w.spans.size(), 1);
  for_each_span(w, [&](const Span& s, int64_t i) {
    const void* p = table.ptrs[s.tensor];
    switch (table.dtypes[s.tensor]) {
      case DType::kFloat32:
        ok[i] = span_finite<float>(p, s);
        break;
      case DType::kFloat64:
        ok[i] = span_finite<double>(p, s);
        break;
      case DType::kBFloat16:
        ok[i] = span_finite<bf16>(p, s);
        break;
      case DType::kFloat16:
        ok[i] = span_finite<f16>(p, s);
        break;
    }
  });
  for (char c : ok) {
    if (!c) {
      return false;
    }
  }
  return true;
}

}  // namespace cpu
}  // namespace marthe
