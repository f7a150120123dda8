// FlashAttention-2 forward and backward on tensor cores (bf16/fp16 in, fp32 accumulate) for head
// dims 32, 64 and 128. Every CTA has 4 warps; each warp owns 16 rows of the CTA's 64-row block and
// keeps its accumulators in registers, so warps never exchange partial results.
//   forward:  CTA per (b, h, 64 queries); loops over key tiles with an online softmax.
//   backward, no atomics: (1) CTA per (b, h, 64 queries) computes delta = rowsum(dO * O) and dQ,
//   looping over key tiles; (2) CTA per (b, h, 64 keys) computes dK and dV, looping over query
//   tiles with the delta of (1). S and dP are computed in both, which costs two extra matmuls
//   per tile pair but needs neither atomics nor a dQ accumulator in global memory.
// Tiles stream through two shared-memory stages filled with cp.async while the other is used.
// Operands are [B, H, N, d] views with any 16-byte aligned strides, which covers the packed qkv
// [B, N, 3, H, d] read in place and the [B, N, H*d] output written in place.
#ifndef USFMAE_ATTENTION_KERNELS_CUH
#define USFMAE_ATTENTION_KERNELS_CUH

#include "attention_tiles.cuh"

namespace usfmae {

// A [B, H, N, d] tensor view: element strides (the last dimension is contiguous).
struct Operand {
  void* data;
  int64_t batch, head, row;
  template <typename T>
  __device__ T* at(int b, int h, int64_t r) const {
    return static_cast<T*>(data) + b * batch + h * head + r * row;
  }
};

struct AttentionParams {
  Operand q, k, v, out, grad_out, grad_q, grad_k, grad_v;
  float* lse;    // [B, H, seqlen_q] natural-log row log-sum-exp of the scaled scores
  float* delta;  // [B, H, seqlen_q] rowsum(dO * O), written by the dQ kernel
  int heads, seqlen_q, seqlen_k;
  double scale;      // softmax scale (double for the fp64 path)
  float scale_log2;  // scale * log2(e), for exp2 in fp32
};

namespace tiles {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Rows per inner-loop tile of the backward kernels: 32 keeps a warp's dK and dV (16 x d each)
// plus S^T and dP^T (16 x 32) in registers up to d = 128, and pads N = 197 to 224 rows, not 256.
constexpr int kInner = 32;

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Grid: one CTA per (b, h, 64-row tile), tiles of a head adjacent (they share its K and V in L2).
struct TileIndex {
  int b, h, tile, bh;
};

__device__ __forceinline__ TileIndex tile_index(int heads, int n_tiles) {
  const int bh = blockIdx.x / n_tiles;
  return {bh / heads, bh % heads, static_cast<int>(blockIdx.x % n_tiles), bh};
}

// Two shared-memory stages when a kernel loops over more than one tile.
__host__ __device__ constexpr int num_stages(int n_tiles) { return n_tiles > 1 ? 2 : 1; }

// Bytes of `rows` rows of a shared tile (T is 2 bytes wide).
template <int kD>
constexpr size_t tile_bytes(int rows) {
  return size_t{2} * rows * smem_stride<kD>();
}

// Shared memory of each kernel when it loops over n_tiles tiles.
template <int kD>
constexpr size_t forward_smem(int n_tiles) {
  return tile_bytes<kD>(kBlockRows * (1 + 2 * num_stages(n_tiles)));
}

template <int kD>
constexpr size_t dq_smem(int n_tiles) {  // Q, dO, stages of K and V; lse and delta per row
  return tile_bytes<kD>(2 * kBlockRows + 2 * num_stages(n_tiles) * kInner) +
         sizeof(float) * 2 * kBlockRows;
}

template <int kD>
constexpr size_t dkdv_smem(int n_tiles) {  // K, V, stages of Q and dO with their lse and delta
  const int stage_rows = num_stages(n_tiles) * kInner;
  return tile_bytes<kD>(2 * kBlockRows + 2 * stage_rows) + sizeof(float) * 2 * stage_rows;
}

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(const AttentionParams p) {
  constexpr int kTile = kBlockRows * smem_stride<kD>();
  extern __shared__ __align__(16) unsigned char smem[];
  T* s_q = reinterpret_cast<T*>(smem);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t = lane % 4;
  const auto [b, h, q_tile, bh] = tile_index(p.heads, ceil_div(p.seqlen_q, kBlockRows));
  const int q0 = q_tile * kBlockRows;
  load_tile_async<T, kBlockRows, kD>(s_q, p.q.at<const T>(b, h, q0), p.q.row, p.seqlen_q - q0);
  const int n_tiles = ceil_div(p.seqlen_k, kBlockRows);
  const auto load_kv = [&](int j) {
    T* s_k = s_q + (1 + 2 * (j & 1)) * kTile;
    const int64_t k0 = int64_t(j) * kBlockRows;
    load_tile_async<T, kBlockRows, kD>(s_k, p.k.at<const T>(b, h, k0), p.k.row, p.seqlen_k - k0);
    load_tile_async<T, kBlockRows, kD>(s_k + kTile, p.v.at<const T>(b, h, k0), p.v.row,
                                       p.seqlen_k - k0);
    ptx::cp_async_commit();
  };
  load_kv(0);  // one group with the Q tile

  float o[kD / 8][4];
  zero<kD>(o);
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};  // log2 units
  for (int j = 0; j < n_tiles; ++j) {
    if (j + 1 < n_tiles) {
      load_kv(j + 1);
      ptx::cp_async_wait<1>();
    } else {
      ptx::cp_async_wait<0>();
    }
    __syncthreads();  // tile j is in shared memory for every warp
    const T* s_k = s_q + (1 + 2 * (j & 1)) * kTile;
    float s[kBlockRows / 8][4];
    zero<kBlockRows>(s);
    warp_gemm<T, kD, kBlockRows, kD, true>(
        s, [&](int kk, uint32_t(&a)[4]) { load_a<kD>(a, s_q, kWarpRows * warp, kk, lane); }, s_k,
        lane);
    const int valid_cols = p.seqlen_k - j * kBlockRows;
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < kBlockRows / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[n][e] = 8 * n + 2 * t + e % 2 < valid_cols ? s[n][e] * p.scale_log2 : -INFINITY;
        tile_max[e / 2] = fmaxf(tile_max[e / 2], s[n][e]);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      // Every tile has a valid key, so the new maximum is finite and the first correction is 0.
      const float new_max = fmaxf(row_max[r], quad_max(tile_max[r]));
      const float correction = exp2f(row_max[r] - new_max);
      row_max[r] = new_max;
      row_sum[r] *= correction;
#pragma unroll
      for (int n = 0; n < kD / 8; ++n) {
        o[n][2 * r] *= correction;
        o[n][2 * r + 1] *= correction;
      }
    }
#pragma unroll
    for (int n = 0; n < kBlockRows / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[n][e] = exp2f(s[n][e] - row_max[e / 2]);
        row_sum[e / 2] += s[n][e];
      }
    }
    warp_gemm<T, kBlockRows, kD, kD, false>(
        o, [&](int kk, uint32_t(&a)[4]) { acc_to_a<T, kBlockRows>(a, s, kk); }, s_k + kTile, lane);
    __syncthreads();  // the stage of tile j is refilled with tile j + 2 in the next iteration
  }

  const int row0 = q0 + kWarpRows * warp;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] = quad_sum(row_sum[r]);
    const float inv_sum = 1.0f / row_sum[r];
#pragma unroll
    for (int n = 0; n < kD / 8; ++n) {
      o[n][2 * r] *= inv_sum;
      o[n][2 * r + 1] *= inv_sum;
    }
    const int row = row0 + lane / 4 + 8 * r;
    if (t == 0 && row < p.seqlen_q) {
      p.lse[int64_t(bh) * p.seqlen_q + row] = (row_max[r] + log2f(row_sum[r])) * kLn2;
    }
  }
  store_rows<T, kD>(o, 1.0f, s_q + kWarpRows * warp * smem_stride<kD>(), p.out.at<T>(b, h, 0),
                    p.out.row, row0, p.seqlen_q, lane);
}

// dQ = scale * dS K with dS = P * (dP - delta), P = exp(S - lse), dP = dO V^T; also writes delta.
template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) attention_bwd_dq_kernel(const AttentionParams p) {
  constexpr int kTileM = kBlockRows * smem_stride<kD>(), kTileN = kInner * smem_stride<kD>();
  static_assert(kThreads == 2 * kBlockRows, "two threads per query row compute delta");
  extern __shared__ __align__(16) unsigned char smem[];
  T* s_q = reinterpret_cast<T*>(smem);
  T* s_do = s_q + kTileM;
  T* s_kv = s_do + kTileM;  // stage s: K at s_kv + 2 s kTileN, V after it
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t = lane % 4;
  const auto [b, h, q_tile, bh] = tile_index(p.heads, ceil_div(p.seqlen_q, kBlockRows));
  const int q0 = q_tile * kBlockRows;
  const int n_tiles = ceil_div(p.seqlen_k, kInner);
  float* s_lse = reinterpret_cast<float*>(s_kv + 2 * num_stages(n_tiles) * kTileN);
  float* s_delta = s_lse + kBlockRows;
  load_tile_async<T, kBlockRows, kD>(s_q, p.q.at<const T>(b, h, q0), p.q.row, p.seqlen_q - q0);
  load_tile_async<T, kBlockRows, kD>(s_do, p.grad_out.at<const T>(b, h, q0), p.grad_out.row,
                                     p.seqlen_q - q0);
  const auto load_kv = [&](int j) {
    T* s_k = s_kv + 2 * (j & 1) * kTileN;
    const int64_t k0 = int64_t(j) * kInner;
    load_tile_async<T, kInner, kD>(s_k, p.k.at<const T>(b, h, k0), p.k.row, p.seqlen_k - k0);
    load_tile_async<T, kInner, kD>(s_k + kTileN, p.v.at<const T>(b, h, k0), p.v.row,
                                   p.seqlen_k - k0);
    ptx::cp_async_commit();
  };
  load_kv(0);  // one group with the Q and dO tiles

  {  // delta for the CTA's rows, two threads per row, from global memory while the tiles load
    const int r = threadIdx.x / 2, half = threadIdx.x % 2, row = q0 + r;
    float dot = 0.0f;
    if (row < p.seqlen_q) {
      const T* o = p.out.at<const T>(b, h, row) + half * (kD / 2);
      const T* d_o = p.grad_out.at<const T>(b, h, row) + half * (kD / 2);
#pragma unroll
      for (int c = 0; c < kD / 2; c += 8) {
        const uint4 ov = *reinterpret_cast<const uint4*>(o + c);
        const uint4 gv = *reinterpret_cast<const uint4*>(d_o + c);
        const T* oe = reinterpret_cast<const T*>(&ov);
        const T* ge = reinterpret_cast<const T*>(&gv);
#pragma unroll
        for (int i = 0; i < 8; ++i) dot += static_cast<float>(oe[i]) * static_cast<float>(ge[i]);
      }
    }
    dot += __shfl_xor_sync(0xffffffffu, dot, 1);
    const int64_t stat = int64_t(bh) * p.seqlen_q + row;
    if (half == 0) {
      s_delta[r] = dot;
      // Padding rows: any finite lse; their zero dO rows give dS = 0.
      s_lse[r] = row < p.seqlen_q ? p.lse[stat] * kLog2e : 0.0f;
      if (row < p.seqlen_q) p.delta[stat] = dot;
    }
  }

  float dq[kD / 8][4];
  zero<kD>(dq);
  const int warp_row = kWarpRows * warp;
  for (int j = 0; j < n_tiles; ++j) {
    if (j + 1 < n_tiles) {
      load_kv(j + 1);
      ptx::cp_async_wait<1>();
    } else {
      ptx::cp_async_wait<0>();
    }
    __syncthreads();  // tile j (and, at j = 0, lse and delta) visible to every warp
    const T* s_k = s_kv + 2 * (j & 1) * kTileN;
    float s[kInner / 8][4], dp[kInner / 8][4];
    zero<kInner>(s);
    zero<kInner>(dp);
    warp_gemm<T, kD, kInner, kD, true>(
        s, [&](int kk, uint32_t(&a)[4]) { load_a<kD>(a, s_q, warp_row, kk, lane); }, s_k, lane);
    warp_gemm<T, kD, kInner, kD, true>(
        dp, [&](int kk, uint32_t(&a)[4]) { load_a<kD>(a, s_do, warp_row, kk, lane); },
        s_k + kTileN, lane);
    const int valid_cols = p.seqlen_k - j * kInner;
#pragma unroll
    for (int n = 0; n < kInner / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = warp_row + lane / 4 + 8 * (e / 2);
        const float prob = 8 * n + 2 * t + e % 2 < valid_cols
                               ? exp2f(s[n][e] * p.scale_log2 - s_lse[row])
                               : 0.0f;
        s[n][e] = prob * (dp[n][e] - s_delta[row]);  // dS
      }
    }
    warp_gemm<T, kInner, kD, kD, false>(
        dq, [&](int kk, uint32_t(&a)[4]) { acc_to_a<T, kInner>(a, s, kk); }, s_k, lane);
    __syncthreads();  // the stage of tile j is refilled with tile j + 2 in the next iteration
  }
  store_rows<T, kD>(dq, static_cast<float>(p.scale), s_q + warp_row * smem_stride<kD>(),
                    p.grad_q.at<T>(b, h, 0), p.grad_q.row, q0 + warp_row, p.seqlen_q, lane);
}

// dV = P^T dO and dK = scale * dS^T Q for 64 keys, computed transposed (S^T = K Q^T) so that P^T
// and dS^T are the warps' accumulators and serve directly as A operands. Needs seqlen_q >= 1.
template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) attention_bwd_dkdv_kernel(const AttentionParams p) {
  constexpr int kTileM = kBlockRows * smem_stride<kD>(), kTileN = kInner * smem_stride<kD>();
  extern __shared__ __align__(16) unsigned char smem[];
  T* s_k = reinterpret_cast<T*>(smem);
  T* s_v = s_k + kTileM;
  T* s_qdo = s_v + kTileM;  // stage s: Q at s_qdo + 2 s kTileN, dO after it
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t = lane % 4;
  const auto [b, h, k_tile, bh] = tile_index(p.heads, ceil_div(p.seqlen_k, kBlockRows));
  const int k0 = k_tile * kBlockRows;
  const int n_tiles = ceil_div(p.seqlen_q, kInner);
  // Per stage s: lse at s_lse + s kInner, delta at s_delta + s kInner.
  float* s_lse = reinterpret_cast<float*>(s_qdo + 2 * num_stages(n_tiles) * kTileN);
  float* s_delta = s_lse + num_stages(n_tiles) * kInner;
  load_tile_async<T, kBlockRows, kD>(s_k, p.k.at<const T>(b, h, k0), p.k.row, p.seqlen_k - k0);
  load_tile_async<T, kBlockRows, kD>(s_v, p.v.at<const T>(b, h, k0), p.v.row, p.seqlen_k - k0);
  const auto load_q = [&](int i) {
    const int stage = i & 1;
    T* s_q = s_qdo + 2 * stage * kTileN;
    const int64_t q0 = int64_t(i) * kInner;
    load_tile_async<T, kInner, kD>(s_q, p.q.at<const T>(b, h, q0), p.q.row, p.seqlen_q - q0);
    load_tile_async<T, kInner, kD>(s_q + kTileN, p.grad_out.at<const T>(b, h, q0),
                                   p.grad_out.row, p.seqlen_q - q0);
    ptx::cp_async_commit();
    for (int r = threadIdx.x; r < kInner; r += kThreads) {
      const int64_t row = q0 + r, stat = int64_t(bh) * p.seqlen_q + row;
      const bool valid = row < p.seqlen_q;
      s_lse[stage * kInner + r] = valid ? p.lse[stat] * kLog2e : 0.0f;
      s_delta[stage * kInner + r] = valid ? p.delta[stat] : 0.0f;
    }
  };
  load_q(0);  // one group with the K and V tiles

  float dk[kD / 8][4], dv[kD / 8][4];
  zero<kD>(dk);
  zero<kD>(dv);
  const int warp_row = kWarpRows * warp;
  for (int i = 0; i < n_tiles; ++i) {
    if (i + 1 < n_tiles) {
      load_q(i + 1);
      ptx::cp_async_wait<1>();
    } else {
      ptx::cp_async_wait<0>();
    }
    __syncthreads();  // tile i and its lse / delta visible to every warp
    const int stage = i & 1;
    const T* s_q = s_qdo + 2 * stage * kTileN;
    const T* s_do = s_q + kTileN;
    float st[kInner / 8][4], dpt[kInner / 8][4];  // S^T and dP^T: rows keys, columns queries
    zero<kInner>(st);
    zero<kInner>(dpt);
    warp_gemm<T, kD, kInner, kD, true>(
        st, [&](int kk, uint32_t(&a)[4]) { load_a<kD>(a, s_k, warp_row, kk, lane); }, s_q, lane);
    const int valid_cols = p.seqlen_q - i * kInner;
#pragma unroll
    for (int n = 0; n < kInner / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = 8 * n + 2 * t + e % 2;
        st[n][e] = col < valid_cols
                       ? exp2f(st[n][e] * p.scale_log2 - s_lse[stage * kInner + col])
                       : 0.0f;  // P^T
      }
    }
    warp_gemm<T, kInner, kD, kD, false>(
        dv, [&](int kk, uint32_t(&a)[4]) { acc_to_a<T, kInner>(a, st, kk); }, s_do, lane);
    warp_gemm<T, kD, kInner, kD, true>(
        dpt, [&](int kk, uint32_t(&a)[4]) { load_a<kD>(a, s_v, warp_row, kk, lane); }, s_do,
        lane);
#pragma unroll
    for (int n = 0; n < kInner / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        st[n][e] *= dpt[n][e] - s_delta[stage * kInner + 8 * n + 2 * t + e % 2];  // dS^T
      }
    }
    warp_gemm<T, kInner, kD, kD, false>(
        dk, [&](int kk, uint32_t(&a)[4]) { acc_to_a<T, kInner>(a, st, kk); }, s_q, lane);
    __syncthreads();  // the stage of tile i is refilled with tile i + 2 in the next iteration
  }
  store_rows<T, kD>(dk, static_cast<float>(p.scale), s_k + warp_row * smem_stride<kD>(),
                    p.grad_k.at<T>(b, h, 0), p.grad_k.row, k0 + warp_row, p.seqlen_k, lane);
  store_rows<T, kD>(dv, 1.0f, s_v + warp_row * smem_stride<kD>(), p.grad_v.at<T>(b, h, 0),
                    p.grad_v.row, k0 + warp_row, p.seqlen_k, lane);
}

}  // namespace tiles
}  // namespace usfmae

#endif  // USFMAE_ATTENTION_KERNELS_CUH
