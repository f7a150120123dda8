// random_masking on CUDA in one launch, one block per row of the batch: the row's noise becomes
// order-preserving integer keys in shared memory, every patch counts the patches that sort before
// it, which is its rank (ties to the lower index, NaN after every number, -0 == +0: the stable
// sort of the reference), and the rank gives mask and ids_restore directly; then the block's
// warps copy the kept rows, 16 bytes per lane when the row size and pointers allow. Backward:
// each row of grad_x gathers the gradient row of its rank (no atomics, deterministic). The row
// copies move bytes, whatever the dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "../random_masking_checks.h"

namespace usfmae {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
// Keys (at most 8 bytes) and kept indices (4 bytes) of a row fit the default 48 KiB of shared
// memory; the rank count is quadratic in L, which stays cheap up to this length.
constexpr int64_t kMaxLength = 4096;

// Unsigned keys ordered as torch.sort orders the noise: -0 == +0, all NaNs equal and last.
__device__ __forceinline__ uint32_t sort_key(float v) {
  if (isnan(v)) return 0xffffffffu;
  const uint32_t bits = __float_as_uint(v == 0.0f ? 0.0f : v);
  return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}

__device__ __forceinline__ uint64_t sort_key(double v) {
  if (isnan(v)) return ~0ull;
  const uint64_t bits = static_cast<uint64_t>(__double_as_longlong(v == 0.0 ? 0.0 : v));
  return (bits >> 63) ? ~bits : bits | (1ull << 63);
}

// The unsigned type of each copy width: 16 bytes (a uint4 per lane) or one element.
template <int kBytes> struct Unit;
template <> struct Unit<16> { using type = uint4; };
template <> struct Unit<8> { using type = uint64_t; };
template <> struct Unit<4> { using type = uint32_t; };
template <> struct Unit<2> { using type = uint16_t; };

bool can_copy_16_bytes(int64_t row_bytes, const void* a, const void* b) {
  return row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(a) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(b) % 16 == 0;
}

template <typename unit_t>
__device__ __forceinline__ void copy_row(unit_t* __restrict__ dst, const unit_t* __restrict__ src,
                                         int64_t units, int lane) {
#pragma unroll 4
  for (int64_t c = lane; c < units; c += 32) dst[c] = src[c];
}

template <typename unit_t>
__device__ __forceinline__ void copy_kept_rows(unit_t* __restrict__ dst,
                                               const unit_t* __restrict__ src, const int* kept,
                                               int num_keep, int64_t units) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < num_keep; r += kWarps) {
    copy_row(dst + r * units, src + kept[r] * units, units, lane);
  }
}

template <typename scalar_t, typename noise_t>
__global__ void __launch_bounds__(kThreads) random_masking_kernel(
    const scalar_t* __restrict__ x, const noise_t* __restrict__ noise,
    scalar_t* __restrict__ x_masked, scalar_t* __restrict__ mask,
    int64_t* __restrict__ ids_restore, int length, int64_t dim, int num_keep, bool copy_16_bytes) {
  using key_t = decltype(sort_key(noise_t()));
  extern __shared__ __align__(16) unsigned char smem[];
  key_t* keys = reinterpret_cast<key_t*>(smem);
  int* kept = reinterpret_cast<int*>(keys + length);
  const int64_t row = blockIdx.x;
  for (int i = threadIdx.x; i < length; i += kThreads) keys[i] = sort_key(noise[row * length + i]);
  __syncthreads();
  for (int i = threadIdx.x; i < length; i += kThreads) {
    const key_t key = keys[i];
    int rank = 0;
    for (int j = 0; j < length; ++j) rank += (keys[j] < key) | ((keys[j] == key) & (j < i));
    ids_restore[row * length + i] = rank;
    mask[row * length + i] = scalar_t(rank < num_keep ? 0 : 1);
    if (rank < num_keep) kept[rank] = i;
  }
  __syncthreads();
  if (copy_16_bytes) {
    const int64_t units = dim * static_cast<int64_t>(sizeof(scalar_t)) / 16;
    copy_kept_rows(reinterpret_cast<uint4*>(x_masked) + row * num_keep * units,
                   reinterpret_cast<const uint4*>(x) + row * length * units, kept, num_keep, units);
  } else {
    using unit_t = typename Unit<sizeof(scalar_t)>::type;
    copy_kept_rows(reinterpret_cast<unit_t*>(x_masked) + row * num_keep * dim,
                   reinterpret_cast<const unit_t*>(x) + row * length * dim, kept, num_keep, dim);
  }
}

// One warp per row of grad_x [N * L rows]: the gradient row of its rank, or zeros when removed.
template <typename unit_t>
__global__ void __launch_bounds__(256) random_masking_backward_kernel(
    const unit_t* __restrict__ grad, const int64_t* __restrict__ ids_restore,
    unit_t* __restrict__ grad_x, int64_t n_patches, int64_t length, int64_t num_keep,
    int64_t units) {
  const int64_t patch = blockIdx.x * int64_t{8} + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (patch >= n_patches) return;
  const int64_t rank = ids_restore[patch];
  unit_t* dst = grad_x + patch * units;
  if (rank >= 0 && rank < num_keep) {
    copy_row(dst, grad + ((patch / length) * num_keep + rank) * units, units, lane);
  } else {
    for (int64_t c = lane; c < units; c += 32) dst[c] = unit_t{};
  }
}

template <int kBytes>
void launch_backward(const at::Tensor& grad, const at::Tensor& ids_restore,
                     const at::Tensor& grad_x, cudaStream_t stream) {
  using unit_t = typename Unit<kBytes>::type;
  const int64_t n_patches = grad_x.size(0) * grad_x.size(1);
  random_masking_backward_kernel<unit_t><<<(n_patches + 7) / 8, 256, 0, stream>>>(
      static_cast<const unit_t*>(grad.data_ptr()), ids_restore.data_ptr<int64_t>(),
      static_cast<unit_t*>(grad_x.data_ptr()), n_patches, grad_x.size(1), grad.size(1),
      grad.size(2) * grad.element_size() / kBytes);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> random_masking_cuda(const at::Tensor& x,
                                                                   const at::Tensor& noise_in,
                                                                   int64_t num_keep) {
  check_random_masking(x, noise_in, num_keep);
  TORCH_CHECK(x.size(1) <= kMaxLength, "random_masking (CUDA): x has L = ", x.size(1),
              " patches, more than the kernel's limit of ", kMaxLength, "; use backend 'torch'");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n_rows = x.size(0), length = x.size(1), dim = x.size(2);
  // Half/bfloat16 -> float is exact and keeps the order; float64 stays as it is.
  const at::Tensor noise =
      noise_in.scalar_type() == at::kDouble ? noise_in : noise_in.to(at::kFloat);
  at::Tensor x_masked = at::empty({n_rows, num_keep, dim}, x.options());
  at::Tensor mask = at::empty({n_rows, length}, x.options());
  at::Tensor ids_restore = at::empty({n_rows, length}, x.options().dtype(at::kLong));
  if (n_rows == 0 || length == 0) return {x_masked, mask, ids_restore};
  const bool copy_16_bytes =
      can_copy_16_bytes(dim * x.element_size(), x.data_ptr(), x_masked.data_ptr());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(noise.scalar_type(), "random_masking_cuda_noise", [&] {
    using noise_t = scalar_t;
    const size_t smem = length * (sizeof(decltype(sort_key(noise_t()))) + sizeof(int));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                    "random_masking_cuda", [&] {
      random_masking_kernel<scalar_t, noise_t><<<n_rows, kThreads, smem, stream>>>(
          x.data_ptr<scalar_t>(), noise.data_ptr<noise_t>(), x_masked.data_ptr<scalar_t>(),
          mask.data_ptr<scalar_t>(), ids_restore.data_ptr<int64_t>(), static_cast<int>(length),
          dim, static_cast<int>(num_keep), copy_16_bytes);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {x_masked, mask, ids_restore};
}

at::Tensor random_masking_backward_cuda(const at::Tensor& grad, const at::Tensor& ids_restore) {
  check_random_masking_backward(grad, ids_restore);
  TORCH_CHECK(grad.is_floating_point(), "random_masking_backward: grad_x_masked must be floating "
              "point, got ", grad.scalar_type());
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor grad_x = at::empty({grad.size(0), ids_restore.size(1), grad.size(2)}, grad.options());
  if (grad_x.numel() == 0) return grad_x;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t row_bytes = grad.size(2) * grad.element_size();
  if (can_copy_16_bytes(row_bytes, grad.data_ptr(), grad_x.data_ptr())) {
    launch_backward<16>(grad, ids_restore, grad_x, stream);
  } else if (grad.element_size() == 8) {
    launch_backward<8>(grad, ids_restore, grad_x, stream);
  } else if (grad.element_size() == 4) {
    launch_backward<4>(grad, ids_restore, grad_x, stream);
  } else {
    launch_backward<2>(grad, ids_restore, grad_x, stream);
  }
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(usfmae, CUDA, m) {
  m.impl("random_masking", &random_masking_cuda);
  m.impl("random_masking_backward", &random_masking_backward_cuda);
}

}  // namespace usfmae
