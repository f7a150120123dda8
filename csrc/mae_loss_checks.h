// Argument checks shared by the CPU and CUDA mae_loss_fused kernels.
#pragma once
#include <ATen/ATen.h>

namespace usfmae {

inline void check_mae_loss(const at::Tensor& imgs, const at::Tensor& pred, const at::Tensor& mask,
                           int64_t patch_size) {
  TORCH_CHECK(imgs.dim() == 4, "mae_loss_fused: imgs must be [N, C, H, W], got shape ",
              imgs.sizes());
  TORCH_CHECK(patch_size > 0, "mae_loss_fused: patch_size must be positive, got ", patch_size);
  const int64_t n = imgs.size(0), channels = imgs.size(1), height = imgs.size(2),
                width = imgs.size(3);
  // patch_size <= H and W also keeps p * p * C from overflowing.
  TORCH_CHECK(height >= patch_size && width >= patch_size && height % patch_size == 0 &&
                  width % patch_size == 0,
              "mae_loss_fused: imgs height and width must be positive multiples of patch_size = ",
              patch_size, ", got ", height, " x ", width);
  const int64_t length = (height / patch_size) * (width / patch_size);
  const int64_t patch_dim = patch_size * patch_size * channels;
  TORCH_CHECK(pred.dim() == 3 && pred.size(0) == n && pred.size(1) == length &&
                  pred.size(2) == patch_dim,
              "mae_loss_fused: pred must be [N, L, p*p*C] = [", n, ", ", length, ", ", patch_dim,
              "], got shape ", pred.sizes());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == n && mask.size(1) == length,
              "mae_loss_fused: mask must be [N, L] = [", n, ", ", length, "], got shape ",
              mask.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"imgs", imgs},
                                {"pred", pred}, {"mask", mask}}) {
    TORCH_CHECK(t.is_floating_point(), "mae_loss_fused: ", name, " must be floating point, got ",
                t.scalar_type());
    TORCH_CHECK(t.device() == imgs.device(), "mae_loss_fused: ", name, " is on ", t.device(),
                " but imgs is on ", imgs.device());
    TORCH_CHECK(t.is_contiguous(), "mae_loss_fused: ", name, " must be contiguous");
  }
}

}  // namespace usfmae
