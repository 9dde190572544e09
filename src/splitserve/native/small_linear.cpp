// y [M, N] = x [M, K] · W [N, K]ᵀ in fp32 for up to kMaxRows rows (a decode step's
// tokens, a short prefill chunk): splitserve.model.packed_linear's path for them.
//
// A decode step's linears are bound by reading the weights, once per step (540 MB for
// SmolLM2-135M in fp32). The weight is packed once into panels of 16 output rows,
// K-major (`pack`: panel p is W[16p : 16p + 16, :]ᵀ, contiguous, the last one padded
// with zeros), so a panel streams from memory as one run of K × 64 bytes. For each k,
// a few panels' vectors (T of them) are loaded once and multiplied by every input row's
// x[m, k], broadcast: G × T accumulators of 16 outputs, no horizontal sums, and the
// inputs are read as scalars from L1 (one line serves 16 k). Rows come in groups of at
// most 8 (G × T <= 24 of the 32 vector registers); the groups take turns on each block
// of kBlockK k, so a block of weights is read from memory by the first group and from L1
// by the others. Each panel's stream is prefetched kPrefetchK k ahead into L1, except
// with 2 to kAheadMaxGroups groups: then each group prefetches its share of the next
// block, so that the stream goes on while the groups after the first compute (the same
// bits either way). 121 linears, one thread, 16 / 32 / 64 rows: 46.7 / 69.5 / 118.4 ->
// 40.2 / 61.6 / 111.6 ms; with more groups it was no better (128 rows 232 -> 252).
//
// SmolLM2's 121 linears on the 2-core box (Sapphire Rapids, weights streamed from
// memory), ms for 1 / 8 / 12 / 16 / 24 / 32 / 64 / 128 / 256 rows, one thread: this
// kernel 34 / 38 / 41 / 46-48 / 62 / 77 / 140 / 262 / 574; the dot-product kernel it
// replaced (each pair of weight rows dotted with up to 8 rows, a 16-lane sum per output;
// 16 rows at most) 34 / 46 / 51 / 61; oneDNN's packed weight from 24 rows on
// 85 / 99 / 151 / 291 / 496. Two threads, 8 / 16 / 64 / 128 rows: 20 / 25 / 73 / 141
// against 24 / 32 (dot product) and 88 / 149 (oneDNN). Hence kMaxRows: from 256 rows on
// oneDNN is faster.
//
// Rounding: each output is its own sum, in the same order whatever M or the other rows
// are: within a block of kBlockK k, lane-wise fused multiply-adds in k order from zero;
// the blocks' sums added in k order. So a sequence's logits do not depend on which
// sequences share its step; the blocking keeps the error near MKL's (a single running
// sum over K = 1536 had 7× its error). Without AVX-512 the module reports itself
// unavailable and the caller keeps oneDNN.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <utility>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMaxRows = 128;
constexpr int64_t kLanes = 16;  // outputs per panel: one vector
constexpr int64_t kGrainPanels = 12;  // panels per parallel task

#ifdef __AVX512F__
constexpr int kGroupRows = 8;
constexpr int64_t kBlockK = 64;
constexpr int64_t kPrefetchK = 32;
// Row groups up to which the groups share the next block's prefetch (beyond, their
// inputs fill most of L1 and the block would crowd it: 128 rows are 32 KB a block)
constexpr int64_t kAheadMaxGroups = 8;

// The prefetch a tile makes: with kAhead false, each panel's stream kPrefetchK k ahead
// (one group of rows, or many); with kAhead true, this group's share of the next block
// (`rows` k rows of `panels` panels from `ahead`), spread over its k, so that the weights
// stream in while every group computes, not only while the first one does.
struct Ahead {
  const float* ahead = nullptr;
  int64_t rows = 0, panels = 0;
};

// Input rows [0, G) (row stride K) times panels [p, p + T) over k in [k0, k1): the
// block's sums are stored into y (the first block) or added to it.
template <int G, int T, bool kAhead>
void tile(const float* x, int64_t K, const float* panels, float* y, int64_t N, int64_t p,
          int64_t k0, int64_t k1, Ahead next) {
  __m512 acc[G][T];
  for (int m = 0; m < G; ++m)
    for (int t = 0; t < T; ++t) acc[m][t] = _mm512_setzero_ps();
  const float* w = panels + p * K * kLanes;
  const int64_t every = kAhead && next.rows > 0 && next.rows < k1 - k0
                            ? (k1 - k0) / next.rows : 1;
  for (int64_t k = k0, done = 0; k < k1; ++k) {
    if (kAhead && done < next.rows && k - k0 == done * every) {
      for (int64_t t = 0; t < next.panels; ++t)
        _mm_prefetch(reinterpret_cast<const char*>(next.ahead + (t * K + done) * kLanes),
                     _MM_HINT_T0);
      ++done;
    }
    __m512 wv[T];
    for (int t = 0; t < T; ++t) {
      const float* at = w + (t * K + k) * kLanes;
      if (!kAhead)
        _mm_prefetch(reinterpret_cast<const char*>(at + kPrefetchK * kLanes), _MM_HINT_T0);
      wv[t] = _mm512_loadu_ps(at);
    }
    for (int m = 0; m < G; ++m) {
      const __m512 xv = _mm512_set1_ps(x[m * K + k]);
      for (int t = 0; t < T; ++t) acc[m][t] = _mm512_fmadd_ps(xv, wv[t], acc[m][t]);
    }
  }
  for (int t = 0; t < T; ++t) {
    const int64_t n = (p + t) * kLanes;
    const __mmask16 mask = N - n >= kLanes ? static_cast<__mmask16>(0xffff)
                                           : static_cast<__mmask16>((1u << (N - n)) - 1u);
    for (int m = 0; m < G; ++m) {
      float* out = y + m * N + n;
      const __m512 sum = k0 == 0 ? acc[m][t]
                                 : _mm512_add_ps(_mm512_maskz_loadu_ps(mask, out), acc[m][t]);
      _mm512_mask_storeu_ps(out, mask, sum);
    }
  }
}

using Tile = void (*)(const float*, int64_t, const float*, float*, int64_t, int64_t,
                      int64_t, int64_t, Ahead);

// Panels per tile for groups of G rows: G × T accumulators, at most 24.
constexpr int tile_panels(int G) { return G <= 4 ? 4 : 3; }

template <int T, bool kAhead, int... Gs>
constexpr Tile pick_tile(int rows, std::integer_sequence<int, Gs...>) {
  Tile table[] = {&tile<Gs + 1, T, kAhead>...};
  return table[rows - 1];
}

template <bool kAhead>
Tile tile_for(int rows, int panels) {
  constexpr auto groups = std::make_integer_sequence<int, kGroupRows>{};
  switch (panels) {
    case 1: return pick_tile<1, kAhead>(rows, groups);
    case 2: return pick_tile<2, kAhead>(rows, groups);
    case 3: return pick_tile<3, kAhead>(rows, groups);
    default: return pick_tile<4, kAhead>(rows, groups);
  }
}

// All M rows over panels [p_begin, p_end): tiles of T panels (the rest one by one), each
// in blocks of kBlockK k, each block taken by every group of rows in turn.
void run(const float* x, int64_t M, int64_t K, const float* panels, float* y, int64_t N,
         int64_t p_begin, int64_t p_end) {
  const int64_t num_groups = (M + kGroupRows - 1) / kGroupRows;
  const int rows = static_cast<int>((M + num_groups - 1) / num_groups);
  const int T = tile_panels(rows);
  const bool ahead = num_groups > 1 && num_groups <= kAheadMaxGroups;
  for (int64_t p = p_begin; p < p_end;) {
    const int panels_here = p + T <= p_end ? T : 1;
    for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
      const int64_t k1 = k0 + kBlockK < K ? k0 + kBlockK : K;
      // the next block (shared out with `ahead`): these panels' next k, or the next
      // panels' first
      const int64_t np = k1 < K ? p : p + panels_here, nk0 = k1 < K ? k1 : 0;
      const int64_t nk = (nk0 + kBlockK < K ? nk0 + kBlockK : K) - nk0;
      const int64_t next_panels = np >= p_end ? 0 : np + T <= p_end ? T : 1;
      for (int64_t m = 0, g = 0; m < M; m += rows, ++g) {
        const int here = static_cast<int>(M - m < rows ? M - m : rows);
        const float* xm = x + m * K;
        float* ym = y + m * N;
        if (!ahead) {
          tile_for<false>(here, panels_here)(xm, K, panels, ym, N, p, k0, k1, Ahead{});
          continue;
        }
        const int64_t r0 = nk * g / num_groups, r1 = nk * (g + 1) / num_groups;
        const Ahead next{panels + (np * K + nk0 + r0) * kLanes, next_panels ? r1 - r0 : 0,
                         next_panels};
        tile_for<true>(here, panels_here)(xm, K, panels, ym, N, p, k0, k1, next);
      }
    }
    p += panels_here;
  }
}
#endif

bool available() {
#ifdef __AVX512F__
  return true;
#else
  return false;
#endif
}

// weight [N, K] fp32 -> panels [ceil(N / 16), K, 16]
torch::Tensor pack(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kFloat,
              "small_linear.pack: a 2-D fp32 weight");
  const int64_t N = weight.size(0), K = weight.size(1);
  const int64_t P = (N + kLanes - 1) / kLanes;
  auto padded = torch::zeros({P * kLanes, K}, weight.options());
  padded.narrow(0, 0, N).copy_(weight);
  return padded.view({P, kLanes, K}).transpose(1, 2).contiguous();
}

// x [M, K] contiguous fp32 with 1 <= M <= kMaxRows, panels from `pack` of an [N, K]
// weight.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& panels, int64_t N) {
  TORCH_CHECK(available(), "small_linear: built without AVX-512");
  TORCH_CHECK(x.dim() == 2 && panels.dim() == 3, "small_linear: x [M, K], panels [P, K, 16]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && panels.scalar_type() == torch::kFloat,
              "small_linear: fp32 only");
  TORCH_CHECK(x.is_contiguous() && panels.is_contiguous(), "small_linear: contiguous");
  const int64_t M = x.size(0), K = x.size(1), P = panels.size(0);
  TORCH_CHECK(panels.size(1) == K && panels.size(2) == kLanes, "small_linear: x has ", K,
              " columns, panels are [", P, ", ", panels.size(1), ", ", panels.size(2), "]");
  TORCH_CHECK(N > (P - 1) * kLanes && N <= P * kLanes, "small_linear: ", N,
              " outputs do not fit ", P, " panels");
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "small_linear: 1..", kMaxRows, " rows, got ", M);
  auto y = torch::empty({M, N}, x.options());
#ifdef __AVX512F__
  const float* xp = x.data_ptr<float>();
  const float* wp = panels.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, P, kGrainPanels, [&](int64_t begin, int64_t end) {
    run(xp, M, K, wp, yp, N, begin, end);
  });
#endif
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &available, "whether this build has the AVX-512 kernel");
  m.def("pack", &pack, "weight [N, K] -> panels [ceil(N / 16), K, 16] for `linear`");
  m.def("linear", &linear, "x [M, K] · weightᵀ for M <= max_rows, from its panels (fp32)");
  m.attr("max_rows") = kMaxRows;
}
