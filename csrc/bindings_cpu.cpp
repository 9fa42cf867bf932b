// pybind11 module ``marthe_ext._C_cpu``: the compiled CPU backend (see ext_backend.py).
#include "bindings_common.h"
#include "cpu/marthe_cpu.h"

namespace marthe {
namespace {

const binding::Target kTarget{"cpu", c10::DeviceType::CPU};

void fused_update(const std::string& dynamics, const binding::TensorList& params,
                  const binding::TensorList& grads,
                  const std::optional<binding::TensorList>& hvps,
                  const binding::TensorList& tangents,
                  const std::vector<binding::TensorList>& state,
                  const std::vector<binding::TensorList>& state_tangents,
                  const at::Tensor& coeffs, double weight_decay, std::optional<double> grad_clip,
                  double momentum, bool nesterov, double beta1, double beta2, double eps) {
  const binding::PackedUpdate pk =
      binding::pack_update(kTarget, dynamics, params, grads, hvps, tangents, state,
                           state_tangents, weight_decay, grad_clip, momentum, nesterov, beta1,
                           beta2, eps);
  binding::check_coeffs(kTarget, coeffs, at::Device(at::kCPU));
  if (params.empty()) {
    return;
  }
  cpu::fused_update(pk.opts, pk.table(), coeffs.data_ptr<double>());
  binding::bump_versions(params, tangents, state, state_tangents);
}

at::Tensor clipped_dot(const binding::TensorList& a, const binding::TensorList& b,
                       const std::optional<binding::TensorList>& a_extra, double a_extra_scale,
                       std::optional<double> clip, bool clip_b) {
  if (a.empty()) {
    TORCH_CHECK_VALUE(b.empty(), "marthe_ext (cpu backend): clipped_dot got 0 tensors in a but ",
                      b.size(), " in b");
    return at::zeros({}, at::TensorOptions().dtype(at::kDouble));
  }
  const binding::PackedDot pk =
      binding::pack_dot(kTarget, a, b, a_extra, a_extra_scale, clip, clip_b);
  const double sum = cpu::clipped_dot(pk.table);
  // A float32 sum beyond float32's range is inf, as the reference's: a cast, where
  // scalar_tensor(sum, kFloat) would throw (a diverging run must skip its step, not crash).
  return at::scalar_tensor(sum, at::TensorOptions().dtype(at::kDouble)).to(pk.acc);
}

at::Tensor all_finite(const binding::TensorList& tensors) {
  const auto options = at::TensorOptions().dtype(at::kBool);
  if (tensors.empty()) {
    return at::ones({}, options);
  }
  const binding::PackedFinite pk = binding::pack_finite(kTarget, tensors);
  return at::scalar_tensor(cpu::all_finite(pk.table), options);
}

}  // namespace
}  // namespace marthe

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "marthe_ext compiled CPU backend: the fused update and its reductions";
  m.def("fused_update", &marthe::fused_update, "In-place fused MARTHE update of one group",
        pybind11::arg("dynamics"), pybind11::arg("params"), pybind11::arg("grads"),
        pybind11::arg("hvps"), pybind11::arg("tangents"), pybind11::arg("state"),
        pybind11::arg("state_tangents"), pybind11::arg("coeffs"),
        pybind11::arg("weight_decay"), pybind11::arg("grad_clip"), pybind11::arg("momentum"),
        pybind11::arg("nesterov"), pybind11::arg("beta1"), pybind11::arg("beta2"),
        pybind11::arg("eps"), pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("clipped_dot", &marthe::clipped_dot,
        "sum_i <clip(a_i + s * a_extra_i), clip?(b_i)> as a 0-dim tensor",
        pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("a_extra"),
        pybind11::arg("a_extra_scale"), pybind11::arg("clip"), pybind11::arg("clip_b"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("all_finite", &marthe::all_finite, "0-dim bool tensor: no NaN/Inf in any tensor",
        pybind11::arg("tensors"), pybind11::call_guard<pybind11::gil_scoped_release>());
  m.attr("COEFF_LAYOUT") = marthe::binding::coeff_layout();
}
