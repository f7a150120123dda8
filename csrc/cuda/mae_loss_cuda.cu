// mae_loss_fused on CUDA: three launches, no host synchronisation, no float atomics, the same
// result on every run (every sum has a fixed order for a given shape):
//  1. one block sums the mask, converted to the compute type (the gradient needs 1 / mask.sum()
//     before the main pass starts);
//  2. one warp per patch stages the patch's target, read straight from imgs and put in (p, p, C)
//     order, in shared memory, takes its mean and unbiased variance there (exact two-pass
//     variance at the cost of shared-memory reads only), then streams pred once for the squared
//     error and, with_grad, writes the gradient; each block writes one partial sum of
//     mask * patch loss;
//  3. one block adds the partial sums and divides by the mask sum.
// Compute type: fp32, or fp64 when the loss dtype is fp64 (imgs and pred then go to fp64 first).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../mae_loss_checks.h"

namespace usfmae {
namespace {

constexpr int kReduceThreads = 1024;
constexpr int kMaxWarpsPerBlock = 8;
constexpr int64_t kMaxBlocks = 1024;      // partial sums, added by one block of kReduceThreads
static_assert(kMaxBlocks <= kReduceThreads, "the finishing block reads one partial per thread");
constexpr int64_t kTargetSmem = 48 * 1024;  // the default limit: no opt-in needed on any GPU

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Sum over the block (result in thread 0), in an order fixed by blockDim.
template <typename acc_t>
__device__ acc_t block_sum(acc_t x, acc_t* scratch) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  x = warp_sum(x);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = 0;
  if (warp == 0) {
    if (lane < static_cast<int>(blockDim.x / 32)) x = scratch[lane];
    x = warp_sum(x);
  }
  return x;
}

// mask_acc = mask in the compute type; *mask_sum = its sum. One block.
template <typename mask_t, typename acc_t>
__global__ void __launch_bounds__(kReduceThreads) mask_sum_kernel(
    const mask_t* __restrict__ mask, int64_t n, acc_t* __restrict__ mask_acc,
    acc_t* __restrict__ mask_sum) {
  __shared__ acc_t scratch[32];
  acc_t sum = 0;
  for (int64_t i = threadIdx.x; i < n; i += kReduceThreads) {
    const acc_t m = static_cast<acc_t>(mask[i]);
    mask_acc[i] = m;
    sum += m;
  }
  sum = block_sum(sum, scratch);
  if (threadIdx.x == 0) *mask_sum = sum;
}

struct LossShape {
  int64_t channels, height, width;  // of imgs
  int patch, grid_w;                // patch size, patches per image row
  int64_t length, n_patches;        // patches per image, in the batch
  int patch_dim;                    // p * p * C
};

template <typename img_t, typename pred_t, typename acc_t>
__global__ void __launch_bounds__(32 * kMaxWarpsPerBlock) mae_loss_kernel(
    const img_t* __restrict__ imgs, const pred_t* __restrict__ pred,
    const acc_t* __restrict__ mask, const acc_t* __restrict__ mask_sum, pred_t* __restrict__ grad,
    acc_t* __restrict__ partials, const LossShape s, bool norm_pix_loss) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  acc_t* warp_partials = reinterpret_cast<acc_t*>(smem);
  acc_t* target = warp_partials + kMaxWarpsPerBlock + warp * static_cast<int64_t>(s.patch_dim);
  // Lanes cover `span` columns of `rows` image rows of a patch at a time (coalesced reads).
  const int span = min(s.patch, 32), rows = 32 / span;
  const int lane_row = lane / span, lane_col = lane % span;
  const int64_t plane = s.height * s.width;
  const acc_t dim = static_cast<acc_t>(s.patch_dim);
  acc_t partial = 0;  // lane 0's sum of mask * patch loss, patches in a fixed order
  for (int64_t patch = blockIdx.x * int64_t(warps) + warp; patch < s.n_patches;
       patch += int64_t(gridDim.x) * warps) {
    const int64_t image = patch / s.length, l = patch % s.length;
    const int64_t gy = l / s.grid_w, gx = l % s.grid_w;
    const img_t* src = imgs + image * s.channels * plane + gy * s.patch * s.width + gx * s.patch;
    acc_t sum = 0;
    for (int c = 0; c < s.channels; ++c) {
      for (int i = lane_row; i < s.patch && lane_row < rows; i += rows) {
        for (int j = lane_col; j < s.patch; j += span) {
          const acc_t t = static_cast<acc_t>(src[c * plane + i * s.width + j]);
          target[(i * s.patch + j) * s.channels + c] = t;
          sum += t;
        }
      }
    }
    __syncwarp();  // the target is read below by lanes other than its writers
    acc_t mean = 0, inv_std = 1;
    if (norm_pix_loss) {
      mean = warp_sum(sum) / dim;
      acc_t squares = 0;
      for (int e = lane; e < s.patch_dim; e += 32) {
        const acc_t d = target[e] - mean;
        squares += d * d;
      }
      // Unbiased variance, eps 1e-6 as fb/mae (a one-element patch gives NaN, as torch.var).
      inv_std = 1 / sqrt(warp_sum(squares) / (dim - 1) + static_cast<acc_t>(1e-6));
    }
    const acc_t m = mask[patch];
    const acc_t grad_scale = grad ? 2 * m / (dim * *mask_sum) : 0;
    const pred_t* row = pred + patch * s.patch_dim;
    acc_t error = 0;
#pragma unroll 4
    for (int e = lane; e < s.patch_dim; e += 32) {
      const acc_t diff = static_cast<acc_t>(row[e]) - (target[e] - mean) * inv_std;
      error += diff * diff;
      if (grad) grad[patch * s.patch_dim + e] = static_cast<pred_t>(diff * grad_scale);
    }
    error = warp_sum(error);
    if (lane == 0) partial += m * (error / dim);
    __syncwarp();  // every lane is done with the target before the next patch overwrites it
  }
  if (lane == 0) warp_partials[warp] = partial;
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t block = 0;
    for (int w = 0; w < warps; ++w) block += warp_partials[w];
    partials[blockIdx.x] = block;
  }
}

template <typename acc_t, typename out_t>
__global__ void __launch_bounds__(kReduceThreads) mae_loss_finish_kernel(
    const acc_t* __restrict__ partials, int n, const acc_t* __restrict__ mask_sum,
    out_t* __restrict__ loss) {
  __shared__ acc_t scratch[32];
  acc_t sum = threadIdx.x < n ? partials[threadIdx.x] : acc_t(0);
  sum = block_sum(sum, scratch);
  if (threadIdx.x == 0) *loss = static_cast<out_t>(sum / *mask_sum);
}

// Calls f(value of type T) for T in float, half, bfloat16 (dtype t).
template <typename F>
void dispatch_float_half_bfloat16(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f(float());
    case at::kHalf: return f(c10::Half());
    default: TORCH_INTERNAL_ASSERT(t == at::kBFloat16); return f(c10::BFloat16());
  }
}

template <typename img_t, typename pred_t, typename acc_t>
void launch_mae_loss(const at::Tensor& imgs, const at::Tensor& pred, const at::Tensor& mask,
                     int64_t patch_size, bool norm_pix_loss, const at::Tensor& loss,
                     const at::Tensor& grad) {
  const int64_t target_bytes = pred.size(2) * static_cast<int64_t>(sizeof(acc_t));
  const int64_t partials_bytes = kMaxWarpsPerBlock * sizeof(acc_t);
  TORCH_CHECK(target_bytes + partials_bytes <= kTargetSmem, "mae_loss_fused (CUDA): a patch of ",
              pred.size(2), " values (pred) exceeds the kernel's shared-memory limit; use "
              "backend 'torch'");
  const int64_t n = imgs.size(0), c = imgs.size(1), h = imgs.size(2), w = imgs.size(3);
  const LossShape s{c, h, w, static_cast<int>(patch_size), static_cast<int>(w / patch_size),
                    pred.size(1), n * pred.size(1), static_cast<int>(pred.size(2))};
  const int warps = static_cast<int>(std::min<int64_t>(
      kMaxWarpsPerBlock, (kTargetSmem - partials_bytes) / std::max<int64_t>(target_bytes, 1)));
  const int64_t blocks = std::min(kMaxBlocks, (s.n_patches + warps - 1) / warps);
  // Scratch: mask sum, partial sums, mask in the compute type.
  at::Tensor scratch = at::empty({1 + blocks + s.n_patches}, pred.options().dtype(
      c10::CppTypeToScalarType<acc_t>::value));
  acc_t* mask_sum = scratch.data_ptr<acc_t>();
  acc_t* partials = mask_sum + 1;
  acc_t* mask_acc = partials + blocks;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mask.scalar_type(), "mae_loss_mask",
                                  [&] {
    mask_sum_kernel<scalar_t, acc_t><<<1, kReduceThreads, 0, stream>>>(
        mask.data_ptr<scalar_t>(), s.n_patches, mask_acc, mask_sum);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (blocks > 0) {
    mae_loss_kernel<img_t, pred_t, acc_t>
        <<<blocks, 32 * warps, partials_bytes + warps * target_bytes, stream>>>(
            imgs.data_ptr<img_t>(), pred.data_ptr<pred_t>(), mask_acc, mask_sum,
            grad.defined() ? grad.data_ptr<pred_t>() : nullptr, partials, s, norm_pix_loss);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, loss.scalar_type(), "mae_loss_out",
                                  [&] {
    mae_loss_finish_kernel<acc_t, scalar_t><<<1, kReduceThreads, 0, stream>>>(
        partials, static_cast<int>(blocks), mask_sum, loss.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> mae_loss_fused_cuda(const at::Tensor& imgs_in,
                                                       const at::Tensor& pred_in,
                                                       const at::Tensor& mask, int64_t patch_size,
                                                       bool norm_pix_loss, bool with_grad) {
  check_mae_loss(imgs_in, pred_in, mask, patch_size);
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const at::ScalarType loss_dtype =
      at::promote_types(at::promote_types(imgs_in.scalar_type(), pred_in.scalar_type()),
                        mask.scalar_type());
  const bool fp64 = loss_dtype == at::kDouble;
  // fp64 is for checking, not speed: one fp64 instantiation instead of one per dtype pair.
  const at::Tensor imgs = fp64 ? imgs_in.to(at::kDouble) : imgs_in;
  const at::Tensor pred = fp64 ? pred_in.to(at::kDouble) : pred_in;
  at::Tensor loss = at::empty({}, pred.options().dtype(loss_dtype));
  at::Tensor grad = with_grad ? at::empty_like(pred) : at::Tensor();
  if (fp64) {
    launch_mae_loss<double, double, double>(imgs, pred, mask, patch_size, norm_pix_loss, loss,
                                            grad);
  } else {
    dispatch_float_half_bfloat16(imgs.scalar_type(), [&](auto img) {
      dispatch_float_half_bfloat16(pred.scalar_type(), [&](auto prd) {
        launch_mae_loss<decltype(img), decltype(prd), float>(imgs, pred, mask, patch_size,
                                                             norm_pix_loss, loss, grad);
      });
    });
  }
  if (!with_grad) return {loss, at::empty({0}, pred_in.options())};
  // The gradient is in pred's dtype (only when imgs or mask alone was fp64 does this convert).
  return {loss, grad.to(pred_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(usfmae, CUDA, m) { m.impl("mae_loss_fused", &mae_loss_fused_cuda); }

}  // namespace usfmae
