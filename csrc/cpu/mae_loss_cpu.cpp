// mae_loss_fused on the CPU: one pass per patch builds its target in a small per-thread buffer
// (never the whole target tensor), normalises it, and accumulates the squared error against pred
// (writing d loss / d pred in the same pass). Patches are split into fixed chunks whose partial
// sums are added in chunk order, so the loss does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../mae_loss_checks.h"

namespace usfmae {
namespace {

constexpr int64_t kPatchesPerChunk = 16;
constexpr double kNormEps = 1e-6;

// One mae_loss problem: the tensors (grad is null without with_grad), the patch grid and the
// constants its patches share.
template <typename img_t, typename pred_t, typename acc_t>
struct MaeLoss {
  const img_t* imgs;
  const pred_t* pred;
  const acc_t* mask;
  pred_t* grad;
  int64_t channels, height, width, patch_size, length, patch_dim;
  bool norm_pix_loss;
  acc_t grad_coeff;  // d loss / d pred = grad_coeff * mask_l * (pred - target)

  // mask_l * mean((pred_l - target_l)^2) of one patch, its target built in t [patch_dim]; writes
  // the patch's gradient when grad is set.
  acc_t patch_loss(int64_t patch, acc_t* t) const {
    const int64_t p = patch_size, dim = patch_dim, grid_width = width / p;
    const int64_t image = patch / length, l = patch % length;
    const int64_t y0 = (l / grid_width) * p, x0 = (l % grid_width) * p;
    // Target pixels in (p, p, C) order: t[(py * p + px) * C + c].
    for (int64_t c = 0; c < channels; ++c) {
      const img_t* plane = imgs + ((image * channels + c) * height + y0) * width + x0;
      for (int64_t py = 0; py < p; ++py) {
        const img_t* src = plane + py * width;
        acc_t* dst = t + py * p * channels + c;
        for (int64_t px = 0; px < p; ++px) dst[px * channels] = static_cast<acc_t>(src[px]);
      }
    }
    acc_t mean = 0, rstd = 1;
    if (norm_pix_loss) {
      acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < dim; ++j) sum += t[j];
      mean = sum / acc_t(dim);
      acc_t squares = 0;
#pragma omp simd reduction(+ : squares)
      for (int64_t j = 0; j < dim; ++j) squares += (t[j] - mean) * (t[j] - mean);
      // Unbiased variance as torch.var: NaN for a single pixel (0 / 0).
      rstd = acc_t(1) / std::sqrt(squares / acc_t(dim - 1) + acc_t(kNormEps));
    }
    const pred_t* row = pred + patch * dim;
    acc_t sse = 0;
#pragma omp simd reduction(+ : sse)
    for (int64_t j = 0; j < dim; ++j) {
      const acc_t diff = static_cast<acc_t>(row[j]) - (t[j] - mean) * rstd;
      sse += diff * diff;
    }
    if (grad != nullptr) {
      const acc_t scale = grad_coeff * mask[patch];
      pred_t* out = grad + patch * dim;
#pragma omp simd
      for (int64_t j = 0; j < dim; ++j) {
        out[j] = static_cast<pred_t>(scale * (static_cast<acc_t>(row[j]) - (t[j] - mean) * rstd));
      }
    }
    return mask[patch] * (sse / acc_t(dim));
  }
};

template <typename img_t, typename pred_t, typename acc_t>
std::tuple<at::Tensor, at::Tensor> mae_loss_typed(const at::Tensor& imgs, const at::Tensor& pred,
                                                  const at::Tensor& mask, int64_t patch_size,
                                                  bool norm_pix_loss, bool with_grad) {
  const at::Tensor weights = mask.to(c10::CppTypeToScalarType<acc_t>::value);
  const acc_t* w = weights.const_data_ptr<acc_t>();
  const int64_t num_patches = weights.numel();
  acc_t mask_sum = 0;
#pragma omp simd reduction(+ : mask_sum)
  for (int64_t i = 0; i < num_patches; ++i) mask_sum += w[i];

  at::Tensor grad = with_grad ? at::empty_like(pred) : at::empty({0}, pred.options());
  const MaeLoss<img_t, pred_t, acc_t> problem{
      imgs.const_data_ptr<img_t>(), pred.const_data_ptr<pred_t>(), w,
      with_grad ? grad.mutable_data_ptr<pred_t>() : nullptr, imgs.size(1), imgs.size(2),
      imgs.size(3), patch_size, pred.size(1), pred.size(2), norm_pix_loss,
      acc_t(2) / (acc_t(pred.size(2)) * mask_sum)};
  // Fixed chunks, each with its own partial sum, added in chunk order below.
  const int64_t num_chunks = (num_patches + kPatchesPerChunk - 1) / kPatchesPerChunk;
  std::vector<acc_t> partials(num_chunks);
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> target(problem.patch_dim);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      acc_t partial = 0;
      const int64_t last = std::min(num_patches, (chunk + 1) * kPatchesPerChunk);
      for (int64_t patch = chunk * kPatchesPerChunk; patch < last; ++patch) {
        partial += problem.patch_loss(patch, target.data());
      }
      partials[chunk] = partial;
    }
  });
  acc_t total = 0;
  for (const acc_t partial : partials) total += partial;
  return {at::scalar_tensor(total / mask_sum, pred.options().dtype(weights.scalar_type())), grad};
}

// Calls fn(scalar_t{}) for a float32, float16 or bfloat16 type.
template <typename Fn>
void dispatch_single_or_half(at::ScalarType type, const Fn& fn) {
  AT_DISPATCH_SWITCH(type, "mae_loss_fused_cpu",
                     AT_DISPATCH_CASE(at::kFloat, [&] { fn(scalar_t{}); })
                     AT_DISPATCH_CASE_REDUCED_FLOATING_TYPES([&] { fn(scalar_t{}); }));
}

std::tuple<at::Tensor, at::Tensor> mae_loss_fused_cpu(const at::Tensor& imgs,
                                                      const at::Tensor& pred,
                                                      const at::Tensor& mask, int64_t patch_size,
                                                      bool norm_pix_loss, bool with_grad) {
  check_mae_loss(imgs, pred, mask, patch_size);
  const at::ScalarType loss_dtype = at::promote_types(
      at::promote_types(imgs.scalar_type(), pred.scalar_type()), mask.scalar_type());

  at::Tensor loss, grad;
  if (at::promote_types(loss_dtype, at::kFloat) == at::kDouble) {
    std::tie(loss, grad) = mae_loss_typed<double, double, double>(
        imgs.to(at::kDouble), pred.to(at::kDouble), mask, patch_size, norm_pix_loss, with_grad);
    grad = grad.to(pred.scalar_type());
  } else {
    // fp32 / fp16 / bf16 images and predictions in any combination, accumulated in fp32.
    dispatch_single_or_half(imgs.scalar_type(), [&](auto img_tag) {
      dispatch_single_or_half(pred.scalar_type(), [&](auto pred_tag) {
        std::tie(loss, grad) = mae_loss_typed<decltype(img_tag), decltype(pred_tag), float>(
            imgs, pred, mask, patch_size, norm_pix_loss, with_grad);
      });
    });
  }
  return {loss.to(loss_dtype), grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(usfmae, CPU, m) {
  m.impl("mae_loss_fused", &mae_loss_fused_cpu);
}

}  // namespace usfmae
