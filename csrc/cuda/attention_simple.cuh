// Attention on CUDA cores for what the tensor-core kernels do not take: fp32 and fp64 inputs, and
// fp16/bf16 with a head dim other than 32, 64 or 128 (any d <= 128). Correct rather than fast:
// one warp per query (or key) row, lanes own columns lane, lane + 32, ... of d, one warp-wide dot
// product per score. Same structure as the tensor-core backward: a dQ pass that also writes delta,
// then a dK/dV pass, neither with atomics. Computes in fp32 (fp64 for fp64 inputs).
#ifndef USFMAE_ATTENTION_SIMPLE_CUH
#define USFMAE_ATTENTION_SIMPLE_CUH

#include "attention_kernels.cuh"

namespace usfmae {
namespace simple {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kMaxHeadDim = 128;
constexpr int kPerLane = kMaxHeadDim / 32;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <typename T, typename acc_t>
__device__ __forceinline__ void load_row(acc_t (&r)[kPerLane], const T* src, int d, int lane) {
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int c = lane + 32 * i;
    r[i] = c < d ? static_cast<acc_t>(src[c]) : acc_t(0);
  }
}

template <typename T, typename acc_t>
__device__ __forceinline__ acc_t dot(const acc_t (&r)[kPerLane], const T* src, int d, int lane) {
  acc_t x = 0;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int c = lane + 32 * i;
    if (c < d) x += r[i] * static_cast<acc_t>(src[c]);
  }
  return warp_sum(x);
}

// r += w * src
template <typename T, typename acc_t>
__device__ __forceinline__ void axpy(acc_t (&r)[kPerLane], acc_t w, const T* src, int d, int lane) {
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int c = lane + 32 * i;
    if (c < d) r[i] += w * static_cast<acc_t>(src[c]);
  }
}

template <typename T, typename acc_t>
__device__ __forceinline__ void store_row(T* dst, const acc_t (&r)[kPerLane], acc_t factor, int d,
                                          int lane) {
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int c = lane + 32 * i;
    if (c < d) dst[c] = static_cast<T>(r[i] * factor);
  }
}

// One CTA per (b, h, kWarps rows); a warp past the last row returns at once (these kernels have
// no block-wide barrier).
__device__ __forceinline__ tiles::TileIndex warp_row(int heads, int rows) {
  tiles::TileIndex i = tiles::tile_index(heads, tiles::ceil_div(rows, kWarps));
  i.tile = i.tile * kWarps + threadIdx.x / 32;
  return i;
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(const AttentionParams p, int d) {
  const auto [b, h, row, bh] = warp_row(p.heads, p.seqlen_q);
  const int lane = threadIdx.x % 32;
  if (row >= p.seqlen_q) return;
  acc_t q[kPerLane], o[kPerLane] = {};
  load_row(q, p.q.at<const T>(b, h, row), d, lane);
  acc_t row_max = -INFINITY, row_sum = 0;
  for (int j = 0; j < p.seqlen_k; ++j) {
    const acc_t s = dot(q, p.k.at<const T>(b, h, j), d, lane) * acc_t(p.scale);
    const acc_t new_max = s > row_max ? s : row_max;
    const acc_t correction = exp(row_max - new_max), prob = exp(s - new_max);
    row_sum = row_sum * correction + prob;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) o[i] *= correction;
    axpy(o, prob, p.v.at<const T>(b, h, j), d, lane);
    row_max = new_max;
  }
  store_row(p.out.at<T>(b, h, row), o, acc_t(1) / row_sum, d, lane);
  if (lane == 0) p.lse[int64_t(bh) * p.seqlen_q + row] = float(row_max + log(row_sum));
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads) attention_bwd_dq_kernel(const AttentionParams p,
                                                                     int d) {
  const auto [b, h, row, bh] = warp_row(p.heads, p.seqlen_q);
  const int lane = threadIdx.x % 32;
  if (row >= p.seqlen_q) return;
  const int64_t stat = int64_t(bh) * p.seqlen_q + row;
  acc_t q[kPerLane], d_o[kPerLane], dq[kPerLane] = {};
  load_row(q, p.q.at<const T>(b, h, row), d, lane);
  load_row(d_o, p.grad_out.at<const T>(b, h, row), d, lane);
  const acc_t delta = dot(d_o, p.out.at<const T>(b, h, row), d, lane);
  if (lane == 0) p.delta[stat] = float(delta);
  const acc_t lse = p.lse[stat];
  for (int j = 0; j < p.seqlen_k; ++j) {
    const acc_t prob = exp(dot(q, p.k.at<const T>(b, h, j), d, lane) * acc_t(p.scale) - lse);
    const acc_t dp = dot(d_o, p.v.at<const T>(b, h, j), d, lane);
    axpy(dq, prob * (dp - delta), p.k.at<const T>(b, h, j), d, lane);
  }
  store_row(p.grad_q.at<T>(b, h, row), dq, acc_t(p.scale), d, lane);
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads) attention_bwd_dkdv_kernel(const AttentionParams p,
                                                                       int d) {
  const auto [b, h, row, bh] = warp_row(p.heads, p.seqlen_k);
  const int lane = threadIdx.x % 32;
  if (row >= p.seqlen_k) return;
  acc_t k[kPerLane], v[kPerLane], dk[kPerLane] = {}, dv[kPerLane] = {};
  load_row(k, p.k.at<const T>(b, h, row), d, lane);
  load_row(v, p.v.at<const T>(b, h, row), d, lane);
  for (int i = 0; i < p.seqlen_q; ++i) {
    const int64_t stat = int64_t(bh) * p.seqlen_q + i;
    const T* q = p.q.at<const T>(b, h, i);
    const T* d_o = p.grad_out.at<const T>(b, h, i);
    const acc_t prob = exp(dot(k, q, d, lane) * acc_t(p.scale) - acc_t(p.lse[stat]));
    axpy(dv, prob, d_o, d, lane);
    axpy(dk, prob * (dot(v, d_o, d, lane) - acc_t(p.delta[stat])), q, d, lane);
  }
  store_row(p.grad_k.at<T>(b, h, row), dk, acc_t(p.scale), d, lane);
  store_row(p.grad_v.at<T>(b, h, row), dv, acc_t(1), d, lane);
}

}  // namespace simple
}  // namespace usfmae

#endif  // USFMAE_ATTENTION_SIMPLE_CUH
