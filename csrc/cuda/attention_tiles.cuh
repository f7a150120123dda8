// Warp-level tensor-core building blocks of the attention kernels (sm_80 and newer): tiles copied
// to shared memory with cp.async, fragments read with ldmatrix, and the m16n8k16 bf16/fp16 mma
// with fp32 accumulation (PTX ISA "Warp-level matrix fragments for mma.m16n8k16").
//
// Fragment layout used throughout (lane = 4 * g + t):
//   accumulator float acc[n][4] of a 16 x 8 tile n: acc[n][e] is (row g + 8 * (e / 2),
//   column 8 * n + 2 * t + e % 2);
//   A operand (16 x 16) uint32 a[4]: pairs (row g, k 2t..2t+1), (g + 8, 2t..), (g, 2t + 8..),
//   (g + 8, 2t + 8..); B operand (16 x 8) b0, b1: pairs (k 2t..2t+1, column g), (k 2t + 8.., g).
#ifndef USFMAE_ATTENTION_TILES_CUH
#define USFMAE_ATTENTION_TILES_CUH

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace usfmae {
namespace tiles {

namespace ptx {

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; the destination is zero-filled when !valid (src is
// then not read but must still be a valid address).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)),
               "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Four 8 x 8 b16 matrices; lane i gives the address of row i % 8 of matrix i / 8, and r[m] gets
// the pair (row g, columns 2t..2t+1) of matrix m, or (rows 2t..2t+1, column g) with kTrans.
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_address) {
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row_address))
                 : "memory");
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row_address))
                 : "memory");
  }
}

// acc (16 x 8, fp32) += a (16 x 16) * b (16 x 8) with T = c10::BFloat16 or c10::Half.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same_v<T, c10::Half>, "mma_16816: bf16 or fp16 operands only");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

}  // namespace ptx

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kWarpRows = 16;                  // rows of the mma tile a warp owns
constexpr int kBlockRows = kWarps * kWarpRows;  // rows a CTA owns

// Shared-memory tiles are row-major [rows][kD + 8]: the 16-byte pad moves each row by four banks,
// so the eight rows of every ldmatrix phase hit distinct banks without a swizzle.
template <int kD>
constexpr int smem_stride() {
  return kD + 8;
}

// Two values as one 32-bit register of T pairs, the first in the low half (the lower column).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return static_cast<uint32_t>(T(lo).x) | (static_cast<uint32_t>(T(hi).x) << 16);
}

// Copies rows [0, kRows) x columns [0, kD) of a T matrix (row stride row_stride elements; 16-byte
// aligned rows) into a shared tile, zero-filling rows >= valid_rows. All kThreads threads call it.
template <typename T, int kRows, int kD>
__device__ __forceinline__ void load_tile_async(T* tile, const T* src, int64_t row_stride,
                                                int valid_rows) {
  constexpr int kChunksPerRow = kD * static_cast<int>(sizeof(T)) / 16;
  constexpr int kElemsPerChunk = 16 / static_cast<int>(sizeof(T));
  for (int chunk = threadIdx.x; chunk < kRows * kChunksPerRow; chunk += kThreads) {
    const int row = chunk / kChunksPerRow;
    const int col = (chunk % kChunksPerRow) * kElemsPerChunk;
    const bool valid = row < valid_rows;
    ptx::cp_async_16(tile + row * smem_stride<kD>() + col,
                     valid ? src + row * row_stride + col : src, valid);
  }
}

// A operand of rows [row0, row0 + 16) x columns [16 kk, 16 kk + 16) of a row-major shared tile.
template <int kD, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int row0, int kk,
                                       int lane) {
  ptx::ldmatrix_x4<false>(a, tile + (row0 + (lane & 15)) * smem_stride<kD>() + 16 * kk +
                                 (lane >> 4) * 8);
}

// A operand for k-step kk taken from a 16 x (16 * steps) fp32 accumulator (P or dS), rounded to T.
template <typename T, int kN>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&acc)[kN / 8][4], int kk) {
  a[0] = pack2<T>(acc[2 * kk][0], acc[2 * kk][1]);
  a[1] = pack2<T>(acc[2 * kk][2], acc[2 * kk][3]);
  a[2] = pack2<T>(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
  a[3] = pack2<T>(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
}

// acc (16 x kN) += A (16 x kK) * B for one warp. next_a(kk, a) yields A's k-step kk. B comes from
// a shared tile of row stride smem_stride<kD>(): stored [n][k] when kBStoredNK (B = tile^T, e.g.
// K in Q K^T) or [k][n] otherwise (e.g. V in P V). One ldmatrix feeds two n8 tiles.
template <typename T, int kK, int kN, int kD, bool kBStoredNK, typename NextA>
__device__ __forceinline__ void warp_gemm(float (&acc)[kN / 8][4], NextA next_a, const T* b_tile,
                                          int lane) {
  constexpr int kStride = smem_stride<kD>();
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    uint32_t a[4];
    next_a(kk, a);
#pragma unroll
    for (int nn = 0; nn < kN / 16; ++nn) {
      uint32_t b[4];
      if constexpr (kBStoredNK) {
        ptx::ldmatrix_x4<false>(b, b_tile + (16 * nn + (lane & 15)) * kStride + 16 * kk +
                                       (lane >> 4) * 8);
        ptx::mma_16816<T>(acc[2 * nn], a, b[0], b[2]);
        ptx::mma_16816<T>(acc[2 * nn + 1], a, b[1], b[3]);
      } else {
        ptx::ldmatrix_x4<true>(b, b_tile + (16 * kk + (lane & 15)) * kStride + 16 * nn +
                                      (lane >> 4) * 8);
        ptx::mma_16816<T>(acc[2 * nn], a, b[0], b[1]);
        ptx::mma_16816<T>(acc[2 * nn + 1], a, b[2], b[3]);
      }
    }
  }
}

template <int kN>
__device__ __forceinline__ void zero(float (&acc)[kN / 8][4]) {
#pragma unroll
  for (int n = 0; n < kN / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.0f;
  }
}

// Writes a warp's 16 x kD accumulator (times `factor`, rounded to T) as rows [row0, row0 + 16) of
// the matrix at dst (row stride dst_stride), rows >= n_rows left out. Staged through `stage`, the
// warp's own 16 rows of a shared tile (no longer needed), so that global stores are 16 bytes wide.
template <typename T, int kD>
__device__ __forceinline__ void store_rows(const float (&acc)[kD / 8][4], float factor, T* stage,
                                           T* dst, int64_t dst_stride, int row0, int n_rows,
                                           int lane) {
  constexpr int kStride = smem_stride<kD>();
  const int g = lane >> 2, t = lane & 3;
  __syncwarp();  // every lane's ldmatrix reads of these rows are done
#pragma unroll
  for (int n = 0; n < kD / 8; ++n) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      *reinterpret_cast<uint32_t*>(stage + (g + 8 * half) * kStride + 8 * n + 2 * t) =
          pack2<T>(acc[n][2 * half] * factor, acc[n][2 * half + 1] * factor);
    }
  }
  __syncwarp();
  constexpr int kChunksPerRow = kD / 8;
  for (int chunk = lane; chunk < kWarpRows * kChunksPerRow; chunk += 32) {
    const int row = chunk / kChunksPerRow, col = (chunk % kChunksPerRow) * 8;
    if (row0 + row < n_rows) {
      *reinterpret_cast<uint4*>(dst + (row0 + row) * dst_stride + col) =
          *reinterpret_cast<const uint4*>(stage + row * kStride + col);
    }
  }
}

// Max and sum over the four lanes (t = 0..3) that hold one accumulator row.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace tiles
}  // namespace usfmae

#endif  // USFMAE_ATTENTION_TILES_CUH
