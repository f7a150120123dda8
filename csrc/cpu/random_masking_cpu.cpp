// random_masking on the CPU: per row, one sort of unique (noise key, index) pairs gives the stable
// order of the noise; kept rows are copied with memcpy. Rows run in parallel (OpenMP).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "../random_masking_checks.h"

namespace usfmae {
namespace {

constexpr int64_t kBytesPerTask = 32 * 1024;

// Unsigned key that orders noise values as torch.sort does: -0.0 == 0.0, NaN after every number
// and all NaNs equal. Paired with the patch index, the keys sort into the stable order.
template <typename noise_t>
auto sort_key(noise_t value) {
  using key_t = std::conditional_t<sizeof(noise_t) == 4, uint32_t, uint64_t>;
  static_assert(sizeof(key_t) == sizeof(noise_t));
  constexpr key_t sign = key_t(1) << (8 * sizeof(key_t) - 1);
  if (std::isnan(value)) return std::numeric_limits<key_t>::max();
  if (value == 0) return sign;
  key_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return (bits & sign) ? key_t(~bits) : key_t(bits | sign);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> random_masking_cpu(const at::Tensor& x,
                                                                  const at::Tensor& noise_in,
                                                                  int64_t num_keep) {
  check_random_masking(x, noise_in, num_keep);
  const int64_t n_rows = x.size(0), length = x.size(1), dim = x.size(2);
  TORCH_CHECK(length <= std::numeric_limits<uint32_t>::max(), "random_masking (CPU): L = ",
              length, " patches exceeds the kernel's limit of 2^32 - 1");
  // Half/bfloat16 -> float is exact and keeps the order; float64 stays as it is.
  const at::Tensor noise =
      noise_in.scalar_type() == at::kDouble ? noise_in : noise_in.to(at::kFloat);
  at::Tensor x_masked = at::empty({n_rows, num_keep, dim}, x.options());
  at::Tensor mask = at::empty({n_rows, length}, x.options());
  at::Tensor ids_restore = at::empty({n_rows, length}, x.options().dtype(at::kLong));
  const int64_t row_bytes = dim * x.element_size();
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(x_masked.mutable_data_ptr());
  int64_t* ids = ids_restore.mutable_data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES(noise.scalar_type(), "random_masking_cpu_noise", [&] {
    const scalar_t* noise_data = noise.const_data_ptr<scalar_t>();
    using entry_t = std::pair<decltype(sort_key(scalar_t{})), uint32_t>;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                    "random_masking_cpu", [&] {
      scalar_t* mask_data = mask.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, n_rows, 1, [&](int64_t begin, int64_t end) {
        std::vector<entry_t> order(length);
        for (int64_t row = begin; row < end; ++row) {
          const int64_t offset = row * length;
          for (int64_t l = 0; l < length; ++l) {
            order[l] = {sort_key(noise_data[offset + l]), static_cast<uint32_t>(l)};
          }
          std::sort(order.begin(), order.end());
          for (int64_t rank = 0; rank < length; ++rank) {
            const int64_t patch = offset + order[rank].second;
            ids[patch] = rank;
            mask_data[patch] = scalar_t(rank < num_keep ? 0 : 1);
          }
          if (row_bytes == 0) continue;  // memcpy wants valid pointers even for 0 bytes
          for (int64_t rank = 0; rank < num_keep; ++rank) {
            std::memcpy(dst + (row * num_keep + rank) * row_bytes,
                        src + (offset + order[rank].second) * row_bytes, row_bytes);
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
  if (grad_x.numel() == 0) return grad_x;
  const int64_t row_bytes = dim * grad.element_size();
  const char* src = static_cast<const char*>(grad.const_data_ptr());
  char* dst = static_cast<char*>(grad_x.mutable_data_ptr());
  const int64_t* ids = ids_restore.const_data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, kBytesPerTask / row_bytes);
  // Row l of grad_x is row ids_restore[l] of grad_x_masked when kept, zeros (all-zero bits in
  // every floating type) when removed.
  at::parallel_for(0, n_rows * length, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t rank = ids[i];
      char* out = dst + i * row_bytes;
      if (rank >= 0 && rank < num_keep) {
        std::memcpy(out, src + ((i / length) * num_keep + rank) * row_bytes, row_bytes);
      } else {
        std::memset(out, 0, row_bytes);
      }
    }
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(usfmae, CPU, m) {
  m.impl("random_masking", &random_masking_cpu);
  m.impl("random_masking_backward", &random_masking_backward_cpu);
}

}  // namespace usfmae
