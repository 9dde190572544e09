// y [M, N] = x [M, K] · W [N, K]ᵀ in fp32 for a few rows M (a decode step's tokens):
// splitserve.model.packed_linear's path for 1..kMaxRows rows.
//
// A decode step's linears are bound by reading the weights, once per step (540 MB for
// SmolLM2-135M in fp32). On one core of the 2-core box, 8 rows, weights streamed from
// memory: MKL reads them at 5.7 GB/s, oneDNN's packed layout at 9.3, this kernel at
// 12.2 (17 for one row). Each pair of weight rows is read once, as it lies in memory,
// and dotted with up to 8 input rows while in registers (16 accumulators of 16 lanes;
// rows 9..16 take the same pair again, from L1); the inputs come from L1/L2. The rows
// 8 ahead are prefetched into L2: without it the core waits for each pair, and the
// memory time and the compute time add up (8.5 GB/s).
//
// Rounding: each output is its own dot product, in the same order whatever M or the
// other rows are (lane-wise fused multiply-adds over K in steps of 16, the last partial
// step masked, then the 16 lanes added as _mm512_reduce_add_ps does). So a sequence's
// logits do not depend on which sequences share its step. They differ from MKL's in
// the last bits, as oneDNN's do. Without AVX-512 the module reports itself unavailable
// and the caller keeps oneDNN.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <utility>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMaxRows = 16;
constexpr int64_t kGrainRows = 64;  // weight rows per parallel task

#ifdef __AVX512F__
constexpr int kChunk = 8;  // input rows per pass over a pair of weight rows
constexpr int64_t kPrefetchRows = 8;  // weight rows ahead, prefetched into L2

// Rows [n, n + R) of the weight dotted with input rows [0, M): R weight vectors and M
// input vectors per step of K, M * R accumulators (<= 16 + 2 + 8 of 32 registers).
template <int M, int R>
inline void dot_block(const float* x, int64_t K, const float* w, float* y, int64_t N,
                      int64_t n, __mmask16 tail_mask, bool prefetch) {
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  const float* row = w + n * K;
  const float* ahead = row + kPrefetchRows * K;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if (prefetch)
      for (int r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(ahead + r * K + k), _MM_HINT_T1);
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_ps(row + r * K + k);
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(xv, wv[r], acc[r][m]);
    }
  }
  if (k < K) {
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_ps(tail_mask, row + r * K + k);
    for (int m = 0; m < M; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail_mask, x + m * K + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(xv, wv[r], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) y[m * N + n + r] = _mm512_reduce_add_ps(acc[r][m]);
}

// Input rows [0, M) in chunks of kChunk, over weight rows [n_begin, n_end): a pair of
// weight rows is read from memory by the first chunk and from cache by the others.
template <int M>
void dot_rows(const float* x, int64_t K, const float* w, float* y, int64_t N,
              int64_t n_begin, int64_t n_end) {
  constexpr int kFirst = M < kChunk ? M : kChunk;
  const __mmask16 tail_mask = static_cast<__mmask16>((1u << (K % 16)) - 1u);
  int64_t n = n_begin;
  for (; n + 2 <= n_end; n += 2) {
    dot_block<kFirst, 2>(x, K, w, y, N, n, tail_mask, n + kPrefetchRows + 2 <= N);
    if constexpr (M > kChunk)
      dot_block<M - kChunk, 2>(x + kChunk * K, K, w, y + kChunk * N, N, n, tail_mask, false);
  }
  for (; n < n_end; ++n) {
    dot_block<kFirst, 1>(x, K, w, y, N, n, tail_mask, false);
    if constexpr (M > kChunk)
      dot_block<M - kChunk, 1>(x + kChunk * K, K, w, y + kChunk * N, N, n, tail_mask, false);
  }
}

using DotRows = void (*)(const float*, int64_t, const float*, float*, int64_t, int64_t,
                         int64_t);

template <int... Ms>
constexpr DotRows pick(int64_t rows, std::integer_sequence<int, Ms...>) {
  DotRows table[] = {&dot_rows<Ms + 1>...};
  return table[rows - 1];
}
#endif

bool available() {
#ifdef __AVX512F__
  return true;
#else
  return false;
#endif
}

// x [M, K] contiguous fp32 with 1 <= M <= kMaxRows, weight [N, K] contiguous fp32.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& weight) {
  TORCH_CHECK(available(), "small_linear: built without AVX-512");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "small_linear: 2-D operands");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && weight.scalar_type() == torch::kFloat,
              "small_linear: fp32 only");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "small_linear: contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "small_linear: x has ", K, " columns, weight ",
              weight.size(1));
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "small_linear: 1..", kMaxRows, " rows, got ", M);
  auto y = torch::empty({M, N}, x.options());
#ifdef __AVX512F__
  const DotRows run = pick(M, std::make_integer_sequence<int, kMaxRows>{});
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, kGrainRows, [&](int64_t begin, int64_t end) {
    run(xp, K, wp, yp, N, begin, end);
  });
#endif
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &available, "whether this build has the AVX-512 kernel");
  m.def("linear", &linear, "x [M, K] · weight [N, K]ᵀ for M <= max_rows (fp32)");
  m.attr("max_rows") = kMaxRows;
}
