// Non-causal softmax attention on the CPU. One strided implementation serves the plain [B, H, N, d]
// and the packed [B, N, 3, H, d] layouts: a head is a base pointer plus strides. Heads run in
// parallel; each converts its rows to fp32 (fp64 for fp64 inputs) tiles whose rows are padded with
// zeros to whole register blocks, multiplies them with a register-blocked kernel and takes
// full-row softmaxes (N is short in ViTs: 50-200).
//
// The per-head code is force-inlined into two entry points: the baseline ISA with 16-byte vectors
// and, on x86-64, AVX2 + FMA with 32-byte vectors, taken where torch runs its AVX2 or AVX512
// kernels. The vectors are GCC/Clang vector types: at::vec::Vectorized outside ATen's per-ISA
// builds is its generic array fallback, which compiles to scalar code that spills its accumulators.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "../attention_checks.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define USFMAE_X86_AVX2_PATH 1
#endif

namespace usfmae {
namespace {

constexpr int kBlockRows = 4;
constexpr int kBlockBytes = 64;  // columns of a register block: 16 floats or 8 doubles
template <typename T>
constexpr int64_t kBlockCols = kBlockBytes / sizeof(T);

template <typename T, int kBytes>
struct Simd {
  typedef T vec __attribute__((vector_size(kBytes)));
  static constexpr int kLanes = kBytes / sizeof(T);
  static constexpr int kPerBlock = kBlockBytes / kBytes;
};

int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// [B, H, N, d] view of a plain or packed tensor; unit stride along d.
template <typename T>
struct Heads {
  T* data;
  int64_t stride_b, stride_h, stride_n;
  explicit Heads(const at::Tensor& t)
      : data(static_cast<T*>(t.data_ptr())), stride_b(t.stride(0)), stride_h(t.stride(1)),
        stride_n(t.stride(2)) {}
  T* head(int64_t b, int64_t h) const { return data + b * stride_b + h * stride_h; }
};

// c[i, j] = alpha * sum_p a[i, p] b[p, j] for rows i < kRows and one block of columns j. a has any
// strides (its elements are broadcast), b and c are row-major.
template <int kBytes, int kRows, typename T>
C10_ALWAYS_INLINE void gemm_block(int64_t depth, T alpha, const T* a, int64_t a_rs, int64_t a_cs,
                                  const T* b, int64_t ldb, T* c, int64_t ldc) {
  using S = Simd<T, kBytes>;
  using vec = typename S::vec;
  vec acc[kRows][S::kPerBlock] = {};
  for (int64_t p = 0; p < depth; ++p) {
    vec b_row[S::kPerBlock];
    // One copy per vector: a wider one goes through the stack and defeats store forwarding.
    for (int v = 0; v < S::kPerBlock; ++v) {
      std::memcpy(&b_row[v], b + p * ldb + v * S::kLanes, sizeof(vec));
    }
    for (int r = 0; r < kRows; ++r) {
      const T a_rp = a[r * a_rs + p * a_cs];
      for (int v = 0; v < S::kPerBlock; ++v) acc[r][v] += a_rp * b_row[v];
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < S::kPerBlock; ++v) {
      const vec out = acc[r][v] * alpha;
      std::memcpy(c + r * ldc + v * S::kLanes, &out, sizeof(vec));
    }
  }
}

// c[m, n] = alpha * a[m, depth] b[depth, n]; n is a multiple of kBlockCols<T>.
template <int kBytes, typename T>
C10_ALWAYS_INLINE void gemm(int64_t m, int64_t n, int64_t depth, T alpha, const T* a, int64_t a_rs,
                            int64_t a_cs, const T* b, int64_t ldb, T* c, int64_t ldc) {
  for (int64_t j = 0; j < n; j += kBlockCols<T>) {
    int64_t i = 0;
    for (; i + kBlockRows <= m; i += kBlockRows) {
      gemm_block<kBytes, kBlockRows>(depth, alpha, a + i * a_rs, a_rs, a_cs, b + j, ldb,
                                     c + i * ldc + j, ldc);
    }
    for (; i < m; ++i) {
      gemm_block<kBytes, 1>(depth, alpha, a + i * a_rs, a_rs, a_cs, b + j, ldb, c + i * ldc + j,
                            ldc);
    }
  }
}

// row[j] = exp(row[j] - shift) for j < count (a multiple of the vector width); returns the sum.
// In float, exp is a branch-free polynomial (within 2 ulp) scaled by 2^n built from its bits, and
// flushed to 0 below -87, where 2^n would leave the normal range; NaN passes through.
template <int kBytes, typename T>
C10_ALWAYS_INLINE T exp_shifted(T* row, int64_t count, T shift) {
  using S = Simd<T, kBytes>;
  using vec = typename S::vec;
  vec sum = {};
  for (int64_t j = 0; j < count; j += S::kLanes) {
    vec x;
    std::memcpy(&x, row + j, sizeof(vec));
    x -= shift;
    vec e;
    if constexpr (std::is_same_v<T, float>) {
      using bits = typename Simd<uint32_t, kBytes>::vec;
      const vec zero = {}, one = zero + 1.0f, max_arg = zero + 88.0f, min_arg = zero - 87.0f;
      x = x > max_arg ? max_arg : x;
      const vec shift_to_int = zero + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
      const vec shifted = x * 1.44269504f + shift_to_int;
      const vec n = shifted - shift_to_int;
      const vec r = (x - n * 0.693145751953125f) - n * 1.42860677e-6f;  // |r| <= ln 2 / 2
      const vec poly = one + r * (one + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (
                           1.0f / 120 + r * (1.0f / 720 + r * (1.0f / 5040)))))));  // Taylor
      const bits pow2 = ((bits)shifted - 0x4B400000u + 127u) << 23;  // low bits of shifted: n
      e = x < min_arg ? zero : poly * (vec)pow2;
    } else {
      for (int lane = 0; lane < S::kLanes; ++lane) e[lane] = std::exp(x[lane]);
    }
    std::memcpy(row + j, &e, sizeof(vec));
    sum += e;
  }
  T total = 0;
  for (int lane = 0; lane < S::kLanes; ++lane) total += sum[lane];
  return total;
}

template <typename T, typename scalar_t>
C10_ALWAYS_INLINE void load_rows(const scalar_t* src, int64_t stride, int64_t rows, int64_t cols,
                                 T* dst, int64_t ld) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t c = 0; c < cols; ++c) dst[i * ld + c] = static_cast<T>(src[i * stride + c]);
  }
}

template <typename T, typename scalar_t>
C10_ALWAYS_INLINE void load_transposed(const scalar_t* src, int64_t stride, int64_t rows,
                                       int64_t cols, T* dst, int64_t ld) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t c = 0; c < cols; ++c) dst[c * ld + i] = static_cast<T>(src[i * stride + c]);
  }
}

template <typename T, typename scalar_t>
C10_ALWAYS_INLINE void store_rows(const T* src, int64_t ld, int64_t rows, int64_t cols,
                                  scalar_t* dst, int64_t stride) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t c = 0; c < cols; ++c) dst[i * stride + c] = static_cast<scalar_t>(src[i * ld + c]);
  }
}

// Softmax of row[0, n) in place; row[n, count) becomes 0. Returns the log-sum-exp.
template <int kBytes, typename T>
C10_ALWAYS_INLINE T softmax_row(T* row, int64_t n, int64_t count) {
  using S = Simd<T, kBytes>;
  using vec = typename S::vec;
  std::fill(row + n, row + count, -std::numeric_limits<T>::infinity());
  vec lane_max = vec{} - std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < count; j += S::kLanes) {
    vec x;
    std::memcpy(&x, row + j, sizeof(vec));
    lane_max = x > lane_max ? x : lane_max;
  }
  T max = lane_max[0];
  for (int lane = 1; lane < S::kLanes; ++lane) max = std::max(max, T(lane_max[lane]));
  const T sum = exp_shifted<kBytes>(row, count, max);
  const T inv_sum = T(1) / sum;
  for (int64_t j = 0; j < count; ++j) row[j] *= inv_sum;
  return max + std::log(sum);
}

template <typename scalar_t>
struct ForwardKernel {
  using T = at::opmath_type<scalar_t>;
  Heads<const scalar_t> q, k, v;
  Heads<scalar_t> out;
  float* lse;
  int64_t heads, n, d;
  T scale;

  template <int kBytes>
  C10_ALWAYS_INLINE void run(int64_t begin, int64_t end) const {
    const int64_t ldd = round_up(d, kBlockCols<T>), ldn = round_up(n, kBlockCols<T>);
    // Zero-filled once: loads write only real rows and columns, so the padding stays zero.
    std::vector<T> workspace(3 * n * ldd + d * ldn + n * ldn);
    T* q_tile = workspace.data();
    T* v_tile = q_tile + n * ldd;
    T* out_tile = v_tile + n * ldd;
    T* k_transposed = out_tile + n * ldd;
    T* probs = k_transposed + d * ldn;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      load_rows(q.head(b, h), q.stride_n, n, d, q_tile, ldd);
      load_transposed(k.head(b, h), k.stride_n, n, d, k_transposed, ldn);
      load_rows(v.head(b, h), v.stride_n, n, d, v_tile, ldd);
      gemm<kBytes>(n, ldn, d, scale, q_tile, ldd, 1, k_transposed, ldn, probs, ldn);
      for (int64_t i = 0; i < n; ++i) {
        lse[bh * n + i] = static_cast<float>(softmax_row<kBytes>(probs + i * ldn, n, ldn));
      }
      gemm<kBytes>(n, ldd, n, T(1), probs, ldn, 1, v_tile, ldd, out_tile, ldd);
      store_rows(out_tile, ldd, n, d, out.head(b, h), out.stride_n);
    }
  }
};

template <typename scalar_t>
struct BackwardKernel {
  using T = at::opmath_type<scalar_t>;
  Heads<const scalar_t> grad_out, q, k, v, out;
  Heads<scalar_t> grad_q, grad_k, grad_v;
  const float* lse;
  int64_t heads, n, d;
  T scale;

  template <int kBytes>
  C10_ALWAYS_INLINE void run(int64_t begin, int64_t end) const {
    const int64_t ldd = round_up(d, kBlockCols<T>), ldn = round_up(n, kBlockCols<T>);
    std::vector<T> workspace(4 * n * ldd + 2 * d * ldn + 2 * n * ldn);
    T* q_tile = workspace.data();
    T* k_tile = q_tile + n * ldd;
    T* go_tile = k_tile + n * ldd;
    T* grad_tile = go_tile + n * ldd;
    T* k_transposed = grad_tile + n * ldd;
    T* v_transposed = k_transposed + d * ldn;
    T* probs = v_transposed + d * ldn;
    T* grad_scores = probs + n * ldn;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      load_rows(q.head(b, h), q.stride_n, n, d, q_tile, ldd);
      load_rows(k.head(b, h), k.stride_n, n, d, k_tile, ldd);
      load_transposed(k.head(b, h), k.stride_n, n, d, k_transposed, ldn);
      load_transposed(v.head(b, h), v.stride_n, n, d, v_transposed, ldn);
      load_rows(grad_out.head(b, h), grad_out.stride_n, n, d, go_tile, ldd);
      // P = exp(scale q k^T - lse); dP = dO v^T; dS = P * (dP - rowsum(dO * O))
      gemm<kBytes>(n, ldn, d, scale, q_tile, ldd, 1, k_transposed, ldn, probs, ldn);
      gemm<kBytes>(n, ldn, d, T(1), go_tile, ldd, 1, v_transposed, ldn, grad_scores, ldn);
      const scalar_t* out_head = out.head(b, h);
      for (int64_t i = 0; i < n; ++i) {
        const T row_lse = static_cast<T>(lse[bh * n + i]);
        const scalar_t* out_row = out_head + i * out.stride_n;
        const T* go_row = go_tile + i * ldd;
        T delta = 0;
        for (int64_t c = 0; c < d; ++c) delta += go_row[c] * static_cast<T>(out_row[c]);
        T* p_row = probs + i * ldn;
        T* ds_row = grad_scores + i * ldn;
        exp_shifted<kBytes>(p_row, ldn, row_lse);  // beyond n: values that are never read
        for (int64_t j = 0; j < ldn; ++j) ds_row[j] = p_row[j] * (ds_row[j] - delta);
      }
      // dV = P^T dO, dQ = scale dS k, dK = scale dS^T q
      gemm<kBytes>(n, ldd, n, T(1), probs, 1, ldn, go_tile, ldd, grad_tile, ldd);
      store_rows(grad_tile, ldd, n, d, grad_v.head(b, h), grad_v.stride_n);
      gemm<kBytes>(n, ldd, n, scale, grad_scores, ldn, 1, k_tile, ldd, grad_tile, ldd);
      store_rows(grad_tile, ldd, n, d, grad_q.head(b, h), grad_q.stride_n);
      gemm<kBytes>(n, ldd, n, scale, grad_scores, 1, ldn, q_tile, ldd, grad_tile, ldd);
      store_rows(grad_tile, ldd, n, d, grad_k.head(b, h), grad_k.stride_n);
    }
  }
};

#ifdef USFMAE_X86_AVX2_PATH
template <typename Kernel>
__attribute__((target("avx2,fma"))) void run_avx2(const Kernel& kernel, int64_t begin,
                                                  int64_t end) {
  kernel.template run<32>(begin, end);
}

// Torch's own pick (cpuinfo, overridable with ATEN_CPU_CAPABILITY): AVX2 and AVX512 imply FMA.
bool use_avx2() {
  static const bool avx2 = [] {
    const std::string capability = at::get_cpu_capability();
    return capability == "AVX2" || capability == "AVX512";
  }();
  return avx2;
}
#endif

// Runs the kernel over heads [0, count) in parallel with the widest vectors the CPU supports.
template <typename Kernel>
void run_heads(const Kernel& kernel, int64_t count) {
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
#ifdef USFMAE_X86_AVX2_PATH
    if (use_avx2()) return run_avx2(kernel, begin, end);
#endif
    kernel.template run<16>(begin, end);
  });
}

// Fills out and lse from q, k, v; all four are [B, H, N, d] views.
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
             const at::Tensor& lse, double scale) {
  if (q.numel() == 0) {  // d = 0: every score is 0; nothing else to compute
    lse.fill_(std::log(static_cast<double>(q.size(2))));
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_fwd_cpu",
                                  [&] {
    using T = at::opmath_type<scalar_t>;
    const ForwardKernel<scalar_t> kernel{
        Heads<const scalar_t>(q), Heads<const scalar_t>(k), Heads<const scalar_t>(v),
        Heads<scalar_t>(out), lse.mutable_data_ptr<float>(), q.size(1), q.size(2), q.size(3),
        static_cast<T>(scale)};
    run_heads(kernel, q.size(0) * q.size(1));
  });
}

void backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
              const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
              const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_v,
              double scale) {
  if (q.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_bwd_cpu",
                                  [&] {
    using T = at::opmath_type<scalar_t>;
    const BackwardKernel<scalar_t> kernel{
        Heads<const scalar_t>(grad_out), Heads<const scalar_t>(q), Heads<const scalar_t>(k),
        Heads<const scalar_t>(v), Heads<const scalar_t>(out), Heads<scalar_t>(grad_q),
        Heads<scalar_t>(grad_k), Heads<scalar_t>(grad_v), lse.const_data_ptr<float>(),
        q.size(1), q.size(2), q.size(3), static_cast<T>(scale)};
    run_heads(kernel, q.size(0) * q.size(1));
  });
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v, double scale) {
  check_attention(q, k, v, scale);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  forward(q, k, v, out, lse, scale);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale) {
  check_attention_backward(grad_out, q, k, v, out, lse, scale);
  at::Tensor grad_q = at::empty(q.sizes(), q.options());
  at::Tensor grad_k = at::empty(q.sizes(), q.options());
  at::Tensor grad_v = at::empty(q.sizes(), q.options());
  backward(grad_out, q, k, v, out, lse, grad_q, grad_k, grad_v, scale);
  return {grad_q, grad_k, grad_v};
}

// [B, N, (3,) H, d] -> [B, H, N, d] view.
at::Tensor heads_first(const at::Tensor& t) { return t.transpose(1, 2); }

std::tuple<at::Tensor, at::Tensor> attention_packed_fwd_cpu(const at::Tensor& qkv, double scale) {
  check_attention_packed(qkv, scale);
  const int64_t batch = qkv.size(0), n = qkv.size(1), heads = qkv.size(3), d = qkv.size(4);
  at::Tensor out = at::empty({batch, n, heads * d}, qkv.options());
  at::Tensor lse = at::empty({batch, heads, n}, qkv.options().dtype(at::kFloat));
  forward(heads_first(qkv.select(2, 0)), heads_first(qkv.select(2, 1)),
          heads_first(qkv.select(2, 2)), heads_first(out.view({batch, n, heads, d})), lse, scale);
  return {out, lse};
}

at::Tensor attention_packed_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& qkv,
                                    const at::Tensor& out, const at::Tensor& lse, double scale) {
  check_attention_packed_backward(grad_out, qkv, out, lse, scale);
  const int64_t heads = qkv.size(3), d = qkv.size(4);
  at::Tensor grad_qkv = at::empty(qkv.sizes(), qkv.options());
  backward(heads_first(grad_out.unflatten(2, {heads, d})), heads_first(qkv.select(2, 0)),
           heads_first(qkv.select(2, 1)), heads_first(qkv.select(2, 2)),
           heads_first(out.unflatten(2, {heads, d})), lse, heads_first(grad_qkv.select(2, 0)),
           heads_first(grad_qkv.select(2, 1)), heads_first(grad_qkv.select(2, 2)), scale);
  return grad_qkv;
}

}  // namespace

TORCH_LIBRARY_IMPL(usfmae, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
  m.impl("attention_packed_fwd", &attention_packed_fwd_cpu);
  m.impl("attention_packed_bwd", &attention_packed_bwd_cpu);
}

}  // namespace usfmae
