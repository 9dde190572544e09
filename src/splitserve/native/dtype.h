// fp32 <-> storage conversions shared by the native ops.
//
// Kernels work on raw storage: float, or a bfloat16's bits as uint16_t (loops over
// these vectorize; loops over c10::BFloat16 objects may not). `raw<T>(tensor)` gives a
// tensor's data as its raw type.
#pragma once

#include <c10/util/BFloat16.h>
#include <torch/extension.h>

#include <cstdint>
#include <cstring>

namespace splitserve {

inline float to_float(float x) { return x; }
inline float to_float(uint16_t bf16_bits) {
  uint32_t u = static_cast<uint32_t>(bf16_bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline float to_float(c10::BFloat16 x) { return to_float(x.x); }

// f rounded to the raw storage type (nearest, ties to even; NaN stays NaN), branch-free
template <typename R> inline R store_as(float f);
template <> inline float store_as<float>(float f) { return f; }
template <> inline uint16_t store_as<uint16_t>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return (u & 0x7fffffffu) > 0x7f800000u ? uint16_t(0x7fc0)
                                         : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// f as the storage type would hold it, back in fp32
template <typename R> inline float rounded(float f) { return to_float(store_as<R>(f)); }

// the raw storage type of a tensor element type, and a tensor's data as it
template <typename T> struct RawOf { using type = T; };
template <> struct RawOf<c10::BFloat16> { using type = uint16_t; };
template <typename T> inline typename RawOf<T>::type* raw(const torch::Tensor& t) {
  return reinterpret_cast<typename RawOf<T>::type*>(t.data_ptr<T>());
}

}  // namespace splitserve
