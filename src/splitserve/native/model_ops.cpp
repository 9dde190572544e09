// The Llama layer's elementwise steps fused for the CPU (splitserve.model.ops).
//
// Each op does in one pass what the torch path does in 4-10 ops (each a dispatch, an
// allocation and a sweep over memory): residual add + RMSNorm, RoPE of Q and K, and
// SiLU(gate) * up. They round where the torch path rounds, so a bf16 model gives the
// same bits as transformers' bf16 forward:
// - every intermediate the torch path stores in the model dtype is rounded to it here
//   (round-to-nearest-even), math is fp32, and the module is built with
//   -ffp-contract=off (no fused multiply-add the torch path does not do);
// - RMSNorm's mean of squares adds in the order ATen's CPU sum uses for a contiguous
//   row: `lanes` interleaved partial sums over groups of 4 vectors, folded in levels of
//   16 rows, then the tail and the lanes added one by one (`row_sum` below; the caller
//   finds `lanes` by comparison: torch 2.13 sums with AVX2's 8 even on AVX-512);
// - SiLU's exp is the SLEEF routine ATen's vector kernels call (Sleef_expf16_u10,
//   exported by libtorch_cpu) over whole pairs of vectors, std::exp on the rest of a
//   row, as ATen's vectorized loop does.
// The unit tests compare each op with the torch ops it replaces, bit for bit.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "dtype.h"

#ifdef __AVX512F__
#include <immintrin.h>
extern "C" __m512 Sleef_expf16_u10(__m512);
#endif

namespace {

using splitserve::raw;
using splitserve::RawOf;
using splitserve::rounded;
using splitserve::store_as;
using splitserve::to_float;

constexpr int kIlp = 4;      // groups of 4 items summed side by side
constexpr int kLevels = 4;   // partial sums folded into the next level every 2^power rows

int64_t ceil_log2(int64_t x) {
  if (x <= 2) return 1;
  int64_t bits = 0;
  for (uint64_t v = static_cast<uint64_t>(x - 1); v; v >>= 1) ++bits;
  return bits;
}

// Sum of `num_items` items of W floats (item i at x + i*W), kept per lane in out[W]:
// items are taken kIlp at a time into kIlp partial sums, which are folded into level
// 1, 2, 3 as rows complete, then the leftover items go to partial 0 and the partials
// are added in order.
template <int W>
void row_sum(const float* x, int64_t num_items, float* out) {
  float acc[kLevels][kIlp][W] = {};
  const int64_t rows = num_items / kIlp;
  const int64_t power = std::max<int64_t>(4, ceil_log2(rows) / kLevels);
  const int64_t step = int64_t(1) << power, mask = step - 1;
  auto add_row = [&](int64_t r) {
    for (int k = 0; k < kIlp; ++k)
      for (int l = 0; l < W; ++l) acc[0][k][l] += x[(r * kIlp + k) * W + l];
  };
  int64_t r = 0;
  while (r + step <= rows) {
    for (int64_t j = 0; j < step; ++j, ++r) add_row(r);
    for (int lv = 1; lv < kLevels; ++lv) {
      for (int k = 0; k < kIlp; ++k)
        for (int l = 0; l < W; ++l) {
          acc[lv][k][l] += acc[lv - 1][k][l];
          acc[lv - 1][k][l] = 0.f;
        }
      if ((r & (mask << (lv * power))) != 0) break;
    }
  }
  for (; r < rows; ++r) add_row(r);
  for (int lv = 1; lv < kLevels; ++lv)
    for (int k = 0; k < kIlp; ++k)
      for (int l = 0; l < W; ++l) acc[0][k][l] += acc[lv][k][l];
  for (int64_t i = rows * kIlp; i < num_items; ++i)
    for (int l = 0; l < W; ++l) acc[0][0][l] += x[i * W + l];
  for (int k = 1; k < kIlp; ++k)
    for (int l = 0; l < W; ++l) acc[0][0][l] += acc[0][k][l];
  for (int l = 0; l < W; ++l) out[l] = acc[0][0][l];
}

// The sum of a contiguous row of n floats as ATen adds it with W-wide vectors
template <int W>
float aten_sum(const float* x, int64_t n) {
  float part[W];
  if (n < W) {  // too short for a vector: the same cascade over single floats
    row_sum<1>(x, n, part);
    return part[0];
  }
  const int64_t num_vectors = n / W;
  row_sum<W>(x, num_vectors, part);
  float total = 0.f;
  for (int64_t i = num_vectors * W; i < n; ++i) total += x[i];
  for (int l = 0; l < W; ++l) total += part[l];
  return total;
}

float aten_sum(const float* x, int64_t n, int lanes) {
  switch (lanes) {
    case 4: return aten_sum<4>(x, n);
    case 8: return aten_sum<8>(x, n);
    default: return aten_sum<16>(x, n);
  }
}

// One row: [r = x + residual, stored in residual;] out = w * round(r * rsqrt(mean(r^2) + eps))
template <typename T>
void norm_row(const T* x, T* residual, const T* w, T* out, int64_t n, float eps, int lanes,
              float* r32, float* sq) {
  if (residual != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const T sum = store_as<T>(to_float(x[i]) + to_float(residual[i]));
      residual[i] = sum;
      r32[i] = to_float(sum);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) r32[i] = to_float(x[i]);
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) sq[i] = r32[i] * r32[i];
  const float var = aten_sum(sq, n, lanes) / static_cast<float>(n);
  const float inv = 1.f / std::sqrt(var + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i)
    out[i] = store_as<T>(to_float(w[i]) * rounded<T>(r32[i] * inv));
}

template <typename T>
void norm_rows(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual,
               const torch::Tensor& w, torch::Tensor& out, double eps, int64_t lanes) {
  using R = typename RawOf<T>::type;
  const int64_t rows = x.size(0), n = x.size(1);
  const R* xp = raw<T>(x);
  R* rp = residual ? raw<T>(*residual) : nullptr;
  const R* wp = raw<T>(w);
  R* op = raw<T>(out);
  const float feps = static_cast<float>(eps);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> r32(n), sq(n);
    for (int64_t t = begin; t < end; ++t)
      norm_row<R>(xp + t * n, rp ? rp + t * n : nullptr, wp, op + t * n, n, feps,
                  static_cast<int>(lanes), r32.data(), sq.data());
  });
}

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.is_contiguous(), name,
              " must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kBFloat16,
              name, " must be float32 or bfloat16");
}

// x [T, H] (and residual [T, H], updated in place to x + residual), w [H] -> [T, H]
torch::Tensor rms_norm(const torch::Tensor& x, c10::optional<torch::Tensor> residual,
                       const torch::Tensor& w, double eps, int64_t lanes) {
  check_rows(x, "x");
  TORCH_CHECK(lanes == 4 || lanes == 8 || lanes == 16, "lanes must be 4, 8 or 16");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(1) && w.is_contiguous() &&
                  w.scalar_type() == x.scalar_type(), "weight must be [H] in x's dtype");
  if (residual) {
    check_rows(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "residual must match x");
  }
  auto out = torch::empty_like(x);
  if (x.scalar_type() == torch::kFloat32)
    norm_rows<float>(x, residual, w, out, eps, lanes);
  else
    norm_rows<c10::BFloat16>(x, residual, w, out, eps, lanes);
  return out;
}

// qk [T, heads, D] (rows may be strided: a view into the QKV output), cos/sin [T, 1, D]:
// x * cos + rotate_half(x) * sin, each product and the sum rounded to the dtype
template <typename T>
void rope_rows(const torch::Tensor& qk, const torch::Tensor& cos, const torch::Tensor& sin,
               torch::Tensor& out) {
  using R = typename RawOf<T>::type;
  const int64_t tokens = qk.size(0), heads = qk.size(1), d = qk.size(2), half = d / 2;
  const int64_t s0 = qk.stride(0), s1 = qk.stride(1);
  const R* x = raw<T>(qk);
  const R* c = raw<T>(cos);
  const R* s = raw<T>(sin);
  R* o = raw<T>(out);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(heads * d, 1));
  at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const R* ct = c + t * d;
      const R* st = s + t * d;
      for (int64_t h = 0; h < heads; ++h) {
        const R* xh = x + t * s0 + h * s1;
        R* oh = o + (t * heads + h) * d;
#pragma omp simd
        for (int64_t j = 0; j < half; ++j) {  // rotate_half: (-x2, x1)
          const float a = rounded<R>(to_float(xh[j]) * to_float(ct[j]));
          const float b = rounded<R>(-to_float(xh[j + half]) * to_float(st[j]));
          oh[j] = store_as<R>(a + b);
        }
#pragma omp simd
        for (int64_t j = half; j < d; ++j) {
          const float a = rounded<R>(to_float(xh[j]) * to_float(ct[j]));
          const float b = rounded<R>(to_float(xh[j - half]) * to_float(st[j]));
          oh[j] = store_as<R>(a + b);
        }
      }
    }
  });
}

torch::Tensor rope(const torch::Tensor& qk, const torch::Tensor& cos, const torch::Tensor& sin) {
  TORCH_CHECK(qk.device().is_cpu() && qk.dim() == 3 && qk.stride(2) == 1,
              "qk must be a CPU tensor [T, heads, D] with contiguous rows");
  TORCH_CHECK(qk.size(2) % 2 == 0, "the head size must be even");
  TORCH_CHECK(qk.scalar_type() == torch::kFloat32 || qk.scalar_type() == torch::kBFloat16,
              "qk must be float32 or bfloat16");
  for (const auto* angle : {&cos, &sin})
    TORCH_CHECK(angle->is_contiguous() && angle->numel() == qk.size(0) * qk.size(2) &&
                    angle->scalar_type() == qk.scalar_type(),
                "cos and sin must be contiguous [T, 1, D] in qk's dtype");
  auto out = torch::empty({qk.size(0), qk.size(1), qk.size(2)}, qk.options());
  if (qk.scalar_type() == torch::kFloat32)
    rope_rows<float>(qk, cos, sin, out);
  else
    rope_rows<c10::BFloat16>(qk, cos, sin, out);
  return out;
}

// silu of n floats as ATen computes it: x / (1 + exp(-x)), its vectorized loop taking
// blocks of `block` floats (two of its vectors) with SLEEF's exp, the rest one by one
void silu_row(const float* x, float* out, int64_t n, int64_t block) {
  int64_t i = 0;
#ifdef __AVX512F__
  const int64_t vector_end = block % 16 == 0 ? n / block * block : 0;
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i < vector_end; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    const __m512 e = Sleef_expf16_u10(_mm512_sub_ps(_mm512_setzero_ps(), v));
    _mm512_storeu_ps(out + i, _mm512_div_ps(v, _mm512_add_ps(one, e)));
  }
#endif
  for (; i < n; ++i) out[i] = x[i] / (1.f + std::exp(-x[i]));
}

// gate_up [T, 2I] -> silu(gate) * up [T, I], silu rounded to the dtype before the product
template <typename T>
void silu_mul_rows(const torch::Tensor& gate_up, torch::Tensor& out, int64_t vector_bytes) {
  const int64_t tokens = gate_up.size(0), inter = gate_up.size(1) / 2;
  using R = typename RawOf<T>::type;
  const int64_t block = 2 * vector_bytes / static_cast<int64_t>(sizeof(T));
  const R* g = raw<T>(gate_up);
  R* o = raw<T>(out);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(inter, 1));
  at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> x(inter), s(inter);
    for (int64_t t = begin; t < end; ++t) {
      const R* gt = g + t * 2 * inter;
      const R* ut = gt + inter;
#pragma omp simd
      for (int64_t i = 0; i < inter; ++i) x[i] = to_float(gt[i]);
      silu_row(x.data(), s.data(), inter, block);
#pragma omp simd
      for (int64_t i = 0; i < inter; ++i)
        o[t * inter + i] = store_as<R>(rounded<R>(s[i]) * to_float(ut[i]));
    }
  });
}

// vector_bytes: the width of ATen's vectors here (64 with AVX-512, 32 with AVX2)
torch::Tensor silu_mul(const torch::Tensor& gate_up, int64_t vector_bytes) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must hold gate and up: an even width");
  auto out = torch::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  if (gate_up.scalar_type() == torch::kFloat32)
    silu_mul_rows<float>(gate_up, out, vector_bytes);
  else
    silu_mul_rows<c10::BFloat16>(gate_up, out, vector_bytes);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "[residual add +] RMSNorm, rounded as the torch path",
        py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("eps"), py::arg("lanes"));
  m.def("rope", &rope, "rotate-half RoPE of Q and K heads into a new tensor");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused gate/up projection",
        py::arg("gate_up"), py::arg("vector_bytes"));
}
