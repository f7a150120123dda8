// Argument checks shared by the CPU and CUDA random_masking kernels.
#pragma once
#include <ATen/ATen.h>

namespace usfmae {

inline void check_random_masking(const at::Tensor& x, const at::Tensor& noise,
                                 int64_t num_keep) {
  TORCH_CHECK(x.dim() == 3, "random_masking: x must be [N, L, D], got shape ", x.sizes());
  TORCH_CHECK(x.is_floating_point(), "random_masking: x must be floating point, got ",
              x.scalar_type());
  TORCH_CHECK(noise.dim() == 2 && noise.size(0) == x.size(0) && noise.size(1) == x.size(1),
              "random_masking: noise must be [N, L] = [", x.size(0), ", ", x.size(1),
              "], got shape ", noise.sizes());
  TORCH_CHECK(noise.is_floating_point(), "random_masking: noise must be floating point, got ",
              noise.scalar_type());
  TORCH_CHECK(x.device() == noise.device(), "random_masking: x is on ", x.device(),
              " but noise is on ", noise.device());
  TORCH_CHECK(x.is_contiguous(), "random_masking: x must be contiguous");
  TORCH_CHECK(noise.is_contiguous(), "random_masking: noise must be contiguous");
  TORCH_CHECK(num_keep >= 0 && num_keep <= x.size(1), "random_masking: num_keep must be in [0, ",
              x.size(1), "], got ", num_keep);
}

inline void check_random_masking_backward(const at::Tensor& grad, const at::Tensor& ids_restore) {
  TORCH_CHECK(grad.dim() == 3, "random_masking_backward: grad_x_masked must be [N, K, D], got ",
              grad.sizes());
  TORCH_CHECK(ids_restore.dim() == 2 && ids_restore.size(0) == grad.size(0),
              "random_masking_backward: ids_restore must be [N, L] with N = ", grad.size(0),
              ", got ", ids_restore.sizes());
  TORCH_CHECK(ids_restore.scalar_type() == at::kLong,
              "random_masking_backward: ids_restore must be int64, got ",
              ids_restore.scalar_type());
  TORCH_CHECK(grad.size(1) <= ids_restore.size(1),
              "random_masking_backward: grad_x_masked has K = ", grad.size(1),
              " rows, more than L = ", ids_restore.size(1));
  TORCH_CHECK(grad.device() == ids_restore.device(), "random_masking_backward: grad_x_masked is on ",
              grad.device(), " but ids_restore is on ", ids_restore.device());
  TORCH_CHECK(grad.is_contiguous() && ids_restore.is_contiguous(),
              "random_masking_backward: grad_x_masked and ids_restore must be contiguous");
}

}  // namespace usfmae
