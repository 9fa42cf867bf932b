// The per-element maths of the fused MARTHE update (SPEC section 2, step 4), written once.
//
// Both the CUDA kernels (csrc/cuda) and the CPU loop (csrc/cpu) call these functions, so the
// two compiled paths cannot drift apart. nvcc sees them as __host__ __device__; a plain C++
// compiler sees ordinary inline functions. No torch, ATen or CUDA header is included here.
//
// Every expression follows the operation order of marthe_ext/backends/torch_ref.py (the
// reference every backend is tested against): each product and sum is rounded where the
// reference rounds it and hyperparameters are rounded to the compute type where torch rounds
// a Python scalar. No a*b+c is contracted into an FMA (the CUDA build passes --fmad=false),
// so the CPU loop, the CUDA kernels and the reference agree to the last bit, except where a
// torch kernel is not correctly rounded (torch's CPU sqrt differs by an ulp at times).
#pragma once

#include <cstdint>
#include <cstring>
#include <math.h>
#include <type_traits>

#if defined(__CUDACC__)
#define MARTHE_HD __host__ __device__ __forceinline__
#else
#define MARTHE_HD inline
#endif

namespace marthe {

// Layout of the float64 ``coeffs`` tensor: the same indices as marthe_ext/backends/api.py
// (the bindings export them and the Python backend checks that they agree).
constexpr int kCoeffEta = 0;    // eta_G = eta * lr_scale
constexpr int kCoeffMu = 1;     // mu, the tangent's discount
constexpr int kCoeffScale = 2;  // s_G = lr_scale
constexpr int kCoeffBc1 = 3;    // Adam: 1 - beta1^k
constexpr int kCoeffBc2 = 4;    // Adam: 1 - beta2^k
constexpr int kCoeffOk = 5;     // 0: leave every buffer untouched
constexpr int kNumCoeffs = 6;

enum class Dynamics : int { kSgd = 0, kSgdm = 1, kAdam = 2, kAdamW = 3 };

// Number of optimizer-state buffers (and as many state tangents) of each dynamics.
MARTHE_HD constexpr int state_count(Dynamics d) {
  return d == Dynamics::kSgd ? 0 : (d == Dynamics::kSgdm ? 1 : 2);
}

// Host hyperparameters of one parameter group, plain data so that it can be passed by value
// to a kernel. ``weight_decay`` is the group's weight decay whatever the dynamics: coupled
// (into g and hz) for sgd/sgdm/adam, decoupled for adamw.
struct UpdateOptions {
  int dynamics;  // a Dynamics value
  int nesterov;
  int has_hz;    // hvps given; otherwise hz = 0 exactly
  int do_clip;   // grad_clip is not None
  double weight_decay;
  double clip;
  double momentum;
  double beta1;
  double beta2;
  double eps;
};

// bfloat16 storage (the bits of torch.bfloat16), converted exactly as c10::BFloat16 does.
struct bf16 {
  uint16_t bits;
};

MARTHE_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

MARTHE_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

// Round to nearest even; NaN becomes the canonical quiet NaN (c10's round_to_nearest_even).
// Written as a select rather than an early return so that CPU loops over it vectorise.
MARTHE_HD bf16 float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return bf16{static_cast<uint16_t>(f != f ? 0x7FC0u : rounded)};
}

// float16 storage (torch.float16): only checked for finiteness, never computed with.
struct f16 {
  uint16_t bits;
};

// Conversions between storage types and the compute type T.
template <typename T>
MARTHE_HD T to_compute(T x) {
  return x;
}
template <typename T>
MARTHE_HD T to_compute(bf16 x) {
  return static_cast<T>(bits_to_float(static_cast<uint32_t>(x.bits) << 16));
}
template <typename S, typename T>
MARTHE_HD S to_storage(T x) {
  if constexpr (std::is_same<S, bf16>::value) {
    return float_to_bf16(static_cast<float>(x));
  } else {
    return static_cast<S>(x);
  }
}

MARTHE_HD float mt_sqrt(float x) { return sqrtf(x); }
MARTHE_HD double mt_sqrt(double x) { return sqrt(x); }
MARTHE_HD float mt_abs(float x) { return fabsf(x); }
MARTHE_HD double mt_abs(double x) { return fabs(x); }

// clamp(x, -c, c) that propagates NaN, like torch.clamp_max followed by torch.clamp_min.
template <typename T>
MARTHE_HD T clamp_sym(T x, T c) {
  return x > c ? c : (x < -c ? -c : x);
}

// Finiteness from the exponent bits, for any storage type (NaN and Inf have all exponent
// bits set); integer work only, so a CPU loop over it vectorises.
MARTHE_HD bool is_finite(float x) { return (float_to_bits(x) & 0x7F800000u) != 0x7F800000u; }
MARTHE_HD bool is_finite(bf16 x) { return (x.bits & 0x7F80u) != 0x7F80u; }
MARTHE_HD bool is_finite(f16 x) { return (x.bits & 0x7C00u) != 0x7C00u; }
MARTHE_HD bool is_finite(double x) {
  uint64_t u;
#if defined(__CUDA_ARCH__)
  u = static_cast<uint64_t>(__double_as_longlong(x));
#else
  std::memcpy(&u, &x, sizeof(u));
#endif
  return (u & 0x7FF0000000000000ull) != 0x7FF0000000000000ull;
}

// Everything the update needs besides the buffers and the flags, in the compute type T.
// Built once per launch (CUDA: in every thread, from the device coeffs; CPU: on the host).
template <typename T>
struct StepCoeffs {
  T eta, mu, scale, bc1, sqrt_bc2, two_sqrt_bc2;
  T weight_decay, clip, momentum;
  T beta1, one_minus_beta1, beta2, one_minus_beta2, two_one_minus_beta2, eps;
  T decay;  // adamw: 1 - eta_G wd
};

// The switches of an update that are uniform over a launch. CUDA kernels read them at run
// time (a uniform branch costs nothing there); the CPU loop instantiates them as constants
// (StaticFlags) because GCC does not vectorise a select on a loop-invariant bool.
struct RuntimeFlags {
  bool coupled_wd;  // L2 into g and hz: sgd, sgdm, adam with weight_decay != 0
  bool do_clip;
  bool nesterov;
};

template <bool WD, bool CLIP, bool NESTEROV>
struct StaticFlags {
  static constexpr bool coupled_wd = WD;
  static constexpr bool do_clip = CLIP;
  static constexpr bool nesterov = NESTEROV;
};

MARTHE_HD RuntimeFlags make_flags(const UpdateOptions& o) {
  RuntimeFlags f;
  f.coupled_wd = o.dynamics != static_cast<int>(Dynamics::kAdamW) && o.weight_decay != 0.0;
  f.do_clip = o.do_clip != 0;
  f.nesterov = o.dynamics == static_cast<int>(Dynamics::kSgdm) && o.nesterov != 0;
  return f;
}

// ``coeffs`` points at the kNumCoeffs float64 values (device memory inside a kernel).
// Hyperparameters are rounded to T the way torch rounds a Python float operand; the
// ``1 - beta`` terms are formed in double first, as in Python.
template <typename T>
MARTHE_HD StepCoeffs<T> make_step_coeffs(const double* coeffs, const UpdateOptions& o) {
  StepCoeffs<T> k;
  k.eta = static_cast<T>(coeffs[kCoeffEta]);
  k.mu = static_cast<T>(coeffs[kCoeffMu]);
  k.scale = static_cast<T>(coeffs[kCoeffScale]);
  k.bc1 = static_cast<T>(coeffs[kCoeffBc1]);
  k.sqrt_bc2 = mt_sqrt(static_cast<T>(coeffs[kCoeffBc2]));
  k.two_sqrt_bc2 = T(2) * k.sqrt_bc2;
  k.weight_decay = static_cast<T>(o.weight_decay);
  k.clip = static_cast<T>(o.clip);
  k.momentum = static_cast<T>(o.momentum);
  k.beta1 = static_cast<T>(o.beta1);
  k.one_minus_beta1 = static_cast<T>(1.0 - o.beta1);
  k.beta2 = static_cast<T>(o.beta2);
  k.one_minus_beta2 = static_cast<T>(1.0 - o.beta2);
  k.two_one_minus_beta2 = static_cast<T>(2.0 * (1.0 - o.beta2));
  k.eps = static_cast<T>(o.eps);
  k.decay = T(1) - k.eta * k.weight_decay;
  return k;
}

// One element of every buffer of the update, in the compute type.
template <typename T>
struct Element {
  T w, g, hz, zw;
  T s[2];   // optimizer state: sgdm {v}; adam/adamw {m, v}
  T zs[2];  // the tangents of the state
};

// SPEC steps 1 and 3 on one element: coupled L2 into g and hz, then the elementwise clip
// (hz is masked where g was clipped, then clipped itself). Without HVPs hz is exactly 0.
template <bool HAS_HZ, typename F, typename T>
MARTHE_HD void prepare_gradients(const StepCoeffs<T>& k, const F& f, Element<T>& e) {
  if (f.coupled_wd) {
    e.g = e.g + e.w * k.weight_decay;
    if (HAS_HZ) {
      e.hz = e.hz + e.zw * k.weight_decay;
    }
  }
  if (!HAS_HZ) {
    e.hz = T(0);
  }
  if (f.do_clip) {
    if (HAS_HZ) {
      const bool keep = mt_abs(e.g) <= k.clip;
      e.hz = clamp_sym(keep ? e.hz : T(0), k.clip);
    }
    e.g = clamp_sym(e.g, k.clip);
  }
}

// sgd: w' = w - eta gc;  Zw' = mu (Zw - eta hz) - s gc.
template <bool HAS_HZ, typename T>
MARTHE_HD void sgd_step(const StepCoeffs<T>& k, Element<T>& e) {
  const T inner = HAS_HZ ? e.zw + e.hz * (-k.eta) : e.zw;
  e.zw = inner * k.mu + e.g * (-k.scale);
  e.w = e.w + e.g * (-k.eta);
}

// sgdm (dampening 0): v' = m v + gc; Zv' = mu (m Zv + hz); plain: w' = w - eta v',
// Zw' = mu Zw - eta Zv' - s v'; nesterov: d = gc + m v', w' = w - eta d,
// Zw' = mu (Zw - eta (hz + m (m Zv + hz))) - s d.
template <bool HAS_HZ, typename F, typename T>
MARTHE_HD void sgdm_step(const StepCoeffs<T>& k, const F& f, Element<T>& e) {
  const T m = k.momentum;
  const T v_new = e.g + e.s[0] * m;
  const T mzv_hz = HAS_HZ ? e.hz + e.zs[0] * m : e.zs[0] * m;  // m Zv + hz
  const T zv_new = mzv_hz * k.mu;
  T dir;
  T zw_new;
  if (f.nesterov) {
    dir = e.g + v_new * m;
    const T d_tan = HAS_HZ ? mzv_hz * m + e.hz : mzv_hz * m;
    zw_new = (e.zw + d_tan * (-k.eta)) * k.mu + dir * (-k.scale);
  } else {
    dir = v_new;
    zw_new = (e.zw * k.mu + zv_new * (-k.eta)) + v_new * (-k.scale);
  }
  e.w = e.w + dir * (-k.eta);
  e.zw = zw_new;
  e.s[0] = v_new;
  e.zs[0] = zv_new;
}

// adam / adamw (torch.optim semantics, eps outside the sqrt) and their exact tangents:
// u = (m'/bc1) / (sqrt(v')/sqrt(bc2) + eps); du from dm = b1 Zm + (1-b1) hz and
// dv = b2 Zv + 2 (1-b2) gc hz, the sqrt term taken as 0 where v' = 0.
template <bool DECOUPLED, bool HAS_HZ, typename T>
MARTHE_HD void adam_step(const StepCoeffs<T>& k, Element<T>& e) {
  const T m_new = e.s[0] * k.beta1 + e.g * k.one_minus_beta1;
  const T v_new = e.s[1] * k.beta2 + (e.g * e.g) * k.one_minus_beta2;
  const T sv = mt_sqrt(v_new);
  const T den = sv / k.sqrt_bc2 + k.eps;
  const T m_hat = m_new / k.bc1;
  const T u = m_hat / den;
  T dm = e.zs[0] * k.beta1;
  T dv = e.zs[1] * k.beta2;
  if (HAS_HZ) {
    dm = dm + e.hz * k.one_minus_beta1;
    dv = dv + (e.g * e.hz) * k.two_one_minus_beta2;
  }
  const T du_m = dm / (den * k.bc1);
  const T dsq = sv > T(0) ? dv / (k.two_sqrt_bc2 * sv) : T(0);
  const T du = du_m - (m_hat / (den * den)) * dsq;
  if (DECOUPLED) {
    const T b_term = u + e.w * k.weight_decay;  // d w' / d eta_G = -(wd w + u)
    e.zw = (e.zw * k.decay + du * (-k.eta)) * k.mu + b_term * (-k.scale);
    e.w = e.w * k.decay + u * (-k.eta);
  } else {
    e.zw = (e.zw + du * (-k.eta)) * k.mu + u * (-k.scale);
    e.w = e.w + u * (-k.eta);
  }
  e.s[0] = m_new;
  e.s[1] = v_new;
  e.zs[0] = dm * k.mu;
  e.zs[1] = dv * k.mu;
}

// The whole per-element update: the one entry point of both compiled backends.
// F is RuntimeFlags or a StaticFlags instantiation.
template <Dynamics D, bool HAS_HZ, typename F, typename T>
MARTHE_HD void step_element(const StepCoeffs<T>& k, const F& f, Element<T>& e) {
  prepare_gradients<HAS_HZ>(k, f, e);
  if constexpr (D == Dynamics::kSgd) {
    sgd_step<HAS_HZ>(k, e);
  } else if constexpr (D == Dynamics::kSgdm) {
    sgdm_step<HAS_HZ>(k, f, e);
  } else {
    adam_step<D == Dynamics::kAdamW, HAS_HZ>(k, e);
  }
}

// Switches of clipped_dot, uniform over a call (runtime on CUDA, constants on the CPU).
struct DotFlags {
  bool has_extra;  // a + extra_scale * extra
  bool do_clip;
  bool clip_b;     // clip b too (only with do_clip)
};

template <bool EXTRA, bool CLIP, bool CLIP_B>
struct StaticDotFlags {
  static constexpr bool has_extra = EXTRA;
  static constexpr bool do_clip = CLIP;
  static constexpr bool clip_b = CLIP_B;
};

// One term of clipped_dot: clip(a + scale * extra) * clip?(b), in the accumulation type A
// (the reference converts every operand to A first, then adds, clips and multiplies).
template <typename A, typename F>
MARTHE_HD A clipped_product(A a, A b, A extra, A extra_scale, A clip, const F& f) {
  A x = f.has_extra ? a + extra * extra_scale : a;
  A y = b;
  if (f.do_clip) {
    x = clamp_sym(x, clip);
    if (f.clip_b) {
      y = clamp_sym(y, clip);
    }
  }
  return x * y;
}

}  // namespace marthe
