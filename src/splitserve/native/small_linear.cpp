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
// quantized panels (`qlinear`): inputs per GGUF block, and bytes per panel block (16
// rows × 32 inputs) by kind: Q4_1, Q8_0
constexpr int64_t kQBlock = 32;
constexpr int64_t kQuantBytes[] = {320, 544};

#ifdef __AVX512F__
constexpr int kGroupRows = 8;
constexpr int64_t kBlockK = 64;
constexpr int64_t kPrefetchK = 32;
// Row groups up to which the groups share the next block's prefetch (beyond, their
// inputs fill most of L1 and the block would crowd it: 128 rows are 32 KB a block)
constexpr int64_t kAheadMaxGroups = 8;

// The prefetch a tile makes: kStream, each panel's stream kPrefetchK k ahead (one group
// of rows, or many); kAhead, this group's share of the next block (`rows` k rows of
// `panels` panels from `ahead`), spread over its k, so that the weights stream in while
// every group computes, not only while the first one does; kNone, none (weights
// dequantized into L1 just before).
enum class Prefetch { kStream, kAhead, kNone };
struct Ahead {
  const float* ahead = nullptr;
  int64_t rows = 0, panels = 0;
};

// Input rows [0, G) (row stride K) times panels [p, p + T) over k in [k0, k1), the
// weights from w (panel p at k0; panel p + t at w + t * w_stride, k at (k - k0) × 16
// on): the block's sums are stored into y (the first block) or added to it.
template <int G, int T, Prefetch kMode>
void tile(const float* x, int64_t K, const float* w, int64_t w_stride, float* y, int64_t N,
          int64_t p, int64_t k0, int64_t k1, Ahead next) {
  constexpr bool kAhead = kMode == Prefetch::kAhead;
  __m512 acc[G][T];
  for (int m = 0; m < G; ++m)
    for (int t = 0; t < T; ++t) acc[m][t] = _mm512_setzero_ps();
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
      const float* at = w + t * w_stride + (k - k0) * kLanes;
      if (kMode == Prefetch::kStream)
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

using Tile = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t,
                      int64_t, int64_t, int64_t, Ahead);

// Panels per tile for groups of G rows: G × T accumulators, at most 24.
constexpr int tile_panels(int G) { return G <= 4 ? 4 : 3; }

template <int T, Prefetch kMode, int... Gs>
constexpr Tile pick_tile(int rows, std::integer_sequence<int, Gs...>) {
  Tile table[] = {&tile<Gs + 1, T, kMode>...};
  return table[rows - 1];
}

template <Prefetch kMode>
Tile tile_for(int rows, int panels) {
  constexpr auto groups = std::make_integer_sequence<int, kGroupRows>{};
  switch (panels) {
    case 1: return pick_tile<1, kMode>(rows, groups);
    case 2: return pick_tile<2, kMode>(rows, groups);
    case 3: return pick_tile<3, kMode>(rows, groups);
    default: return pick_tile<4, kMode>(rows, groups);
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
        const float* w = panels + (p * K + k0) * kLanes;
        if (!ahead) {
          tile_for<Prefetch::kStream>(here, panels_here)(xm, K, w, K * kLanes, ym, N, p, k0,
                                                         k1, Ahead{});
          continue;
        }
        const int64_t r0 = nk * g / num_groups, r1 = nk * (g + 1) / num_groups;
        const Ahead next{panels + (np * K + nk0 + r0) * kLanes, next_panels ? r1 - r0 : 0,
                         next_panels};
        tile_for<Prefetch::kAhead>(here, panels_here)(xm, K, w, K * kLanes, ym, N, p, k0, k1,
                                                      next);
      }
    }
    p += panels_here;
  }
}

// Weights kept as GGUF quantized them (model/quant.py: `qpack`), dequantized block by
// block into L1 and multiplied by the same tiles in the same order: fp32 outputs with
// the bits of the fp32 panels of the dequantized weight (each weight d × q + m comes
// out exact: d × q needs at most 19 of fp32's 24 bits, so one rounding, as in the
// loader's numpy). A panel block is 16 output rows × 32 k:
//   Q4_1 (kind 0, 320 B): d[16], m[16] fp16, then for i in [0, 16) 16 bytes (one per
//        row) whose low nibble is q at k = i and high nibble at k = i + 16;
//   Q8_0 (kind 1, 544 B): d[16] fp16, then for k in [0, 32) 16 int8 q (one per row).
inline __m512 halves(const uint8_t* b) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
}
inline __m512i bytes16(const uint8_t* b, bool is_signed) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
  return is_signed ? _mm512_cvtepi8_epi32(v) : _mm512_cvtepu8_epi32(v);
}

// one panel block -> dst [32 k][16] fp32
void dequant_q4_1(const uint8_t* b, float* dst) {
  const __m512 d = halves(b), m = halves(b + 32);
  const __m512i low = _mm512_set1_epi32(0xF);
  for (int64_t i = 0; i < 16; ++i) {
    const __m512i q = bytes16(b + 64 + 16 * i, false);
    _mm512_store_ps(dst + i * kLanes,
                    _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_and_si512(q, low)), m));
    _mm512_store_ps(dst + (i + 16) * kLanes,
                    _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), m));
  }
}
void dequant_q8_0(const uint8_t* b, float* dst) {
  const __m512 d = halves(b);
  for (int64_t k = 0; k < kQBlock; ++k)
    _mm512_store_ps(dst + k * kLanes,
                    _mm512_mul_ps(d, _mm512_cvtepi32_ps(bytes16(b + 32 + 16 * k, true))));
}

struct QuantKind {
  int64_t bytes;  // per panel block
  void (*dequant)(const uint8_t*, float*);
};
constexpr QuantKind kQuantKinds[] = {{kQuantBytes[0], &dequant_q4_1},
                                     {kQuantBytes[1], &dequant_q8_0}};

// As `run`, from quantized panels: each block of kBlockK k of the tile's panels is
// dequantized into `buf` once and taken by every group of rows from there; the next
// block's bytes are prefetched meanwhile.
void run_quant(const float* x, int64_t M, int64_t K, const uint8_t* q, QuantKind kind,
               float* y, int64_t N, int64_t p_begin, int64_t p_end) {
  const int64_t num_groups = (M + kGroupRows - 1) / kGroupRows;
  const int rows = static_cast<int>((M + num_groups - 1) / num_groups);
  const int T = tile_panels(rows);
  const int64_t blocks = K / kQBlock, panel_bytes = blocks * kind.bytes;
  alignas(64) float buf[4 * kBlockK * kLanes];
  for (int64_t p = p_begin; p < p_end;) {
    const int panels_here = p + T <= p_end ? T : 1;
    for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
      const int64_t k1 = k0 + kBlockK < K ? k0 + kBlockK : K;
      const int64_t here_bytes = (k1 - k0) / kQBlock * kind.bytes;
      for (int t = 0; t < panels_here; ++t) {
        const uint8_t* src = q + (p + t) * panel_bytes + k0 / kQBlock * kind.bytes;
        for (int64_t off = 0; off < here_bytes; off += 64)  // the next block (or panel)
          _mm_prefetch(reinterpret_cast<const char*>(src + here_bytes + off), _MM_HINT_T0);
        for (int64_t j = 0; j < (k1 - k0) / kQBlock; ++j)
          kind.dequant(src + j * kind.bytes, buf + (t * kBlockK + j * kQBlock) * kLanes);
      }
      for (int64_t m = 0; m < M; m += rows) {
        const int here = static_cast<int>(M - m < rows ? M - m : rows);
        tile_for<Prefetch::kNone>(here, panels_here)(x + m * K, K, buf, kBlockK * kLanes,
                                                     y + m * N, N, p, k0, k1, Ahead{});
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

// y [M, N] for x's M rows over P panels of 16 outputs, after the checks `linear` and
// `qlinear` share
torch::Tensor output_for(const torch::Tensor& x, int64_t P, int64_t N) {
  const int64_t M = x.size(0);
  TORCH_CHECK(N > (P - 1) * kLanes && N <= P * kLanes, "small_linear: ", N,
              " outputs do not fit ", P, " panels");
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "small_linear: 1..", kMaxRows, " rows, got ", M);
  return torch::empty({M, N}, x.options());
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
  auto y = output_for(x, P, N);
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

// x [M, K] contiguous fp32 with 1 <= M <= kMaxRows; qpanels uint8 [P, K / 32, bytes]
// from model/quant.py's `qpack` of an [N, K] weight of `kind` (0 Q4_1, 1 Q8_0).
torch::Tensor qlinear(const torch::Tensor& x, const torch::Tensor& qpanels, int64_t kind,
                      int64_t N) {
  TORCH_CHECK(available(), "small_linear: built without AVX-512");
  TORCH_CHECK(kind == 0 || kind == 1, "small_linear.qlinear: kind 0 (Q4_1) or 1 (Q8_0)");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(),
              "small_linear.qlinear: x [M, K] contiguous fp32");
  TORCH_CHECK(qpanels.dim() == 3 && qpanels.scalar_type() == torch::kUInt8 &&
                  qpanels.is_contiguous(),
              "small_linear.qlinear: qpanels [P, K / 32, bytes] contiguous uint8");
  const int64_t M = x.size(0), K = x.size(1), P = qpanels.size(0);
  TORCH_CHECK(qpanels.size(1) * kQBlock == K && qpanels.size(2) == kQuantBytes[kind],
              "small_linear.qlinear: x has ", K, " columns, qpanels are [", P, ", ",
              qpanels.size(1), ", ", qpanels.size(2), "]");
  auto y = output_for(x, P, N);
#ifdef __AVX512F__
  const float* xp = x.data_ptr<float>();
  const uint8_t* qp = qpanels.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, P, kGrainPanels, [&](int64_t begin, int64_t end) {
    run_quant(xp, M, K, qp, kQuantKinds[kind], yp, N, begin, end);
  });
#endif
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &available, "whether this build has the AVX-512 kernel");
  m.def("pack", &pack, "weight [N, K] -> panels [ceil(N / 16), K, 16] for `linear`");
  m.def("linear", &linear, "x [M, K] · weightᵀ for M <= max_rows, from its panels (fp32)");
  m.def("qlinear", &qlinear,
        "x [M, K] · weightᵀ for M <= max_rows, from quantized panels (GGUF Q4_1 / Q8_0)");
  m.attr("max_rows") = kMaxRows;
}
