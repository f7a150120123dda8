// Argument checks shared by the CPU and CUDA attention kernels. Plain form: q, k, v, grad_out and
// out are [B, H, N, d] of one floating dtype with unit stride along d (any other strides); packed
// form: qkv [B, N, 3, H, d] and grad_out, out [B, N, H*d], also with unit last stride. lse is the
// forward's contiguous fp32 [B, H, N].
#pragma once
#include <ATen/ATen.h>

#include <cmath>

namespace usfmae {
namespace detail {

inline void check_unit_last_stride(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name,
              " must have unit stride along its last dim, got strides ", t.strides());
}

inline void check_like(const char* op, const char* name, const at::Tensor& t,
                       const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " must have the shape of ", ref_name,
              " ", ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ",
              ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device());
  check_unit_last_stride(op, name, t);
}

inline void check_scale(const char* op, double scale) {
  TORCH_CHECK(std::isfinite(scale) && scale > 0, op,
              ": scale must be a positive finite number, got ", scale);
}

inline void check_lse(const char* op, const at::Tensor& lse, const at::Tensor& ref,
                      at::IntArrayRef expected) {
  TORCH_CHECK(lse.sizes() == expected, op, ": lse must be [B, H, N] = ", expected, ", got ",
              lse.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, op, ": lse must be float32, got ",
              lse.scalar_type());
  TORCH_CHECK(lse.device() == ref.device(), op, ": lse is on ", lse.device(),
              " but the inputs are on ", ref.device());
  TORCH_CHECK(lse.is_contiguous(), op, ": lse must be contiguous");
}

}  // namespace detail

inline void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            double scale) {
  constexpr const char* op = "attention";
  TORCH_CHECK(q.dim() == 4, op, ": q must be [B, H, N, d], got shape ", q.sizes());
  TORCH_CHECK(q.is_floating_point(), op, ": q must be floating point, got ", q.scalar_type());
  detail::check_unit_last_stride(op, "q", q);
  detail::check_like(op, "k", k, q, "q");
  detail::check_like(op, "v", v, q, "q");
  detail::check_scale(op, scale);
}

inline void check_attention_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                     const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& out, const at::Tensor& lse, double scale) {
  check_attention(q, k, v, scale);
  constexpr const char* op = "attention_bwd";
  detail::check_like(op, "grad_out", grad_out, q, "q");
  detail::check_like(op, "out", out, q, "q");
  detail::check_lse(op, lse, q, q.sizes().slice(0, 3));
}

inline void check_attention_packed(const at::Tensor& qkv, double scale) {
  constexpr const char* op = "attention_packed";
  TORCH_CHECK(qkv.dim() == 5 && qkv.size(2) == 3, op, ": qkv must be [B, N, 3, H, d], got shape ",
              qkv.sizes());
  TORCH_CHECK(qkv.is_floating_point(), op, ": qkv must be floating point, got ",
              qkv.scalar_type());
  detail::check_unit_last_stride(op, "qkv", qkv);
  detail::check_scale(op, scale);
}

inline void check_attention_packed_backward(const at::Tensor& grad_out, const at::Tensor& qkv,
                                            const at::Tensor& out, const at::Tensor& lse,
                                            double scale) {
  check_attention_packed(qkv, scale);
  constexpr const char* op = "attention_packed_bwd";
  const int64_t batch = qkv.size(0), length = qkv.size(1), heads = qkv.size(3);
  TORCH_CHECK(out.dim() == 3 && out.size(0) == batch && out.size(1) == length &&
                  out.size(2) == heads * qkv.size(4),
              op, ": out must be [B, N, H*d] = [", batch, ", ", length, ", ", heads * qkv.size(4),
              "], got shape ", out.sizes());
  TORCH_CHECK(out.scalar_type() == qkv.scalar_type(), op, ": out must have the dtype of qkv (",
              qkv.scalar_type(), "), got ", out.scalar_type());
  TORCH_CHECK(out.device() == qkv.device(), op, ": out is on ", out.device(), " but qkv is on ",
              qkv.device());
  detail::check_unit_last_stride(op, "out", out);
  detail::check_like(op, "grad_out", grad_out, out, "out");
  detail::check_lse(op, lse, qkv, {batch, heads, length});
}

}  // namespace usfmae
