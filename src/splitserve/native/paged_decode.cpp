// The KV pages' native ops for the CPU (splitserve.engine.native_attention): decode
// attention over the pages in place, and the store of a step's new K/V rows.
//
// Decode attention:
// One query token per sequence attends over its first seq_lens[b] tokens, read from
// the pages named by its page table: no copy of K/V, math in fp32, one rounding of
// the output to the KV dtype. Work is split over (sequence, KV head) pairs; the
// query heads of a KV head's group share each K/V row read. The common head sizes and
// group sizes are compiled as constants, which lets the compiler keep the group's
// queries in registers and unroll the row loops (SmolLM2's 64 and 3, 16 sequences of
// 100-400 tokens, 2 threads: fp32 458 -> 299 us, bf16 283 -> 193 us per call, same bits);
// with AVX-512 they go to `decode_kernel_avx512` (below: 213 and 111 us).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "dtype.h"

#ifdef __AVX512F__
#include <immintrin.h>
extern "C" __m512 Sleef_expf16_u10(__m512);
#endif

namespace {

using splitserve::to_float;

template <typename scalar_t>
inline void load_row(const scalar_t* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

// One paged_decode call's tensors as pointers and strides, and the addressing both
// kernels share: work item (sequence b, KV head h) -> its queries, K/V rows, outputs.
template <typename scalar_t>
struct DecodeCall {
  DecodeCall(const torch::Tensor& q, const torch::Tensor& kv, const torch::Tensor& tables,
             const torch::Tensor& lens, torch::Tensor& out, double scale)
      : num_seqs(q.size(0)), num_heads(q.size(1)), num_kv_heads(kv.size(3)),
        page_size(kv.size(2)), width(tables.size(1)), q_ptr(q.data_ptr<scalar_t>()),
        kv_ptr(kv.data_ptr<scalar_t>()), out_ptr(out.data_ptr<scalar_t>()),
        table_ptr(tables.data_ptr<int64_t>()), len_ptr(lens.data_ptr<int64_t>()),
        q_s0(q.stride(0)), q_s1(q.stride(1)), o_s0(out.stride(0)), o_s1(out.stride(1)),
        page_s(kv.stride(0)), v_off(kv.stride(1)), tok_s(kv.stride(2)), head_s(kv.stride(3)),
        scale(static_cast<float>(scale)) {}

  const int64_t num_seqs, num_heads, num_kv_heads, page_size, width;
  const scalar_t* q_ptr;
  const scalar_t* kv_ptr;
  scalar_t* out_ptr;
  const int64_t* table_ptr;
  const int64_t* len_ptr;
  const int64_t q_s0, q_s1, o_s0, o_s1, page_s, v_off, tok_s, head_s;
  const float scale;

  int64_t num_items() const { return num_seqs * num_kv_heads; }
  const int64_t* pages(int64_t b) const { return table_ptr + b * width; }
  // the first K (or V) row of KV head h in page `page_id`; the page's next rows follow
  // tok_s apart
  const scalar_t* page_rows(int64_t page_id, int64_t h, bool value) const {
    return kv_ptr + page_id * page_s + (value ? v_off : 0) + h * head_s;
  }
  // query head `head` of sequence b, times the scale, in fp32
  void load_query(int64_t b, int64_t head, int64_t head_dim, float* dst) const {
    const scalar_t* src = q_ptr + b * q_s0 + head * q_s1;
    for (int64_t d = 0; d < head_dim; ++d) dst[d] = to_float(src[d]) * scale;
  }
  scalar_t* out_row(int64_t b, int64_t head) const { return out_ptr + b * o_s0 + head * o_s1; }
};

// kHeadDim, kGroup: the head size and query heads per KV head, or 0 (read at run time)
template <typename scalar_t, int64_t kHeadDim, int64_t kGroup>
void decode_kernel(const torch::Tensor& q, const torch::Tensor& kv, const torch::Tensor& tables,
                   const torch::Tensor& lens, torch::Tensor& out, double scale) {
  const DecodeCall<scalar_t> call(q, kv, tables, lens, out, scale);
  const int64_t head_dim = kHeadDim > 0 ? kHeadDim : q.size(2);
  const int64_t group = kGroup > 0 ? kGroup : call.num_heads / call.num_kv_heads;
  const int64_t page_size = call.page_size;

  at::parallel_for(0, call.num_items(), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * head_dim), row(head_dim), acc(group * head_dim), scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / call.num_kv_heads, h = item % call.num_kv_heads;
      const int64_t seq_len = call.len_ptr[b];
      const int64_t* pages = call.pages(b);
      for (int64_t g = 0; g < group; ++g)
        call.load_query(b, h * group + g, head_dim, qf.data() + g * head_dim);
      scores.assign(group * seq_len, 0.0f);
      for (int64_t t = 0; t < seq_len; ++t) {
        const scalar_t* k = call.page_rows(pages[t / page_size], h, false) +
                            (t % page_size) * call.tok_s;
        load_row(k, row.data(), head_dim);
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = qf.data() + g * head_dim;
          float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * row[d];
          scores[g * seq_len + t] = dot;
        }
      }
      std::vector<float> inv_sum(group);
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * seq_len;
        float max_score = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < seq_len; ++t) max_score = std::max(max_score, s[t]);
        float sum = 0.0f;
        for (int64_t t = 0; t < seq_len; ++t) {
          s[t] = std::exp(s[t] - max_score);
          sum += s[t];
        }
        inv_sum[g] = 1.0f / sum;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t t = 0; t < seq_len; ++t) {
        const scalar_t* v = call.page_rows(pages[t / page_size], h, true) +
                            (t % page_size) * call.tok_s;
        load_row(v, row.data(), head_dim);
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * seq_len + t];
          float* a = acc.data() + g * head_dim;
#pragma omp simd
          for (int64_t d = 0; d < head_dim; ++d) a[d] += p * row[d];
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        scalar_t* o = call.out_row(b, h * group + g);
        for (int64_t d = 0; d < head_dim; ++d)
          o[d] = static_cast<scalar_t>(acc[g * head_dim + d] * inv_sum[g]);
      }
    }
  });
}

#ifdef __AVX512F__
// 16 floats of raw storage as fp32
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m512i wide = _mm512_cvtepu16_epi32(bits);
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// r[i] = the sum of v[i]'s 16 lanes, for 16 vectors at once (46 ops instead of 16
// horizontal sums of ~8 ops each)
inline __m512 sum_lanes16(const __m512* v) {
  __m512 a[8], b[4];
  for (int i = 0; i < 8; ++i)  // 256-bit halves: [v2i b0+b2, b1+b3, v2i+1 b0+b2, b1+b3]
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int j = 0; j < 4; ++j)  // block k of b[j]: 4 partial sums of v[4j+k]
    b[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0x88),
                         _mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0xDD));
  const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(b[0], b[1]), _mm512_unpackhi_ps(b[0], b[1]));
  const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(b[2], b[3]), _mm512_unpackhi_ps(b[2], b[3]));
  const __m512 r = _mm512_add_ps(
      _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23))),
      _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23))));
  // lane 4k+j holds v[4j+k]'s sum
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, r);
}

// Brings one K or V row (kHeadDim values) into L1 ahead of its use: a sequence's pages
// lie anywhere in the pool, so the hardware prefetcher loses the stream at each page.
// The walks below prefetch each row's counterpart kPrefetchPages pages on. One fp32
// core inside the engine's decode step (SmolLM2, 30 layers' pages streamed from
// memory), ms per call: 16 sequences of ~310 tokens 1.25 -> 0.87, 6 of ~1210 1.6 ->
// 1.2 (one page ahead: 0.91 / 1.24; the first two pages prefetched too: no change).
constexpr int64_t kPrefetchPages = 2;

// the largest of s[0, n) (scores: no NaN), 16 at a time: a scalar max over a sequence's
// scores was a chain of dependent maxes, 21% of the kernel's time with K/V in cache
inline float max_of(const float* s, int64_t n) {
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t t = 0;
  for (; t + 16 <= n; t += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(s + t));
  float r = _mm512_reduce_max_ps(m);
  for (; t < n; ++t) r = std::max(r, s[t]);
  return r;
}

template <int64_t kHeadDim, typename scalar_t>
inline void prefetch_row(const scalar_t* row) {
  constexpr int64_t kBytes = kHeadDim * static_cast<int64_t>(sizeof(scalar_t));
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < kBytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
}

// acc[g] += p[g][i] * V row i for the n rows of one page (p[g] at p + g * padded), the
// next one's rows prefetched from `ahead` (or not: null). A function of its own, with
// the accumulators in locals: inside the token loop of the kernel, GCC kept them on the
// stack and stored all of them after every row. With this and `max_of`, one fp32 core,
// SmolLM2 shapes, 8 sequences of 600 tokens, 30 layers' pages in random order: 23.4 ->
// 21.9 ms; with K/V in cache 8.1 -> 5.9 ms. Same bits.
template <typename scalar_t, int64_t kHeadDim, int64_t kGroup>
__attribute__((noinline)) void v_page(__m512 (&acc)[kGroup][kHeadDim / 16],
                                      const scalar_t* v, const scalar_t* ahead, int64_t tok_s,
                                      const float* p, int64_t padded, int64_t n) {
  constexpr int64_t C = kHeadDim / 16;
  __m512 a[kGroup][C];
  for (int64_t g = 0; g < kGroup; ++g)
    for (int64_t c = 0; c < C; ++c) a[g][c] = acc[g][c];
  for (int64_t i = 0; i < n; ++i, v += tok_s) {
    if (ahead != nullptr) prefetch_row<kHeadDim>(ahead + i * tok_s);
    __m512 vv[C];
    for (int64_t c = 0; c < C; ++c) vv[c] = load16(v + 16 * c);
    for (int64_t g = 0; g < kGroup; ++g) {
      const __m512 pg = _mm512_set1_ps(p[g * padded + i]);
      for (int64_t c = 0; c < C; ++c) a[g][c] = _mm512_fmadd_ps(pg, vv[c], a[g][c]);
    }
  }
  for (int64_t g = 0; g < kGroup; ++g)
    for (int64_t c = 0; c < C; ++c) acc[g][c] = a[g][c];
}

// The compiled shapes with AVX-512 (kHeadDim a multiple of 16, kGroup > 0): K rows 16 at
// a time (bf16 widened once into a buffer), one transposed sum per 16 tokens and query
// head instead of a horizontal sum per token; the softmax's exp over whole vectors
// (SLEEF's, from libtorch_cpu); V accumulated in registers; rows walked page by page.
// SmolLM2 shapes, 16 sequences of 100-400 tokens, 2 threads: fp32 338 -> 213 us,
// bf16 216 -> 111 us per call.
template <typename scalar_t, int64_t kHeadDim, int64_t kGroup>
void decode_kernel_avx512(const torch::Tensor& q, const torch::Tensor& kv,
                          const torch::Tensor& tables, const torch::Tensor& lens,
                          torch::Tensor& out, double scale) {
  constexpr int64_t C = kHeadDim / 16;  // vectors per row
  const DecodeCall<scalar_t> call(q, kv, tables, lens, out, scale);
  const int64_t page_size = call.page_size, tok_s = call.tok_s;

  at::parallel_for(0, call.num_items(), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> qf(kGroup * kHeadDim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / call.num_kv_heads, h = item % call.num_kv_heads;
      const int64_t seq_len = call.len_ptr[b];
      const int64_t* pages = call.pages(b);
      const int64_t padded = (seq_len + 15) / 16 * 16;
      const int64_t num_pages = (seq_len + page_size - 1) / page_size;
      scores.resize(kGroup * padded);
      for (int64_t g = 0; g < kGroup; ++g)
        call.load_query(b, h * kGroup + g, kHeadDim, qf.data() + g * kHeadDim);
      // K rows walked page by page (no division per token)
      int64_t page = 0, offset = 0;
      const scalar_t* page_base = call.page_rows(pages[0], h, false);
      auto next_row = [&]() {
        const scalar_t* row = page_base + offset * tok_s;
        if (page + kPrefetchPages < num_pages)  // the same row, kPrefetchPages pages on
          prefetch_row<kHeadDim>(call.page_rows(pages[page + kPrefetchPages], h, false) +
                                 offset * tok_s);
        if (++offset == page_size) {
          offset = 0;
          if (++page < call.width) page_base = call.page_rows(pages[page], h, false);
        }
        return row;
      };
      // scores
      for (int64_t t0 = 0; t0 < seq_len; t0 += 16) {
        const int64_t n = std::min<int64_t>(16, seq_len - t0);
        alignas(64) float krows[16 * kHeadDim];
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t* k = next_row();
          for (int64_t c = 0; c < C; ++c)
            _mm512_store_ps(krows + i * kHeadDim + 16 * c, load16(k + 16 * c));
        }
        for (int64_t g = 0; g < kGroup; ++g) {
          __m512 qv[C];
          for (int64_t c = 0; c < C; ++c)
            qv[c] = _mm512_loadu_ps(qf.data() + g * kHeadDim + 16 * c);
          __m512 dots[16];
          for (int64_t i = 0; i < 16; ++i) {
            __m512 acc = _mm512_setzero_ps();
            if (i < n)
              for (int64_t c = 0; c < C; ++c)
                acc = _mm512_fmadd_ps(qv[c], _mm512_load_ps(krows + i * kHeadDim + 16 * c), acc);
            dots[i] = acc;
          }
          _mm512_storeu_ps(scores.data() + g * padded + t0, sum_lanes16(dots));
        }
      }
      // softmax weights (unnormalized) and their sums
      float inv_sum[kGroup];
      for (int64_t g = 0; g < kGroup; ++g) {
        float* s = scores.data() + g * padded;
        const float max_score = max_of(s, seq_len);
        const __m512 vmax = _mm512_set1_ps(max_score);
        __m512 vsum = _mm512_setzero_ps();
        int64_t t = 0;
        for (; t + 16 <= seq_len; t += 16) {
          const __m512 e = Sleef_expf16_u10(_mm512_sub_ps(_mm512_loadu_ps(s + t), vmax));
          _mm512_storeu_ps(s + t, e);
          vsum = _mm512_add_ps(vsum, e);
        }
        float sum = _mm512_reduce_add_ps(vsum);
        for (; t < seq_len; ++t) {
          s[t] = std::exp(s[t] - max_score);
          sum += s[t];
        }
        inv_sum[g] = 1.0f / sum;
      }
      // weighted sum of V rows
      __m512 acc[kGroup][C];
      for (int64_t g = 0; g < kGroup; ++g)
        for (int64_t c = 0; c < C; ++c) acc[g][c] = _mm512_setzero_ps();
      for (int64_t t = 0, pg = 0; t < seq_len; ++pg) {
        const int64_t page_end = std::min(seq_len, t + page_size);
        v_page<scalar_t, kHeadDim, kGroup>(
            acc, call.page_rows(pages[pg], h, true),
            pg + kPrefetchPages < num_pages ? call.page_rows(pages[pg + kPrefetchPages], h, true)
                                            : nullptr,
            tok_s, scores.data() + t, padded, page_end - t);
        t = page_end;
      }
      for (int64_t g = 0; g < kGroup; ++g) {
        scalar_t* o = call.out_row(b, h * kGroup + g);
        alignas(64) float res[kHeadDim];
        const __m512 inv = _mm512_set1_ps(inv_sum[g]);
        for (int64_t c = 0; c < C; ++c)
          _mm512_store_ps(res + 16 * c, _mm512_mul_ps(acc[g][c], inv));
        for (int64_t d = 0; d < kHeadDim; ++d) o[d] = static_cast<scalar_t>(res[d]);
      }
    }
  });
}
#endif

#ifdef __AVX512F__
#define SPLITSERVE_COMPILED_KERNEL decode_kernel_avx512
#else
#define SPLITSERVE_COMPILED_KERNEL decode_kernel
#endif

template <typename scalar_t, int64_t kHeadDim>
void by_group(const torch::Tensor& q, const torch::Tensor& kv, const torch::Tensor& tables,
              const torch::Tensor& lens, torch::Tensor& out, double scale) {
#define CASE(G) \
  case G: return SPLITSERVE_COMPILED_KERNEL<scalar_t, kHeadDim, G>(q, kv, tables, lens, out, scale);
  switch (q.size(1) / kv.size(3)) {
    CASE(1) CASE(2) CASE(3) CASE(4) CASE(8)
    default: return decode_kernel<scalar_t, kHeadDim, 0>(q, kv, tables, lens, out, scale);
  }
#undef CASE
}

template <typename scalar_t>
void by_shape(const torch::Tensor& q, const torch::Tensor& kv, const torch::Tensor& tables,
              const torch::Tensor& lens, torch::Tensor& out, double scale) {
  switch (q.size(2)) {
    case 64: return by_group<scalar_t, 64>(q, kv, tables, lens, out, scale);
    case 128: return by_group<scalar_t, 128>(q, kv, tables, lens, out, scale);
    default: return decode_kernel<scalar_t, 0, 0>(q, kv, tables, lens, out, scale);
  }
}

}  // namespace

// q [B, H, D]; kv: one layer's view [P, 2, page_size, KVH, D] (any strides, last dim
// contiguous); page_tables int64 [B, W]; seq_lens int64 [B] -> out [B, H, D] in kv's dtype.
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor kv, torch::Tensor page_tables,
                           torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(kv.stride(4) == 1, "kv: the head dimension must be contiguous");
  q = q.to(kv.scalar_type());
  if (q.stride(2) != 1) q = q.contiguous();
  page_tables = page_tables.contiguous();
  seq_lens = seq_lens.contiguous();
  auto out = torch::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  if (kv.scalar_type() == torch::kBFloat16) {
    by_shape<c10::BFloat16>(q, kv, page_tables, seq_lens, out, scale);
  } else {
    TORCH_CHECK(kv.scalar_type() == torch::kFloat32, "kv must be float32 or bfloat16");
    by_shape<float>(q, kv, page_tables, seq_lens, out, scale);
  }
  return out;
}

// Stores a step's new K and V into the pool: rows [R, C], the pool as rows of one
// token's KVH*D values; k_rows, v_rows int64 [T]: the row of each token's K and of its
// V; k, v [T, KVH, D] in the pool's dtype, heads adjacent, rows may be strided (views
// into the QKV output). Two row copies per token instead of reshape copies plus two
// index_copy_ calls.
void store_kv(torch::Tensor rows, torch::Tensor k_rows, torch::Tensor v_rows,
              torch::Tensor k, torch::Tensor v) {
  TORCH_CHECK(rows.dim() == 2 && rows.is_contiguous(), "rows must be a contiguous 2-D view");
  const int64_t tokens = k.size(0), width = rows.size(1), num_rows = rows.size(0);
  for (const auto* t : {&k, &v}) {
    TORCH_CHECK(t->dim() == 3 && t->size(0) == tokens && t->size(1) * t->size(2) == width &&
                    t->stride(2) == 1 && t->stride(1) == t->size(2),
                "k and v must be [T, KVH, D] with adjacent heads, KVH*D = the row width");
    TORCH_CHECK(t->scalar_type() == rows.scalar_type(), "k and v must be in the pool's dtype");
  }
  for (auto* r : {&k_rows, &v_rows}) {
    TORCH_CHECK(r->scalar_type() == torch::kInt64 && r->dim() == 1 && r->size(0) == tokens,
                "k_rows and v_rows must be int64 [T]");
    *r = r->contiguous();
    const int64_t* p = r->data_ptr<int64_t>();
    for (int64_t t = 0; t < tokens; ++t)
      TORCH_CHECK(p[t] >= 0 && p[t] < num_rows, "a K/V row is outside the pool");
  }
  const int64_t esize = rows.element_size(), row_bytes = width * esize;
  char* base = static_cast<char*>(rows.data_ptr());
  const auto copy = [&](const torch::Tensor& src, const torch::Tensor& dst_rows) {
    const char* from = static_cast<const char*>(src.data_ptr());
    const int64_t* to = dst_rows.data_ptr<int64_t>();
    for (int64_t t = 0; t < tokens; ++t)
      std::memcpy(base + to[t] * row_bytes, from + t * src.stride(0) * esize, row_bytes);
  };
  copy(k, k_rows);
  copy(v, v_rows);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over KV pages in place");
  m.def("store_kv", &store_kv, "store a step's new K/V rows into the pool");
}
