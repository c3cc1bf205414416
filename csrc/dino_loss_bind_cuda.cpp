// Python bindings of the CUDA ops (dinovmf._C_cuda); the kernels live in dino_loss_cuda.cu. Same names
// and signatures as the CPU module dinovmf._C, so dinovmf/_ext.py drives both the same way.
#include <torch/extension.h>

#include <vector>

namespace dinovmf {
std::vector<at::Tensor> ce_forward_cuda(const at::Tensor& logits, const at::Tensor& probs);
at::Tensor ce_backward_cuda(const at::Tensor& logits, const at::Tensor& probs, const at::Tensor& row_lse,
                            const at::Tensor& row_psum, const at::Tensor& grad_out, double scale);
std::vector<at::Tensor> teacher_rows_cuda(const at::Tensor& dots, double temp, int64_t mode,
                                          const c10::optional<at::Tensor>& center,
                                          const c10::optional<at::Tensor>& shift,
                                          const c10::optional<at::Tensor>& weight_norm,
                                          const c10::optional<at::Tensor>& bias, double p, bool write_probs,
                                          bool write_lse);
at::Tensor column_lse_cuda(const at::Tensor& dots, double temp, const at::Tensor& row_shift,
                           const c10::optional<at::Tensor>& weight_norm, const c10::optional<at::Tensor>& bias,
                           double p);
}  // namespace dinovmf

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dinovmf fused DINO-vMF loss ops (CUDA)";
  m.def("ce_forward", &dinovmf::ce_forward_cuda, "DINO cross-entropy forward -> (row_loss, row_lse, row_psum)");
  m.def("ce_backward", &dinovmf::ce_backward_cuda, "DINO cross-entropy backward -> grad of student_logits");
  m.def("teacher_rows", &dinovmf::teacher_rows_cuda, "teacher softmax rows -> (probs, stat, row_lse)");
  m.def("column_lse", &dinovmf::column_lse_cuda, "per-prototype log-sum-exp over rows (Sinkhorn column step)");
}
