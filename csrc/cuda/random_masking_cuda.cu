// random_masking on CUDA: one block per row ranks the noise in shared memory by compare-and-count
// (stable: ties go to the lower index, NaN last), writes mask / ids_restore, then gathers the kept
// rows. Backward gathers each row's gradient from its rank (no atomics, deterministic).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../random_masking_checks.h"

namespace usfmae {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxLength = 4096;  // noise + kept ids in 32 KiB of shared memory

template <typename T>
__device__ __forceinline__ bool sorts_before(T a, int64_t ia, T b, int64_t ib) {
  const bool a_nan = isnan(a), b_nan = isnan(b);
  if (a_nan || b_nan) return (!a_nan || ia < ib) && b_nan;  // NaN after numbers, NaNs by index
  return a < b || (a == b && ia < ib);
}

template <typename scalar_t, typename noise_t>
__global__ void random_masking_kernel(const scalar_t* __restrict__ x, const noise_t* __restrict__ noise,
                                      scalar_t* __restrict__ x_masked, scalar_t* __restrict__ mask,
                                      int64_t* __restrict__ ids_restore, int64_t length, int64_t dim,
                                      int64_t num_keep) {
  extern __shared__ unsigned char smem[];
  noise_t* row_noise = reinterpret_cast<noise_t*>(smem);
  int* kept = reinterpret_cast<int*>(smem + kMaxLength * sizeof(noise_t));
  const int64_t row = blockIdx.x;
  for (int64_t i = threadIdx.x; i < length; i += blockDim.x) row_noise[i] = noise[row * length + i];
  __syncthreads();
  for (int64_t i = threadIdx.x; i < length; i += blockDim.x) {
    const noise_t value = row_noise[i];
    int64_t rank = 0;
    for (int64_t j = 0; j < length; ++j) rank += sorts_before(row_noise[j], j, value, i);
    ids_restore[row * length + i] = rank;
    mask[row * length + i] = scalar_t(rank < num_keep ? 0 : 1);
    if (rank < num_keep) kept[rank] = static_cast<int>(i);
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < num_keep * dim; e += blockDim.x) {
    const int64_t rank = e / dim, col = e - rank * dim;
    x_masked[(row * num_keep + rank) * dim + col] = x[(row * length + kept[rank]) * dim + col];
  }
}

template <typename scalar_t>
__global__ void random_masking_backward_kernel(const scalar_t* __restrict__ grad,
                                               const int64_t* __restrict__ ids_restore,
                                               scalar_t* __restrict__ grad_x, int64_t total,
                                               int64_t length, int64_t dim, int64_t num_keep) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t patch_row = e / dim, col = e - patch_row * dim;
    const int64_t rank = ids_restore[patch_row];
    grad_x[e] = (rank >= 0 && rank < num_keep)
                    ? grad[((patch_row / length) * num_keep + rank) * dim + col]
                    : scalar_t(0);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> random_masking_cuda(const at::Tensor& x,
                                                                   const at::Tensor& noise_in,
                                                                   int64_t num_keep) {
  check_random_masking(x, noise_in, num_keep);
  TORCH_CHECK(x.size(1) <= kMaxLength, "random_masking (CUDA): L = ", x.size(1),
              " patches exceeds the kernel's limit of ", kMaxLength, "; use backend 'torch'");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n_rows = x.size(0), length = x.size(1), dim = x.size(2);
  const at::Tensor noise = noise_in.scalar_type() == at::kDouble ? noise_in : noise_in.to(at::kFloat);
  at::Tensor x_masked = at::empty({n_rows, num_keep, dim}, x.options());
  at::Tensor mask = at::empty({n_rows, length}, x.options());
  at::Tensor ids_restore = at::empty({n_rows, length}, x.options().dtype(at::kLong));
  if (n_rows == 0 || length == 0) return {x_masked, mask, ids_restore};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(noise.scalar_type(), "random_masking_cuda_noise", [&] {
    using noise_t = scalar_t;
    const size_t smem = kMaxLength * (sizeof(noise_t) + sizeof(int));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                    "random_masking_cuda", [&] {
      auto kernel = random_masking_kernel<scalar_t, noise_t>;
      if (smem > 48 * 1024) {
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(smem)));
      }
      kernel<<<n_rows, kThreads, smem, stream>>>(
          x.data_ptr<scalar_t>(), noise.data_ptr<noise_t>(), x_masked.data_ptr<scalar_t>(),
          mask.data_ptr<scalar_t>(), ids_restore.data_ptr<int64_t>(), length, dim, num_keep);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {x_masked, mask, ids_restore};
}

at::Tensor random_masking_backward_cuda(const at::Tensor& grad, const at::Tensor& ids_restore) {
  check_random_masking_backward(grad, ids_restore);
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t n_rows = grad.size(0), num_keep = grad.size(1), dim = grad.size(2);
  const int64_t length = ids_restore.size(1);
  at::Tensor grad_x = at::empty({n_rows, length, dim}, grad.options());
  const int64_t total = grad_x.numel();
  if (total == 0) return grad_x;
  const int blocks = static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, 65535));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "random_masking_backward_cuda", [&] {
    random_masking_backward_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), ids_restore.data_ptr<int64_t>(), grad_x.data_ptr<scalar_t>(),
        total, length, dim, num_keep);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(usfmae, CUDA, m) {
  m.impl("random_masking", &random_masking_cuda);
  m.impl("random_masking_backward", &random_masking_backward_cuda);
}

}  // namespace usfmae
