// fp32 <-> storage dtype (float or bfloat16) conversions shared by the native ops.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

namespace splitserve {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// f rounded to the storage type (nearest, ties to even; NaN stays NaN), branch-free
template <typename T> inline T store_as(float f);
template <> inline float store_as<float>(float f) { return f; }
template <> inline c10::BFloat16 store_as<c10::BFloat16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  uint16_t bits = (u & 0x7fffffffu) > 0x7f800000u
                      ? uint16_t(0x7fc0)
                      : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  c10::BFloat16 out;
  out.x = bits;
  return out;
}

// f as the storage type would hold it, back in fp32
template <typename T> inline float rounded(float f) { return to_float(store_as<T>(f)); }

}  // namespace splitserve
