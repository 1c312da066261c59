// Vector helpers shared by the project's CPU kernels (cpu_linear.cpp, cpu_attention.cpp): 16 floats in one GCC
// vector (one AVX-512 register where the machine has it; -march=native decides), horizontal sums, and exp.
#pragma once

#include <cstdint>
#include <cstring>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace xfusion_cpu {

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int32_t vi16 __attribute__((vector_size(64), aligned(4)));

// The sum of v's 16 lanes, halving the vector each time (4 dependent adds, not 15).
inline float hsum(v16 v) {
  typedef float v8 __attribute__((vector_size(32), aligned(4)));
  typedef float v4 __attribute__((vector_size(16), aligned(4)));
  v8 lo, hi;
  std::memcpy(&lo, &v, 32);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + 32, 32);
  const v8 s8 = lo + hi;
  v4 a, b;
  std::memcpy(&a, &s8, 16);
  std::memcpy(&b, reinterpret_cast<const char*>(&s8) + 16, 16);
  const v4 s4 = a + b;
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// out[i] = the sum of the lanes of v[i], for four vectors at once (interleave, add, fold the 128-bit lanes).
inline void hsum4(const v16 v[4], float* out) {
#ifdef __AVX512F__
  const __m512 a = (__m512)v[0], b = (__m512)v[1], c = (__m512)v[2], d = (__m512)v[3];
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
#else
  for (int i = 0; i < 4; ++i) out[i] = hsum(v[i]);
#endif
}

// exp(x) for x <= 0 (softmax's scores less their maximum), 16 at once: x = n ln2 + r with |r| <= ln2 / 2,
// exp(r) by Cephes' expf polynomial (relative error about 1e-7 against std::exp), times 2^n built in the
// exponent bits. Inputs below -87 give exp(-87) (~1.6e-38, the smallest with a normal 2^n), not 0: next to the
// maximum's 1 in a softmax sum that is nothing.
inline v16 exp_nonpositive(v16 x) {
  const v16 lo = v16{} - 87.f;
  x = x < lo ? lo : x;
  const vi16 n = -__builtin_convertvector(0.5f - x * 1.44269504088896341f, vi16);  // round(x / ln2), x <= 0
  const v16 nf = __builtin_convertvector(n, v16);
  const v16 r = x - nf * 0.693359375f + nf * 2.12194440e-4f;  // ln2 in two parts: r keeps its low bits
  v16 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const vi16 scale = (n + 127) << 23;
  v16 two_n;
  std::memcpy(&two_n, &scale, 64);
  return p * two_n;
}

}  // namespace xfusion_cpu
