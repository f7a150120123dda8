// random_masking on the CPU: one stable sort of the noise per row, rows in parallel (OpenMP).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "../random_masking_checks.h"

namespace usfmae {
namespace {

// NaN sorts after every number, as in torch.sort.
template <typename T>
bool noise_less(T a, T b) {
  return a < b || (std::isnan(b) && !std::isnan(a));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> random_masking_cpu(const at::Tensor& x,
                                                                  const at::Tensor& noise_in,
                                                                  int64_t num_keep) {
  check_random_masking(x, noise_in, num_keep);
  const int64_t n_rows = x.size(0), length = x.size(1), dim = x.size(2);
  // Half/bfloat16 -> float is exact and keeps the order; float64 stays as it is.
  const at::Tensor noise = noise_in.scalar_type() == at::kDouble ? noise_in : noise_in.to(at::kFloat);
  at::Tensor x_masked = at::empty({n_rows, num_keep, dim}, x.options());
  at::Tensor mask = at::empty({n_rows, length}, x.options());
  at::Tensor ids_restore = at::empty({n_rows, length}, x.options().dtype(at::kLong));
  int64_t* ids = ids_restore.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES(noise.scalar_type(), "random_masking_cpu_noise", [&] {
    using noise_t = scalar_t;
    const noise_t* noise_data = noise.data_ptr<noise_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                    "random_masking_cpu", [&] {
      const scalar_t* src = x.data_ptr<scalar_t>();
      scalar_t* dst = x_masked.data_ptr<scalar_t>();
      scalar_t* mask_data = mask.data_ptr<scalar_t>();
      at::parallel_for(0, n_rows, 1, [&](int64_t begin, int64_t end) {
        std::vector<int64_t> order(length);
        for (int64_t row = begin; row < end; ++row) {
          const noise_t* row_noise = noise_data + row * length;
          std::iota(order.begin(), order.end(), int64_t{0});
          std::stable_sort(order.begin(), order.end(), [row_noise](int64_t a, int64_t b) {
            return noise_less(row_noise[a], row_noise[b]);
          });
          for (int64_t rank = 0; rank < length; ++rank) {
            const int64_t patch = order[rank];
            ids[row * length + patch] = rank;
            mask_data[row * length + patch] = scalar_t(rank < num_keep ? 0 : 1);
          }
          for (int64_t rank = 0; rank < num_keep; ++rank) {
            std::memcpy(dst + (row * num_keep + rank) * dim, src + (row * length + order[rank]) * dim,
                        dim * sizeof(scalar_t));
          }
        }
      });
    });
  });
  return {x_masked, mask, ids_restore};
}

at::Tensor random_masking_backward_cpu(const at::Tensor& grad, const at::Tensor& ids_restore) {
  check_random_masking_backward(grad, ids_restore);
  const int64_t n_rows = grad.size(0), num_keep = grad.size(1), dim = grad.size(2);
  const int64_t length = ids_restore.size(1);
  at::Tensor grad_x = at::empty({n_rows, length, dim}, grad.options());
  const int64_t* ids = ids_restore.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "random_masking_backward_cpu", [&] {
    const scalar_t* src = grad.data_ptr<scalar_t>();
    scalar_t* dst = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, n_rows * length, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t rank = ids[i];
        scalar_t* out = dst + i * dim;
        if (rank >= 0 && rank < num_keep) {
          std::memcpy(out, src + ((i / length) * num_keep + rank) * dim, dim * sizeof(scalar_t));
        } else {
          std::fill(out, out + dim, scalar_t(0));
        }
      }
    });
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(usfmae, CPU, m) {
  m.impl("random_masking", &random_masking_cpu);
  m.impl("random_masking_backward", &random_masking_backward_cpu);
}

}  // namespace usfmae
