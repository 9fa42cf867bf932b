// Validation and packing shared by the two pybind11 bindings: tensors in, raw pointer
// tables out (marthe_launch.h). Every check happens here, on host metadata only (no device
// synchronisation), with messages that name the list and the index at fault.
#pragma once

// The light subset of <torch/extension.h> that a binding needs (at::Tensor, a few factory
// functions, pybind11 with torch's type casters): a third of the compile time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <string>
#include <vector>

#include "marthe_launch.h"

namespace marthe {
namespace binding {

using TensorList = std::vector<at::Tensor>;

// The error messages' prefix and the device type every tensor must live on.
struct Target {
  const char* backend;  // "cpu" or "cuda"
  c10::DeviceType device_type;
};

inline const char* dtype_name(at::ScalarType t) { return c10::toString(t); }

inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kDouble:
      return DType::kFloat64;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kFloat16;
    default:
      TORCH_CHECK_TYPE(false, "marthe_ext: unsupported dtype ", dtype_name(t));
  }
  return DType::kFloat32;
}

inline Dynamics parse_dynamics(const std::string& name) {
  if (name == "sgd") return Dynamics::kSgd;
  if (name == "sgdm") return Dynamics::kSgdm;
  if (name == "adam") return Dynamics::kAdam;
  if (name == "adamw") return Dynamics::kAdamW;
  TORCH_CHECK_VALUE(false, "marthe_ext: dynamics must be one of sgd, sgdm, adam, adamw; got '",
                    name, "'");
  return Dynamics::kSgd;
}

// Device placement of one tensor against the first tensor of the call (same device type
// as the backend, same index).
inline void check_device(const Target& tg, const at::Tensor& t, const char* list, size_t i,
                         const at::Device& device) {
  TORCH_CHECK_VALUE(t.device().type() == tg.device_type, "marthe_ext (", tg.backend,
                    " backend): ", list, "[", i, "] is on ", t.device(),
                    "; this backend takes ", c10::DeviceTypeName(tg.device_type),
                    " tensors (use backend='torch' or the backend of that device)");
  TORCH_CHECK_VALUE(t.device() == device, "marthe_ext (", tg.backend, " backend): ", list, "[",
                    i, "] is on ", t.device(), " but the first tensor is on ", device,
                    "; a parameter group must live on one device");
}

// Everything the in-place update requires of one tensor of one list: defined, on the
// group's device, of ``dtype``, contiguous and, unless it is a parameter, of the shape of
// its parameter.
inline void check_update_tensor(const Target& tg, const at::Tensor& t, const char* list,
                                size_t i, const at::Tensor& param, const at::Device& device,
                                at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.defined(), "marthe_ext (", tg.backend, " backend): ", list, "[", i,
                    "] is undefined");
  check_device(tg, t, list, i, device);
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "marthe_ext (", tg.backend, " backend): ", list,
                   "[", i, "] has dtype ", dtype_name(t.scalar_type()), ", expected ",
                   dtype_name(dtype), " (params are ", dtype_name(param.scalar_type()),
                   "; bfloat16 params take float32 state and tangents)");
  TORCH_CHECK_VALUE(t.sizes() == param.sizes(), "marthe_ext (", tg.backend, " backend): ", list,
                    "[", i, "] has shape ", t.sizes(), " but params[", i, "] has shape ",
                    param.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), "marthe_ext (", tg.backend, " backend): ", list, "[", i,
                    "] is not contiguous; the fused update works in place on contiguous "
                    "tensors only (use backend='torch' for strided ones)");
}

// The dtype the state and tangents must have for parameters of dtype ``p``.
inline at::ScalarType state_dtype_for(const Target& tg, at::ScalarType p) {
  switch (p) {
    case at::kFloat:
      return at::kFloat;
    case at::kDouble:
      return at::kDouble;
    case at::kBFloat16:
      return at::kFloat;
    default:
      TORCH_CHECK_TYPE(false, "marthe_ext (", tg.backend, " backend): params of dtype ",
                       dtype_name(p), " are not supported (float32, float64, or bfloat16 ",
                       "with float32 state); use backend='torch'");
  }
  return at::kFloat;
}

inline void check_coeffs(const Target& tg, const at::Tensor& coeffs,
                         const at::Device& expected) {
  TORCH_CHECK_TYPE(coeffs.scalar_type() == at::kDouble, "marthe_ext (", tg.backend,
                   " backend): coeffs must be float64, got ",
                   dtype_name(coeffs.scalar_type()));
  TORCH_CHECK_VALUE(coeffs.dim() == 1 && coeffs.numel() == kNumCoeffs && coeffs.is_contiguous(),
                    "marthe_ext (", tg.backend, " backend): coeffs must be a contiguous tensor ",
                    "of shape (", kNumCoeffs, "), got shape ", coeffs.sizes());
  TORCH_CHECK_VALUE(coeffs.device() == expected, "marthe_ext (", tg.backend,
                    " backend): coeffs is on ", coeffs.device(), ", expected ", expected);
}

// The pointer table and options of one fused update. ``ptrs`` and ``numel`` must outlive
// the launch; ``table()`` views them.
struct PackedUpdate {
  UpdateOptions opts{};
  DType param_dtype = DType::kFloat32;
  DType state_dtype = DType::kFloat32;
  std::vector<void*> ptrs;
  std::vector<int64_t> numel;

  UpdateTable table() const {
    return UpdateTable{param_dtype, state_dtype, ptrs.data(), numel.data(),
                       static_cast<int64_t>(numel.size())};
  }
};

inline PackedUpdate pack_update(const Target& tg, const std::string& dynamics,
                                const TensorList& params, const TensorList& grads,
                                const std::optional<TensorList>& hvps,
                                const TensorList& tangents,
                                const std::vector<TensorList>& state,
                                const std::vector<TensorList>& state_tangents,
                                double weight_decay, std::optional<double> grad_clip,
                                double momentum, bool nesterov, double beta1, double beta2,
                                double eps) {
  const Dynamics dyn = parse_dynamics(dynamics);
  const size_t n = params.size();
  const size_t ns = static_cast<size_t>(state_count(dyn));
  const auto check_len = [&](const char* list, size_t len) {
    TORCH_CHECK_VALUE(len == n, "marthe_ext (", tg.backend, " backend): ", list, " has ", len,
                      " tensors but params has ", n);
  };
  check_len("grads", grads.size());
  check_len("tangents", tangents.size());
  if (hvps) {
    check_len("hvps", hvps->size());
  }
  TORCH_CHECK_VALUE(state.size() == ns && state_tangents.size() == ns, "marthe_ext (",
                    tg.backend, " backend): dynamics '", dynamics, "' has ", ns,
                    " state lists and as many state tangent lists; got ", state.size(), " and ",
                    state_tangents.size());
  for (size_t j = 0; j < ns; ++j) {
    check_len("state", state[j].size());
    check_len("state_tangents", state_tangents[j].size());
  }

  PackedUpdate pk;
  pk.opts.dynamics = static_cast<int>(dyn);
  pk.opts.nesterov = nesterov ? 1 : 0;
  pk.opts.has_hz = hvps ? 1 : 0;
  pk.opts.do_clip = grad_clip ? 1 : 0;
  pk.opts.weight_decay = weight_decay;
  pk.opts.clip = grad_clip ? *grad_clip : 0.0;
  pk.opts.momentum = momentum;
  pk.opts.beta1 = beta1;
  pk.opts.beta2 = beta2;
  pk.opts.eps = eps;
  pk.ptrs.assign(kNumUpdateLists * n, nullptr);
  pk.numel.resize(n);
  if (n == 0) {
    return pk;
  }

  TORCH_CHECK_VALUE(params[0].defined(), "marthe_ext (", tg.backend,
                    " backend): params[0] is undefined");
  const at::ScalarType pdt = params[0].scalar_type();
  const at::ScalarType sdt = state_dtype_for(tg, pdt);
  pk.param_dtype = to_dtype(pdt);
  pk.state_dtype = to_dtype(sdt);
  const auto put = [&](int list, size_t i, const at::Tensor& t) {
    pk.ptrs[list * n + i] = t.data_ptr();
  };
  static const char* const kStateNames[2] = {"state[0]", "state[1]"};
  static const char* const kStateTangentNames[2] = {"state_tangents[0]", "state_tangents[1]"};
  const at::Device device = params[0].device();
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_update_tensor(tg, p, "params", i, p, device, pdt);
    check_update_tensor(tg, grads[i], "grads", i, p, device, pdt);
    check_update_tensor(tg, tangents[i], "tangents", i, p, device, sdt);
    put(kParams, i, p);
    put(kGrads, i, grads[i]);
    put(kTangents, i, tangents[i]);
    if (hvps) {
      check_update_tensor(tg, (*hvps)[i], "hvps", i, p, device, pdt);
      put(kHvps, i, (*hvps)[i]);
    }
    for (size_t j = 0; j < ns; ++j) {
      check_update_tensor(tg, state[j][i], kStateNames[j], i, p, device, sdt);
      check_update_tensor(tg, state_tangents[j][i], kStateTangentNames[j], i, p, device, sdt);
      put(kState0 + static_cast<int>(j), i, state[j][i]);
      put(kStateTangent0 + static_cast<int>(j), i, state_tangents[j][i]);
    }
    pk.numel[i] = p.numel();
  }
  return pk;
}

// Records the in-place writes of a fused update in the tensors' version counters, as an
// in-place torch op would, so that autograd rejects a graph that saved a pre-update value.
inline void bump_versions(const TensorList& params, const TensorList& tangents,
                          const std::vector<TensorList>& state,
                          const std::vector<TensorList>& state_tangents) {
  const auto bump = [](const TensorList& ts) {
    for (const at::Tensor& t : ts) {
      t.unsafeGetTensorImpl()->bump_version();
    }
  };
  bump(params);
  bump(tangents);
  for (const TensorList& ts : state) {
    bump(ts);
  }
  for (const TensorList& ts : state_tangents) {
    bump(ts);
  }
}

// Read-only inputs of the reductions may be strided: they are made contiguous here (a copy
// only for the strided ones), and ``keep`` holds those copies alive until the launch.
inline const void* readable(const at::Tensor& t, TensorList& keep) {
  if (t.is_contiguous()) {
    return t.data_ptr();
  }
  keep.push_back(t.contiguous());
  return keep.back().data_ptr();
}

struct PackedDot {
  DotTable table{};
  std::vector<const void*> a, b, extra;
  std::vector<int64_t> numel;
  TensorList keep;
  at::ScalarType acc = at::kFloat;
};

inline at::Device first_device(const TensorList& a) { return a[0].device(); }

// ``a`` must not be empty (the caller returns a zero without packing).
inline PackedDot pack_dot(const Target& tg, const TensorList& a, const TensorList& b,
                          const std::optional<TensorList>& a_extra, double a_extra_scale,
                          std::optional<double> clip, bool clip_b) {
  const size_t n = a.size();
  TORCH_CHECK_VALUE(b.size() == n, "marthe_ext (", tg.backend, " backend): clipped_dot got ", n,
                    " tensors in a but ", b.size(), " in b");
  const bool has_extra = a_extra.has_value() && a_extra_scale != 0.0;
  if (a_extra) {
    TORCH_CHECK_VALUE(a_extra->size() == n, "marthe_ext (", tg.backend,
                      " backend): clipped_dot got ", n, " tensors in a but ", a_extra->size(),
                      " in a_extra");
  }
  const at::Device device = first_device(a);
  const at::ScalarType adt = a[0].scalar_type();
  TORCH_CHECK_TYPE(adt == at::kFloat || adt == at::kDouble || adt == at::kBFloat16,
                   "marthe_ext (", tg.backend, " backend): clipped_dot takes float32, float64 ",
                   "or bfloat16 tensors, got ", dtype_name(adt));
  PackedDot pk;
  pk.acc = adt == at::kDouble ? at::kDouble : at::kFloat;
  pk.a.resize(n);
  pk.b.resize(n);
  pk.numel.resize(n);
  if (has_extra) {
    pk.extra.resize(n);
  }
  const at::ScalarType bdt = b[0].scalar_type();
  for (size_t i = 0; i < n; ++i) {
    check_device(tg, a[i], "a", i, device);
    check_device(tg, b[i], "b", i, device);
    TORCH_CHECK_TYPE(a[i].scalar_type() == adt && b[i].scalar_type() == bdt, "marthe_ext (",
                     tg.backend, " backend): clipped_dot needs one dtype per list; a[", i,
                     "] is ", dtype_name(a[i].scalar_type()), ", b[", i, "] is ",
                     dtype_name(b[i].scalar_type()));
    TORCH_CHECK_VALUE(a[i].numel() == b[i].numel(), "marthe_ext (", tg.backend,
                      " backend): clipped_dot: a[", i, "] has ", a[i].numel(),
                      " elements but b[", i, "] has ", b[i].numel());
    pk.a[i] = readable(a[i], pk.keep);
    pk.b[i] = readable(b[i], pk.keep);
    pk.numel[i] = a[i].numel();
    if (has_extra) {
      const at::Tensor& x = (*a_extra)[i];
      check_device(tg, x, "a_extra", i, device);
      TORCH_CHECK_TYPE(x.scalar_type() == adt, "marthe_ext (", tg.backend,
                       " backend): a_extra[", i, "] has dtype ", dtype_name(x.scalar_type()),
                       " but a has ", dtype_name(adt));
      TORCH_CHECK_VALUE(x.numel() == a[i].numel(), "marthe_ext (", tg.backend,
                        " backend): clipped_dot: a_extra[", i, "] has ", x.numel(),
                        " elements but a[", i, "] has ", a[i].numel());
      pk.extra[i] = readable(x, pk.keep);
    }
  }
  const bool b_ok = adt == at::kDouble ? bdt == at::kDouble
                                       : (bdt == at::kFloat || bdt == at::kBFloat16);
  TORCH_CHECK_TYPE(b_ok, "marthe_ext (", tg.backend, " backend): clipped_dot of ",
                   dtype_name(adt), " a with ", dtype_name(bdt),
                   " b is not supported (float64 pairs with float64; float32 and bfloat16 "
                   "pair with each other)");
  pk.table.a_dtype = to_dtype(adt);
  pk.table.b_dtype = to_dtype(bdt);
  pk.table.a = pk.a.data();
  pk.table.b = pk.b.data();
  pk.table.extra = has_extra ? pk.extra.data() : nullptr;
  pk.table.numel = pk.numel.data();
  pk.table.n = static_cast<int64_t>(n);
  pk.table.extra_scale = a_extra_scale;
  pk.table.do_clip = clip ? 1 : 0;
  pk.table.clip_b = clip && clip_b ? 1 : 0;
  pk.table.clip = clip ? *clip : 0.0;
  return pk;
}

struct PackedFinite {
  FiniteTable table{};
  std::vector<DType> dtypes;
  std::vector<const void*> ptrs;
  std::vector<int64_t> numel;
  TensorList keep;
};

// ``tensors`` must not be empty.
inline PackedFinite pack_finite(const Target& tg, const TensorList& tensors) {
  const size_t n = tensors.size();
  const at::Device device = tensors[0].device();
  PackedFinite pk;
  pk.dtypes.resize(n);
  pk.ptrs.resize(n);
  pk.numel.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& t = tensors[i];
    check_device(tg, t, "tensors", i, device);
    const at::ScalarType s = t.scalar_type();
    TORCH_CHECK_TYPE(s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf,
                     "marthe_ext (", tg.backend, " backend): all_finite takes floating-point ",
                     "tensors (float32, float64, bfloat16, float16), got ", dtype_name(s),
                     " at index ", i);
    pk.dtypes[i] = to_dtype(s);
    pk.ptrs[i] = readable(t, pk.keep);
    pk.numel[i] = t.numel();
  }
  pk.table = FiniteTable{pk.dtypes.data(), pk.ptrs.data(), pk.numel.data(),
                         static_cast<int64_t>(n)};
  return pk;
}

// COEFF_* indices as a dict, so the Python side can check that it agrees with the C++ side.
inline pybind11::dict coeff_layout() {
  pybind11::dict d;
  d["COEFF_ETA"] = kCoeffEta;
  d["COEFF_MU"] = kCoeffMu;
  d["COEFF_SCALE"] = kCoeffScale;
  d["COEFF_BC1"] = kCoeffBc1;
  d["COEFF_BC2"] = kCoeffBc2;
  d["COEFF_OK"] = kCoeffOk;
  d["N_COEFFS"] = kNumCoeffs;
  return d;
}

}  // namespace binding
}  // namespace marthe
