// attention_fwd / attention_bwd and their packed forms on CUDA. Both layouts go through one
// implementation on [B, H, N, d] strided views: the packed qkv [B, N, 3, H, d] is read in place,
// the output [B, N, H*d] and the gradient [B, N, 3, H, d] are written in place. bf16/fp16 with
// d in {32, 64, 128} run on tensor cores (attention_kernels.cuh), everything else on CUDA cores
// (attention_simple.cuh). Stream-ordered, no host synchronisation, deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../attention_checks.h"
#include "attention_kernels.cuh"
#include "attention_simple.cuh"

namespace usfmae {
namespace {

// What the CUDA kernels add to the shared checks: the CUDA-core path holds d / 32 values per
// lane, and the grid counts CTAs (at most one per (b, h, 4 rows)) in 32 bits.
void check_cuda_limits(const char* op, const char* name, int64_t bh, int64_t rows, int64_t d) {
  TORCH_CHECK(d >= 1 && d <= simple::kMaxHeadDim, op, " (CUDA): ", name,
              " must have a head dim d in [1, ", simple::kMaxHeadDim, "], got ", d);
  TORCH_CHECK(bh * ((rows + 3) / 4) <= std::numeric_limits<int>::max(), op, " (CUDA): ", name,
              " has B * H * N too large for the kernels' grid (B * H = ", bh, ", N = ", rows, ")");
}

bool use_tensor_cores(const at::Tensor& q) {
  const int64_t d = q.size(3);
  return (q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16) &&
         (d == 32 || d == 64 || d == 128);
}

// cp.async and the 16-byte stores need 16-byte aligned rows; other views get an aligned copy.
at::Tensor aligned_rows(const at::Tensor& t) {
  bool aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int i = 0; i < 3; ++i) aligned = aligned && (t.stride(i) * t.element_size()) % 16 == 0;
  return aligned ? t : t.clone(at::MemoryFormat::Contiguous);
}

Operand operand(const at::Tensor& t) {
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

AttentionParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& lse, double scale) {
  AttentionParams p{};
  p.q = operand(q);
  p.k = operand(k);
  p.v = operand(v);
  p.lse = lse.data_ptr<float>();
  p.heads = static_cast<int>(q.size(1));
  p.seqlen_q = static_cast<int>(q.size(2));
  p.seqlen_k = static_cast<int>(k.size(2));
  p.scale = scale;
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);  // log2(e)
  return p;
}

// A tensor-core kernel over `rows` rows of each of bh heads, one CTA per 64 rows.
template <typename Kernel>
void launch(Kernel kernel, int64_t bh, int rows, size_t smem, const AttentionParams& p) {
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  const int64_t grid = bh * tiles::ceil_div(rows, tiles::kBlockRows);
  kernel<<<static_cast<unsigned>(grid), tiles::kThreads, smem,
           c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A CUDA-core kernel over `rows` rows of each of bh heads, one warp per row.
template <typename Kernel>
void launch_simple(Kernel kernel, int64_t bh, int rows, const AttentionParams& p, int d) {
  const int64_t grid = bh * tiles::ceil_div(rows, simple::kWarps);
  kernel<<<static_cast<unsigned>(grid), simple::kThreads, 0,
           c10::cuda::getCurrentCUDAStream()>>>(p, d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls f(T{}, std::integral_constant<int, d>{}) for the tensor-core dtype and head dim of q.
template <typename F>
void dispatch_tensor_core(const at::Tensor& q, F&& f) {
  const auto with_dim = [&](auto type) {
    switch (q.size(3)) {
      case 32: return f(type, std::integral_constant<int, 32>{});
      case 64: return f(type, std::integral_constant<int, 64>{});
      default: return f(type, std::integral_constant<int, 128>{});
    }
  };
  if (q.scalar_type() == at::kHalf) return with_dim(c10::Half{});
  return with_dim(c10::BFloat16{});
}

// out [B, H, Nq, d] and lse [B, H, Nq] preallocated (out: any 16-byte aligned view).
void attention_forward(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                       const at::Tensor& out, const at::Tensor& lse, double scale) {
  const int64_t bh = q_in.size(0) * q_in.size(1);
  if (bh == 0 || q_in.size(2) == 0) return;
  const bool tensor_cores = use_tensor_cores(q_in);
  const auto prepare = [&](const at::Tensor& t) { return tensor_cores ? aligned_rows(t) : t; };
  const at::Tensor q = prepare(q_in), k = prepare(k_in), v = prepare(v_in);
  AttentionParams p = make_params(q, k, v, lse, scale);
  p.out = operand(out);
  if (tensor_cores) {
    dispatch_tensor_core(q, [&](auto type, auto dim) {
      using T = decltype(type);
      constexpr int kD = decltype(dim)::value;
      launch(tiles::attention_fwd_kernel<T, kD>, bh, p.seqlen_q,
             tiles::forward_smem<kD>(tiles::ceil_div(p.seqlen_k, tiles::kBlockRows)), p);
    });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_fwd", [&] {
    launch_simple(simple::attention_fwd_kernel<scalar_t, at::opmath_type<scalar_t>>, bh,
                  p.seqlen_q, p, static_cast<int>(q.size(3)));
  });
}

// dq, dk, dv preallocated like q, k, v (any 16-byte aligned views).
void attention_backward(const at::Tensor& grad_out_in, const at::Tensor& q_in,
                        const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in,
                        const at::Tensor& lse, const at::Tensor& dq, const at::Tensor& dk,
                        const at::Tensor& dv, double scale) {
  const int64_t bh = q_in.size(0) * q_in.size(1);
  if (bh == 0 || q_in.size(2) == 0) return;  // the checks make k and v as long as q
  const bool tensor_cores = use_tensor_cores(q_in);
  const auto prepare = [&](const at::Tensor& t) { return tensor_cores ? aligned_rows(t) : t; };
  const at::Tensor q = prepare(q_in), k = prepare(k_in), v = prepare(v_in);
  const at::Tensor out = prepare(out_in), grad_out = prepare(grad_out_in);
  at::Tensor delta = at::empty(lse.sizes(), lse.options());
  AttentionParams p = make_params(q, k, v, lse, scale);
  p.out = operand(out);
  p.grad_out = operand(grad_out);
  p.grad_q = operand(dq);
  p.grad_k = operand(dk);
  p.grad_v = operand(dv);
  p.delta = delta.data_ptr<float>();
  // The dQ kernels write delta, which the dK/dV kernels read: same stream, in this order.
  if (tensor_cores) {
    dispatch_tensor_core(q, [&](auto type, auto dim) {
      using T = decltype(type);
      constexpr int kD = decltype(dim)::value;
      launch(tiles::attention_bwd_dq_kernel<T, kD>, bh, p.seqlen_q,
             tiles::dq_smem<kD>(tiles::ceil_div(p.seqlen_k, tiles::kInner)), p);
      launch(tiles::attention_bwd_dkdv_kernel<T, kD>, bh, p.seqlen_k,
             tiles::dkdv_smem<kD>(tiles::ceil_div(p.seqlen_q, tiles::kInner)), p);
    });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int d = static_cast<int>(q.size(3));
    launch_simple(simple::attention_bwd_dq_kernel<scalar_t, acc_t>, bh, p.seqlen_q, p, d);
    launch_simple(simple::attention_bwd_dkdv_kernel<scalar_t, acc_t>, bh, p.seqlen_k, p, d);
  });
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v, double scale) {
  check_attention(q, k, v, scale);
  check_cuda_limits("attention_fwd", "q", q.size(0) * q.size(1), q.size(2), q.size(3));
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  attention_forward(q, k, v, out, lse, scale);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale) {
  check_attention_backward(grad_out, q, k, v, out, lse, scale);
  check_cuda_limits("attention_bwd", "q", q.size(0) * q.size(1), q.size(2), q.size(3));
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  attention_backward(grad_out, q, k, v, out, lse, dq, dk, dv, scale);
  return {dq, dk, dv};
}

// The [B, H, N, d] view of slot `which` (0 q, 1 k, 2 v) of a packed [B, N, 3, H, d] tensor.
at::Tensor unpack(const at::Tensor& qkv, int64_t which) {
  return qkv.select(2, which).permute({0, 2, 1, 3});
}

// The [B, H, N, d] view of a [B, N, H*d] tensor.
at::Tensor split_heads(const at::Tensor& t, int64_t heads, int64_t d) {
  return t.unflatten(2, {heads, d}).permute({0, 2, 1, 3});
}

std::tuple<at::Tensor, at::Tensor> attention_packed_fwd_cuda(const at::Tensor& qkv, double scale) {
  check_attention_packed(qkv, scale);
  check_cuda_limits("attention_packed_fwd", "qkv", qkv.size(0) * qkv.size(3), qkv.size(1),
                    qkv.size(4));
  const c10::cuda::CUDAGuard guard(qkv.device());
  const int64_t b = qkv.size(0), n = qkv.size(1), heads = qkv.size(3), d = qkv.size(4);
  at::Tensor out = at::empty({b, n, heads * d}, qkv.options());
  at::Tensor lse = at::empty({b, heads, n}, qkv.options().dtype(at::kFloat));
  attention_forward(unpack(qkv, 0), unpack(qkv, 1), unpack(qkv, 2), split_heads(out, heads, d),
                    lse, scale);
  return {out, lse};
}

at::Tensor attention_packed_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& qkv,
                                     const at::Tensor& out, const at::Tensor& lse, double scale) {
  check_attention_packed_backward(grad_out, qkv, out, lse, scale);
  check_cuda_limits("attention_packed_bwd", "qkv", qkv.size(0) * qkv.size(3), qkv.size(1),
                    qkv.size(4));
  const int64_t heads = qkv.size(3), d = qkv.size(4);
  const c10::cuda::CUDAGuard guard(qkv.device());
  at::Tensor grad_qkv = at::empty(qkv.sizes(), qkv.options());
  attention_backward(split_heads(grad_out, heads, d), unpack(qkv, 0), unpack(qkv, 1),
                     unpack(qkv, 2), split_heads(out, heads, d), lse, unpack(grad_qkv, 0),
                     unpack(grad_qkv, 1), unpack(grad_qkv, 2), scale);
  return grad_qkv;
}

}  // namespace

TORCH_LIBRARY_IMPL(usfmae, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
  m.impl("attention_packed_fwd", &attention_packed_fwd_cuda);
  m.impl("attention_packed_bwd", &attention_packed_bwd_cuda);
}

}  // namespace usfmae
