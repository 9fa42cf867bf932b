// pybind11 module ``marthe_ext._C_cuda``: the compiled CUDA backend (see ext_backend.py).
//
// Compiled by the host compiler: it validates the tensors, takes their data pointers and
// calls the launcher of cuda/marthe_cuda.cu, which includes no torch header. It includes no
// CUDA header either, so it builds against any torch. ``stream`` is the integer handle of
// torch.cuda.current_stream(device); outputs are allocated with torch's caching allocator on
// the tensors' device, whose current stream is that stream.
#include "bindings_common.h"
#include "cuda/marthe_cuda.h"

namespace marthe {
namespace {

const binding::Target kTarget{"cuda", c10::DeviceType::CUDA};

void fused_update(const std::string& dynamics, const binding::TensorList& params,
                  const binding::TensorList& grads,
                  const std::optional<binding::TensorList>& hvps,
                  const binding::TensorList& tangents,
                  const std::vector<binding::TensorList>& state,
                  const std::vector<binding::TensorList>& state_tangents,
                  const at::Tensor& coeffs, double weight_decay, std::optional<double> grad_clip,
                  double momentum, bool nesterov, double beta1, double beta2, double eps,
                  std::intptr_t stream) {
  const binding::PackedUpdate pk =
      binding::pack_update(kTarget, dynamics, params, grads, hvps, tangents, state,
                           state_tangents, weight_decay, grad_clip, momentum, nesterov, beta1,
                           beta2, eps);
  if (params.empty()) {
    return;
  }
  const at::Device device = params[0].device();
  binding::check_coeffs(kTarget, coeffs, device);
  cuda::fused_update(pk.opts, pk.table(), coeffs.data_ptr<double>(), device.index(), stream);
  binding::bump_versions(params, tangents, state, state_tangents);
}

at::Tensor clipped_dot(const binding::TensorList& a, const binding::TensorList& b,
                       const std::optional<binding::TensorList>& a_extra, double a_extra_scale,
                       std::optional<double> clip, bool clip_b, std::intptr_t stream) {
  if (a.empty()) {
    TORCH_CHECK_VALUE(b.empty(), "marthe_ext (cuda backend): clipped_dot got 0 tensors in a but ",
                      b.size(), " in b");
    return at::zeros({}, at::TensorOptions().dtype(at::kDouble));
  }
  const binding::PackedDot pk =
      binding::pack_dot(kTarget, a, b, a_extra, a_extra_scale, clip, clip_b);
  const at::Device device = a[0].device();
  const int64_t n_partials = cuda::dot_workspace(pk.numel.data(), pk.table.n);
  const at::Tensor workspace =
      at::empty({n_partials}, at::TensorOptions().dtype(at::kDouble).device(device));
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(pk.acc).device(device));
  cuda::clipped_dot(pk.table, workspace.data_ptr<double>(), out.data_ptr(), device.index(),
                    stream);
  return out;
}

at::Tensor all_finite(const binding::TensorList& tensors, std::intptr_t stream) {
  if (tensors.empty()) {
    return at::ones({}, at::TensorOptions().dtype(at::kBool));
  }
  const binding::PackedFinite pk = binding::pack_finite(kTarget, tensors);
  const at::Device device = tensors[0].device();
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(at::kBool).device(device));
  cuda::all_finite(pk.table, static_cast<uint8_t*>(out.data_ptr()), device.index(), stream);
  return out;
}

}  // namespace
}  // namespace marthe

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "marthe_ext compiled CUDA backend: the fused update and its reductions";
  m.def("fused_update", &marthe::fused_update,
        "In-place fused MARTHE update of one group, enqueued on ``stream``",
        pybind11::arg("dynamics"), pybind11::arg("params"), pybind11::arg("grads"),
        pybind11::arg("hvps"), pybind11::arg("tangents"), pybind11::arg("state"),
        pybind11::arg("state_tangents"), pybind11::arg("coeffs"),
        pybind11::arg("weight_decay"), pybind11::arg("grad_clip"), pybind11::arg("momentum"),
        pybind11::arg("nesterov"), pybind11::arg("beta1"), pybind11::arg("beta2"),
        pybind11::arg("eps"), pybind11::arg("stream"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("clipped_dot", &marthe::clipped_dot,
        "sum_i <clip(a_i + s * a_extra_i), clip?(b_i)> as a 0-dim device tensor",
        pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("a_extra"),
        pybind11::arg("a_extra_scale"), pybind11::arg("clip"), pybind11::arg("clip_b"),
        pybind11::arg("stream"), pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("all_finite", &marthe::all_finite, "0-dim bool device tensor: no NaN/Inf anywhere",
        pybind11::arg("tensors"), pybind11::arg("stream"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.attr("COEFF_LAYOUT") = marthe::binding::coeff_layout();
}
