// rose 2:4 sparse linear kernel: packing, the portable scalar path, the AVX2+FMA and AVX-512 paths (chosen at
// run time), and unpacking.
#include "sparse24.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)  // GCC/Clang attributes and builtins
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12's own AVX-512 headers (GCC bug 105593)
#endif
#include <immintrin.h>
#define ROSE24_X86 1
#endif

namespace rose24 {

// ---- small helpers -------------------------------------------------------------------------------------------

float bf16_to_f32(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

static inline float to_f32(float v) { return v; }
static inline float to_f32(uint16_t v) { return bf16_to_f32(v); }
static inline bool nonzero(float v) { return v != 0.0f; }
static inline bool nonzero(uint16_t v) { return (v & 0x7fffu) != 0; }
static inline bool has_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u != 0;
}
static inline bool has_bits(uint16_t v) { return v != 0; }

// First and second set bit of a 4-bit keep mask with two bits set.
static constexpr int8_t kFirst[16] = {0, 0, 1, 0, 2, 0, 1, 0, 3, 0, 1, 0, 2, 0, 1, 0};
static constexpr int8_t kSecond[16] = {0, 0, 1, 1, 2, 2, 2, 1, 3, 3, 3, 1, 3, 2, 2, 1};

// ---- packing -------------------------------------------------------------------------------------------------

// An empty padding row keeps columns 0 and 1 with zero values, so every nibble has exactly two bits.
static constexpr uint32_t kPadNibble = 0x3;

// The first group, in row-major order, with more than two nonzeros; -1 if none. Checked before packing, so that
// the error names the same group whatever order the packing loop walks in.
template <typename T>
static int64_t first_dense_violation(const T* W, int64_t rows, int64_t cols, int64_t ldw) {
  const int64_t G = groups(cols);
  for (int64_t row = 0; row < rows; ++row)
    for (int64_t g = 0; g < G; ++g) {
      const T* w = W + row * ldw + 4 * g;
      if (nonzero(w[0]) + nonzero(w[1]) + nonzero(w[2]) + nonzero(w[3]) > 2) return row * G + g;
    }
  return -1;
}

// Writes the panel-8 layout; `entry(row, g, nib, a, b)` sets a real row's keep mask and two kept values for group
// g (padding rows keep columns 0 and 1 with zero values).
template <typename T, typename Entry>
static void write_layout(int64_t rows, int64_t cols, T* values, uint32_t* masks, Entry entry) {
  const int64_t G = groups(cols), P = panels(rows);
  for (int64_t p = 0; p < P; ++p)
    for (int64_t g = 0; g < G; ++g) {
      T* v = values + (p * G + g) * 16;
      uint32_t word = 0;
      for (int r = 0; r < kPanel; ++r) {
        const int64_t row = p * kPanel + r;
        uint32_t nib = kPadNibble;
        T a = T(0), b = T(0);
        if (row < rows) entry(row, g, nib, a, b);
        v[r] = a;
        v[8 + r] = b;
        word |= nib << (4 * r);
      }
      masks[p * G + g] = word;
    }
}

template <typename T>
static int64_t pack_dense_impl(const T* W, int64_t rows, int64_t cols, int64_t ldw, T* values, uint32_t* masks) {
  if (const int64_t bad = first_dense_violation(W, rows, cols, ldw); bad >= 0) return bad;
  write_layout(rows, cols, values, masks, [&](int64_t row, int64_t g, uint32_t& nib, T& a, T& b) {
    const T* w = W + row * ldw + 4 * g;
    int kept = 0;
    nib = 0;
    for (int j = 0; j < 4; ++j)
      if (nonzero(w[j])) {
        nib |= 1u << j;
        ++kept;
      }
    // fewer than two nonzeros: keep a stored -0.0 first (so it survives), then the lowest free columns;
    // the same choice as the packed24 export, so both packings give identical bytes
    for (int pass = 0; pass < 2; ++pass)
      for (int j = 0; j < 4 && kept < 2; ++j)
        if (!(nib >> j & 1u) && (pass == 1 || has_bits(w[j]))) {
          nib |= 1u << j;
          ++kept;
        }
    a = w[kFirst[nib]];  // values in column order
    b = w[kSecond[nib]];
  });
  return -1;
}

int64_t pack_dense(const float* W, int64_t rows, int64_t cols, int64_t ldw, float* values, uint32_t* masks) {
  return pack_dense_impl(W, rows, cols, ldw, values, masks);
}
int64_t pack_dense(const uint16_t* W, int64_t rows, int64_t cols, int64_t ldw, uint16_t* values, uint32_t* masks) {
  return pack_dense_impl(W, rows, cols, ldw, values, masks);
}

template <typename T>
int64_t pack_bitmask(const T* kept, const uint8_t* bitmask, int64_t rows, int64_t cols, T* values, uint32_t* masks) {
  const int64_t G = groups(cols), mask_bytes = (cols + 7) / 8, half = cols / 2;
  const auto nibble = [&](int64_t row, int64_t g) {
    return static_cast<uint32_t>(bitmask[row * mask_bytes + g / 2] >> (4 * (g & 1))) & 0xfu;
  };
  for (int64_t row = 0; row < rows; ++row)  // validate in row-major order first (see first_dense_violation)
    for (int64_t g = 0; g < G; ++g)
      if (__builtin_popcount(nibble(row, g)) != 2) return row * G + g;
  write_layout(rows, cols, values, masks, [&](int64_t row, int64_t g, uint32_t& nib, T& a, T& b) {
    nib = nibble(row, g);
    a = kept[row * half + 2 * g];
    b = kept[row * half + 2 * g + 1];
  });
  return -1;
}

int64_t check_masks(const uint32_t* masks, int64_t rows, int64_t cols) {
  const int64_t n = mask_count(rows, cols), G = groups(cols);
  // Per-nibble popcounts in one word (SWAR): each nibble must count 2, so the word must be 0x22222222. A branch-free
  // OR over blocks keeps the loop vectorisable; the rare bad block is then searched word by word.
  const auto counts = [](uint32_t w) {
    w = w - ((w >> 1) & 0x55555555u);
    return (w & 0x33333333u) + ((w >> 2) & 0x33333333u);
  };
  constexpr int64_t kBlock = 1024;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    uint32_t bad = 0;
    for (int64_t i = b; i < e; ++i) bad |= counts(masks[i]) ^ 0x22222222u;
    if (!bad) continue;
    for (int64_t i = b; i < e; ++i) {
      const uint32_t diff = counts(masks[i]) ^ 0x22222222u;
      if (!diff) continue;
      const int r = __builtin_ctz(diff) / 4;  // first bad row of the panel
      return ((i / G) * kPanel + r) * G + i % G;
    }
  }
  return -1;
}

template <typename T>
static void unpack_scalar(const T* values, const uint32_t* masks, int64_t rows, int64_t cols, int64_t p0,
                          int64_t p1, T* out, int64_t ldo) {
  const int64_t G = groups(cols);
  for (int64_t p = p0; p < p1; ++p) {
    for (int r = 0; r < kPanel; ++r) {
      const int64_t row = p * kPanel + r;
      if (row >= rows) break;
      T* o = out + (row - p0 * kPanel) * ldo;
      for (int64_t g = 0; g < G; ++g) {
        const T* v = values + (p * G + g) * 16;
        const uint32_t nib = masks[p * G + g] >> (4 * r) & 0xfu;
        T* q = o + 4 * g;
        q[0] = q[1] = q[2] = q[3] = T(0);
        q[kFirst[nib]] = v[r];
        q[kSecond[nib]] = v[8 + r];
      }
    }
  }
}

// ---- scalar path ---------------------------------------------------------------------------------------------

template <typename T>
static void gemm_scalar(const T* values, const uint32_t* masks, int64_t rows, int64_t cols, const float* x,
                        int64_t M, int64_t ldx, const float* bias, float* y, int64_t ldy, int64_t p0, int64_t p1) {
  const int64_t G = groups(cols);
  for (int64_t p = p0; p < p1; ++p) {
    const int live = static_cast<int>(std::min<int64_t>(kPanel, rows - p * kPanel));
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * ldx;
      float acc[kPanel] = {0};
      for (int64_t g = 0; g < G; ++g) {
        const T* v = values + (p * G + g) * 16;
        const uint32_t word = masks[p * G + g];
        const float* xg = xm + 4 * g;
        for (int r = 0; r < kPanel; ++r) {
          const uint32_t nib = word >> (4 * r) & 0xfu;
          acc[r] += to_f32(v[r]) * xg[kFirst[nib]] + to_f32(v[8 + r]) * xg[kSecond[nib]];
        }
      }
      float* ym = y + m * ldy + p * kPanel;
      for (int r = 0; r < live; ++r) ym[r] = acc[r] + (bias ? bias[p * kPanel + r] : 0.0f);
    }
  }
}

// ---- AVX2 + FMA path -----------------------------------------------------------------------------------------
// Eight output rows live in the eight lanes. For each group, the two kept values of every row are spread into
// four dense lane vectors w0..w3 (w_j = the row's weight in column 4g+j, zero if pruned): the keep-mask bit of
// column j is shifted into each lane's sign bit and drives a blend. Then y += w_j * broadcast(x[4g+j]).

#if ROSE24_X86
#define ROSE24_AVX2 __attribute__((target("avx2,fma")))

#ifndef ROSE24_PREFETCH
#define ROSE24_PREFETCH 48
#endif
// Software prefetch, kPrefetch groups ahead of the group being multiplied. With a few tokens the FMAs fill the
// reorder buffer and the hardware prefetchers (which stop at 4 KiB pages) keep too few lines in flight: one token
// ran at full bandwidth but eight at half of it. A panel's values take one line per group (fp32) or per two (bf16),
// its masks one line per 16 groups.
//
// The prefetch runs on across panel boundaries: in the last kPrefetch groups of a panel (of a panel pair, on the
// AVX-512 path) it fetches the start of the next panel (pair) of the same call. Stopping at the panel's end left the
// first kPrefetch groups of every panel to the hardware prefetchers alone, a third of the lines of a 576-column
// layer (G = 144): one thread streamed SmolLM2's layers at 15-17 GB/s, 28-33 GB/s with the prefetch running on
// (cpp/README.md, "Prefetch").
constexpr int64_t kPrefetch = ROSE24_PREFETCH;
template <typename T>
static inline void prefetch_group(const T* values, const uint32_t* masks, int64_t g) {
  _mm_prefetch(reinterpret_cast<const char*>(values + g * 16), _MM_HINT_T0);
  if ((g & 15) == 0) _mm_prefetch(reinterpret_cast<const char*>(masks + g), _MM_HINT_T0);
}
// Group g + kPrefetch of a stream that goes on for `limit` groups from `values` (the panel's own G, or through the
// following panels of the same call).
template <typename T>
static inline void prefetch_ahead(const T* values, const uint32_t* masks, int64_t g, int64_t limit) {
  if (g + kPrefetch < limit) prefetch_group(values, masks, g + kPrefetch);
}

ROSE24_AVX2 static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
ROSE24_AVX2 static inline __m256 load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// Spread one group's kept values (8 rows) into the dense lane vectors of its four columns. s0 holds each lane's
// shift that brings bit 4r of the mask word to the sign bit; column j holds the row's first kept value unless a
// lower column is already kept.
template <typename T>
ROSE24_AVX2 static inline void decode_avx2(const T* v, uint32_t mask, __m256i s0, __m256& w0, __m256& w1,
                                           __m256& w2, __m256& w3) {
  const __m256i word = _mm256_set1_epi32(static_cast<int>(mask));
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i s1 = _mm256_sub_epi32(s0, one), s2 = _mm256_sub_epi32(s1, one), s3 = _mm256_sub_epi32(s2, one);
  const __m256 m0 = _mm256_castsi256_ps(_mm256_sllv_epi32(word, s0));
  const __m256 m1 = _mm256_castsi256_ps(_mm256_sllv_epi32(word, s1));
  const __m256 m2 = _mm256_castsi256_ps(_mm256_sllv_epi32(word, s2));
  const __m256 m3 = _mm256_castsi256_ps(_mm256_sllv_epi32(word, s3));
  const __m256 va = load8(v), vb = load8(v + 8), zero = _mm256_setzero_ps();
  w0 = _mm256_blendv_ps(zero, va, m0);
  w1 = _mm256_blendv_ps(zero, _mm256_blendv_ps(va, vb, m0), m1);
  w2 = _mm256_blendv_ps(zero, _mm256_blendv_ps(va, vb, _mm256_or_ps(m0, m1)), m2);
  w3 = _mm256_blendv_ps(zero, vb, m3);
}

ROSE24_AVX2 static inline void store8(float* p, __m256 w) { _mm256_storeu_ps(p, w); }
ROSE24_AVX2 static inline void store8(uint16_t* p, __m256 w) {  // exact: w holds bf16 values
  const __m256i i = _mm256_srli_epi32(_mm256_castps_si256(w), 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1)));
}

// In-register 8x8 transpose: c[j] holds column j of eight rows; afterwards c[i] holds row i's eight columns.
ROSE24_AVX2 static inline void transpose8(__m256 c[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(c[i], c[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(c[i], c[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    c[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    c[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// Row-major dense rows: two groups (eight columns) of eight rows at a time, decoded as lanes and transposed.
template <typename T>
ROSE24_AVX2 static void unpack_avx2(const T* values, const uint32_t* masks, int64_t rows, int64_t cols, int64_t p0,
                                    int64_t p1, T* out, int64_t ldo) {
  const int64_t G = groups(cols);
  const __m256i s0 = _mm256_setr_epi32(31, 27, 23, 19, 15, 11, 7, 3);
  for (int64_t p = p0; p < p1; ++p) {
    const int live = static_cast<int>(std::min<int64_t>(kPanel, rows - p * kPanel));
    T* o = out + (p - p0) * kPanel * ldo;
    int64_t g = 0;
    for (; g + 1 < G; g += 2) {
      __m256 c[8];
      decode_avx2(values + (p * G + g) * 16, masks[p * G + g], s0, c[0], c[1], c[2], c[3]);
      decode_avx2(values + (p * G + g + 1) * 16, masks[p * G + g + 1], s0, c[4], c[5], c[6], c[7]);
      transpose8(c);
      for (int r = 0; r < live; ++r) store8(o + r * ldo + 4 * g, c[r]);
    }
    if (g < G) {  // an odd last group
      __m256 c[4];
      decode_avx2(values + (p * G + g) * 16, masks[p * G + g], s0, c[0], c[1], c[2], c[3]);
      alignas(32) float lanes[4][8];
      for (int j = 0; j < 4; ++j) _mm256_store_ps(lanes[j], c[j]);
      for (int r = 0; r < live; ++r)
        for (int j = 0; j < 4; ++j) {
          const float f = lanes[j][r];
          if constexpr (std::is_same_v<T, float>) {
            o[r * ldo + 4 * g + j] = f;
          } else {
            uint32_t u;
            std::memcpy(&u, &f, 4);
            o[r * ldo + 4 * g + j] = static_cast<uint16_t>(u >> 16);
          }
        }
    }
  }
}

template <int MC, int NA, typename T>
ROSE24_AVX2 static void panel_avx2(const T* values, const uint32_t* masks, int64_t G, const float* x, int64_t ldx,
                                   __m256 out[MC], int64_t pf_limit) {
  const __m256i s0 = _mm256_setr_epi32(31, 27, 23, 19, 15, 11, 7, 3);
  const __m256 zero = _mm256_setzero_ps();
  __m256 acc[MC][NA];
  for (int m = 0; m < MC; ++m)
    for (int a = 0; a < NA; ++a) acc[m][a] = zero;
  for (int64_t g = 0; g < G; ++g) {
    prefetch_ahead(values, masks, g, pf_limit);
    __m256 w0, w1, w2, w3;
    decode_avx2(values + g * 16, masks[g], s0, w0, w1, w2, w3);
    const float* xg = x + 4 * g;
    for (int m = 0; m < MC; ++m) {
      const float* xm = xg + m * ldx;
      acc[m][0 % NA] = _mm256_fmadd_ps(w0, _mm256_broadcast_ss(xm + 0), acc[m][0 % NA]);
      acc[m][1 % NA] = _mm256_fmadd_ps(w1, _mm256_broadcast_ss(xm + 1), acc[m][1 % NA]);
      acc[m][2 % NA] = _mm256_fmadd_ps(w2, _mm256_broadcast_ss(xm + 2), acc[m][2 % NA]);
      acc[m][3 % NA] = _mm256_fmadd_ps(w3, _mm256_broadcast_ss(xm + 3), acc[m][3 % NA]);
    }
  }
  for (int m = 0; m < MC; ++m) {
    __m256 s = acc[m][0];
    for (int a = 1; a < NA; ++a) s = _mm256_add_ps(s, acc[m][a]);
    out[m] = s;
  }
}

template <int MC, typename T>
ROSE24_AVX2 static void chunk_avx2(const T* values, const uint32_t* masks, int64_t G, const float* x, int64_t ldx,
                                   __m256 out[MC], int64_t pf_limit) {
  constexpr int NA = MC == 1 ? 4 : (MC <= 3 ? 2 : 1);
  panel_avx2<MC, NA>(values, masks, G, x, ldx, out, pf_limit);
}

template <typename T>
ROSE24_AVX2 static void gemm_avx2(const T* values, const uint32_t* masks, int64_t rows, int64_t cols, const float* x,
                                  int64_t M, int64_t ldx, const float* bias, float* y, int64_t ldy, int64_t p0,
                                  int64_t p1) {
  constexpr int kChunk = 6;
  const int64_t G = groups(cols);
  for (int64_t p = p0; p < p1; ++p) {
    const T* vp = values + p * G * 16;
    const uint32_t* mp = masks + p * G;
    const int live = static_cast<int>(std::min<int64_t>(kPanel, rows - p * kPanel));
    __m256 b = _mm256_setzero_ps();
    if (bias) {
      if (live == kPanel) {
        b = _mm256_loadu_ps(bias + p * kPanel);
      } else {
        alignas(32) float tmp[kPanel] = {0};
        std::memcpy(tmp, bias + p * kPanel, sizeof(float) * live);
        b = _mm256_load_ps(tmp);
      }
    }
    for (int64_t m0 = 0; m0 < M; m0 += kChunk) {
      const int mc = static_cast<int>(std::min<int64_t>(kChunk, M - m0));
      const float* xm = x + m0 * ldx;
      // the last chunk of tokens prefetches on into the next panels of this call (contiguous: one stream)
      const int64_t pf_limit = m0 + kChunk >= M ? (p1 - p) * G : G;
      __m256 out[kChunk];
      switch (mc) {
        case 1: chunk_avx2<1>(vp, mp, G, xm, ldx, out, pf_limit); break;
        case 2: chunk_avx2<2>(vp, mp, G, xm, ldx, out, pf_limit); break;
        case 3: chunk_avx2<3>(vp, mp, G, xm, ldx, out, pf_limit); break;
        case 4: chunk_avx2<4>(vp, mp, G, xm, ldx, out, pf_limit); break;
        case 5: chunk_avx2<5>(vp, mp, G, xm, ldx, out, pf_limit); break;
        default: chunk_avx2<6>(vp, mp, G, xm, ldx, out, pf_limit); break;
      }
      for (int m = 0; m < mc; ++m) {
        float* ym = y + (m0 + m) * ldy + p * kPanel;
        const __m256 r = _mm256_add_ps(out[m], b);
        if (live == kPanel) {
          _mm256_storeu_ps(ym, r);
        } else {
          alignas(32) float tmp[kPanel];
          _mm256_store_ps(tmp, r);
          std::memcpy(ym, tmp, sizeof(float) * live);
        }
      }
    }
  }
}
// ---- AVX-512 path ----------------------------------------------------------------------------------------------
// Two panels side by side fill the 16 lanes (lanes 0-7: panel p, 8-15: panel p+1); a bit test turns each column's
// keep bits straight into a lane mask, so decoding is four tests and four masked moves per 16 rows.
#define ROSE24_AVX512 __attribute__((target("avx2,fma,avx512f,avx512dq,avx512bw,avx512vl")))

ROSE24_AVX512 static inline __m512 load16(const float* a, const float* b) {
  return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(a)), _mm256_loadu_ps(b), 1);
}
ROSE24_AVX512 static inline __m512 load16(const uint16_t* a, const uint16_t* b) {
  const __m256i h = _mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a))),
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(b)), 1);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// The bit of each lane's row in a panel's mask word, for column 0 (shift left by j for column j).
ROSE24_AVX512 static inline __m512i lane_bits() {
  return _mm512_setr_epi32(1 << 0, 1 << 4, 1 << 8, 1 << 12, 1 << 16, 1 << 20, 1 << 24, 1 << 28, 1 << 0, 1 << 4,
                           1 << 8, 1 << 12, 1 << 16, 1 << 20, 1 << 24, 1 << 28);
}

// Group g of panels (v0, k0) and (v1, k1) as four dense lane vectors w0..w3 (16 rows each, column 4g+j).
template <typename T>
ROSE24_AVX512 static inline void decode_pair(const T* v0, const T* v1, uint32_t k0, uint32_t k1, __m512i bit0,
                                             __m512 w[4]) {
  const __m512i word = _mm512_mask_set1_epi32(_mm512_set1_epi32(static_cast<int>(k0)), 0xFF00,
                                              static_cast<int>(k1));
  const __mmask16 m0 = _mm512_test_epi32_mask(word, bit0);
  const __mmask16 m1 = _mm512_test_epi32_mask(word, _mm512_slli_epi32(bit0, 1));
  const __mmask16 m2 = _mm512_test_epi32_mask(word, _mm512_slli_epi32(bit0, 2));
  const __mmask16 m3 = _mm512_test_epi32_mask(word, _mm512_slli_epi32(bit0, 3));
  const __m512 va = load16(v0, v1), vb = load16(v0 + 8, v1 + 8);
  w[0] = _mm512_maskz_mov_ps(m0, va);
  w[1] = _mm512_maskz_mov_ps(m1, _mm512_mask_mov_ps(va, m0, vb));
  w[2] = _mm512_maskz_mov_ps(m2, _mm512_mask_mov_ps(va, _kor_mask16(m0, m1), vb));
  w[3] = _mm512_maskz_mov_ps(m3, vb);
}

// One group g of a panel pair: decode it, then acc[m] += w_j * x[m, 4g+j] for the MC tokens.
template <int MC, int NA, typename T>
ROSE24_AVX512 static inline __attribute__((always_inline)) void pair_group(
    const T* v0, const T* v1, const uint32_t* k0p, const uint32_t* k1p, int64_t g, __m512i bit0, const float* x,
    int64_t ldx, __m512 (&acc)[MC][NA]) {
  __m512 w[4];
  decode_pair(v0 + g * 16, v1 + g * 16, k0p[g], k1p[g], bit0, w);
  const float* xg = x + 4 * g;
  for (int m = 0; m < MC; ++m) {
    const float* xm = xg + m * ldx;
    acc[m][0 % NA] = _mm512_fmadd_ps(w[0], _mm512_set1_ps(xm[0]), acc[m][0 % NA]);
    acc[m][1 % NA] = _mm512_fmadd_ps(w[1], _mm512_set1_ps(xm[1]), acc[m][1 % NA]);
    acc[m][2 % NA] = _mm512_fmadd_ps(w[2], _mm512_set1_ps(xm[2]), acc[m][2 % NA]);
    acc[m][3 % NA] = _mm512_fmadd_ps(w[3], _mm512_set1_ps(xm[3]), acc[m][3 % NA]);
  }
}

// The pair (v0, k0p) and (v1, k1p) with MC tokens. Each panel is one stream; the prefetch runs kPrefetch groups
// ahead in both, and over the last kPrefetch groups it fetches the first groups of the next pair's two streams
// (next_v, next_k: panel p+2, whose partner p+3 follows it at G groups; null when this is the call's last pair).
// Running the pair's own streams on past their end instead would fetch panel p+1 (the same pair's other stream)
// and p+2, never p+3: that variant measured slower.
template <int MC, int NA, typename T>
ROSE24_AVX512 static void pair_avx512(const T* v0, const T* v1, const uint32_t* k0p, const uint32_t* k1p, int64_t G,
                                      const float* x, int64_t ldx, __m512 out[MC], const T* next_v,
                                      const uint32_t* next_k) {
  const __m512i bit0 = lane_bits();
  __m512 acc[MC][NA];
  for (int m = 0; m < MC; ++m)
    for (int a = 0; a < NA; ++a) acc[m][a] = _mm512_setzero_ps();
  const int64_t own = std::max<int64_t>(0, G - kPrefetch);  // groups whose prefetch target is in this pair
  int64_t g = 0;
  for (; g < own; ++g) {
    prefetch_group(v0, k0p, g + kPrefetch);
    prefetch_group(v1, k1p, g + kPrefetch);
    pair_group<MC, NA>(v0, v1, k0p, k1p, g, bit0, x, ldx, acc);
  }
  if (next_v) {
    for (; g < G; ++g) {
      const int64_t t = g + kPrefetch - G;  // group of the next pair
      if (t < G) {
        prefetch_group(next_v, next_k, t);
        prefetch_group(next_v + G * 16, next_k + G, t);
      }
      pair_group<MC, NA>(v0, v1, k0p, k1p, g, bit0, x, ldx, acc);
    }
  } else {
    for (; g < G; ++g) pair_group<MC, NA>(v0, v1, k0p, k1p, g, bit0, x, ldx, acc);
  }
  for (int m = 0; m < MC; ++m) {
    __m512 s = acc[m][0];
    for (int a = 1; a < NA; ++a) s = _mm512_add_ps(s, acc[m][a]);
    out[m] = s;
  }
}

template <int MC, typename T>
ROSE24_AVX512 static void chunk_avx512(const T* v0, const T* v1, const uint32_t* k0, const uint32_t* k1, int64_t G,
                                       const float* x, int64_t ldx, __m512 out[MC], const T* next_v,
                                       const uint32_t* next_k) {
  constexpr int NA = MC == 1 ? 4 : (MC <= 3 ? 2 : 1);
  pair_avx512<MC, NA>(v0, v1, k0, k1, G, x, ldx, out, next_v, next_k);
}

template <typename T>
ROSE24_AVX512 static void gemm_avx512(const T* values, const uint32_t* masks, int64_t rows, int64_t cols,
                                      const float* x, int64_t M, int64_t ldx, const float* bias, float* y,
                                      int64_t ldy, int64_t p0, int64_t p1) {
  constexpr int kChunk = 8;
  const int64_t G = groups(cols);
  int64_t p = p0;
  for (; p + 1 < p1; p += 2) {
    const T* v0 = values + p * G * 16;
    const uint32_t* k0 = masks + p * G;
    const int live = static_cast<int>(std::min<int64_t>(2 * kPanel, rows - p * kPanel));
    const __mmask16 keep = static_cast<__mmask16>((1u << live) - 1u);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(keep, bias + p * kPanel) : _mm512_setzero_ps();
    for (int64_t m0 = 0; m0 < M; m0 += kChunk) {
      const int mc = static_cast<int>(std::min<int64_t>(kChunk, M - m0));
      const float* xm = x + m0 * ldx;
      // the last chunk of tokens prefetches the start of the next pair, if this call has one
      const T* next_v = m0 + kChunk >= M && p + 3 < p1 ? v0 + 2 * G * 16 : nullptr;
      const uint32_t* next_k = k0 + 2 * G;
      __m512 out[kChunk];
      switch (mc) {
        case 1: chunk_avx512<1>(v0, v0 + G * 16, k0, k0 + G, G, xm, ldx, out, next_v, next_k); break;
        case 2: chunk_avx512<2>(v0, v0 + G * 16, k0, k0 + G, G, xm, ldx, out, next_v, next_k); break;
        case 3: chunk_avx512<3>(v0, v0 + G * 16, k0, k0 + G, G, xm, ldx, out, next_v, next_k); break;
        case 4: chunk_avx512<4>(v0, v0 + G * 16, k0, k0 + G, G, xm, ldx, out, next_v, next_k); break;
        case 5: chunk_avx512<5>(v0, v0 + G * 16, k0, k0 + G, G, xm, ldx, out, next_v, next_k); break;
        case 6: chunk_avx512<6>(v0, v0 + G * 16, k0, k0 + G, G, xm, ldx, out, next_v, next_k); break;
        case 7: chunk_avx512<7>(v0, v0 + G * 16, k0, k0 + G, G, xm, ldx, out, next_v, next_k); break;
        default: chunk_avx512<8>(v0, v0 + G * 16, k0, k0 + G, G, xm, ldx, out, next_v, next_k); break;
      }
      for (int m = 0; m < mc; ++m)
        _mm512_mask_storeu_ps(y + (m0 + m) * ldy + p * kPanel, keep, _mm512_add_ps(out[m], b));
    }
  }
  if (p < p1) gemm_avx2(values, masks, rows, cols, x, M, ldx, bias, y, ldy, p, p1);
}

// ---- many tokens, AVX-512: decode a block once, then a dense micro-kernel --------------------------------------
// The kernel above decodes each group again for every 8 tokens; once the product is bound by arithmetic that
// decoding costs a fifth or more of its time. Here a block of kBlockPanels panels x kBlockGroups groups is decoded
// once into a tile (fp32, per column the 32 rows of four panels) and multiplied with every token, kTileTokens at a
// time, by a micro-kernel that only loads and multiplies (24 accumulators: 12 tokens x 32 rows); partial sums go
// through Y between column blocks. The tile is per call and small (128 KiB): the dense weight never exists.
constexpr int64_t kBlockGroups = 64;  // 256 columns; kBlockPanels (sparse24.h): 128 rows
constexpr int kTileTokens = 12;
constexpr int64_t kTileFloats = kBlockPanels * 8 * kBlockGroups * 4;

template <int MR>
ROSE24_AVX512 static void micro_avx512(const float* tile, int64_t kc, const float* x, int64_t ldx, float* y,
                                       int64_t ldy, __mmask16 keep0, __mmask16 keep1, bool first,
                                       const float* bias) {
  __m512 acc[MR][2];
  for (int t = 0; t < MR; ++t) {
    if (first) {
      acc[t][0] = bias ? _mm512_maskz_loadu_ps(keep0, bias) : _mm512_setzero_ps();
      acc[t][1] = bias ? _mm512_maskz_loadu_ps(keep1, bias + 16) : _mm512_setzero_ps();
    } else {
      acc[t][0] = _mm512_maskz_loadu_ps(keep0, y + t * ldy);
      acc[t][1] = _mm512_maskz_loadu_ps(keep1, y + t * ldy + 16);
    }
  }
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_load_ps(tile + k * 32), b1 = _mm512_load_ps(tile + k * 32 + 16);
    for (int t = 0; t < MR; ++t) {
      const __m512 xb = _mm512_set1_ps(x[t * ldx + k]);
      acc[t][0] = _mm512_fmadd_ps(b0, xb, acc[t][0]);
      acc[t][1] = _mm512_fmadd_ps(b1, xb, acc[t][1]);
    }
  }
  for (int t = 0; t < MR; ++t) {
    _mm512_mask_storeu_ps(y + t * ldy, keep0, acc[t][0]);
    _mm512_mask_storeu_ps(y + t * ldy + 16, keep1, acc[t][1]);
  }
}

template <typename T>
ROSE24_AVX512 static void gemm_blocked_avx512(const T* values, const uint32_t* masks, int64_t rows, int64_t cols,
                                              const float* x, int64_t M, int64_t ldx, const float* bias, float* y,
                                              int64_t ldy, int64_t p0, int64_t p1) {
  const int64_t G = groups(cols), pend = p0 + ((p1 - p0) & ~int64_t{1});  // pairs here, an odd last panel below
  const __m512i bit0 = lane_bits();
  std::unique_ptr<float[], void (*)(void*)> owned(static_cast<float*>(std::aligned_alloc(64, kTileFloats * 4)),
                                                  &std::free);
  float* tile = owned.get();  // [micro-tile of 4 panels][column][32 rows]
  for (int64_t pb = p0; pb < pend; pb += kBlockPanels) {
    const int64_t pe = std::min(pend, pb + kBlockPanels), tiles = (pe - pb + 3) / 4;
    for (int64_t g0 = 0; g0 < G; g0 += kBlockGroups) {
      const int64_t ng = std::min(kBlockGroups, G - g0), kc = 4 * ng;
      for (int64_t p = pb; p < pe; p += 2) {
        const T* v0 = values + p * G * 16;
        const uint32_t* k0 = masks + p * G;
        float* out = tile + ((p - pb) / 4) * kc * 32 + ((p - pb) % 4) * 8;
        for (int64_t g = g0; g < g0 + ng; ++g) {
          prefetch_ahead(v0, k0, g, G);
          prefetch_ahead(v0 + G * 16, k0 + G, g, G);
          __m512 w[4];
          decode_pair(v0 + g * 16, v0 + G * 16 + g * 16, k0[g], k0[G + g], bit0, w);
          for (int j = 0; j < 4; ++j) _mm512_storeu_ps(out + (4 * (g - g0) + j) * 32, w[j]);
        }
      }
      if ((pe - pb) % 4)  // the last micro-tile holds one pair: its upper 16 lanes multiply zeros
        for (int64_t k = 0; k < kc; ++k)
          _mm512_storeu_ps(tile + (tiles - 1) * kc * 32 + k * 32 + 16, _mm512_setzero_ps());
      for (int64_t m0 = 0; m0 < M; m0 += kTileTokens) {
        const int mr = static_cast<int>(std::min<int64_t>(kTileTokens, M - m0));
        for (int64_t t = 0; t < tiles; ++t) {
          const int64_t row0 = (pb + 4 * t) * kPanel;
          const int64_t live = std::min<int64_t>(std::min<int64_t>(32, (pe - pb - 4 * t) * kPanel), rows - row0);
          const __mmask16 keep0 = static_cast<__mmask16>(live >= 16 ? 0xFFFF : (1u << live) - 1u);
          const __mmask16 keep1 = static_cast<__mmask16>(live <= 16 ? 0 : live >= 32 ? 0xFFFF : (1u << (live - 16)) - 1u);
          const float* xt = x + m0 * ldx + 4 * g0;
          float* yt = y + m0 * ldy + row0;
          const float* bt = bias ? bias + row0 : nullptr;
          const float* tt = tile + t * kc * 32;
          switch (mr) {
#define ROSE24_MICRO(n) \
  case n: micro_avx512<n>(tt, kc, xt, ldx, yt, ldy, keep0, keep1, g0 == 0, bt); break;
            ROSE24_MICRO(1) ROSE24_MICRO(2) ROSE24_MICRO(3) ROSE24_MICRO(4) ROSE24_MICRO(5) ROSE24_MICRO(6)
            ROSE24_MICRO(7) ROSE24_MICRO(8) ROSE24_MICRO(9) ROSE24_MICRO(10) ROSE24_MICRO(11)
            default: micro_avx512<12>(tt, kc, xt, ldx, yt, ldy, keep0, keep1, g0 == 0, bt);
#undef ROSE24_MICRO
          }
        }
      }
    }
  }
  if (pend < p1) gemm_avx2(values, masks, rows, cols, x, M, ldx, bias, y, ldy, pend, p1);
}
#endif

// ---- dispatch ------------------------------------------------------------------------------------------------

static bool cpu_has_avx2() {
#if ROSE24_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

static bool cpu_has_avx512() {
#if ROSE24_X86
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

Isa best_isa() {
  static const Isa best = [] {
    const char* env = std::getenv("ROSE24_ISA");
    const std::string want = env ? env : "";
    if (want == "scalar" || !cpu_has_avx2()) return Isa::kScalar;
    if (want == "avx2" || !cpu_has_avx512()) return Isa::kAvx2;
    return Isa::kAvx512;
  }();
  return best;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    default: return "auto";
  }
}

// A requested path the CPU lacks falls back to the best one below it.
static Isa resolve(Isa isa) {
  if (isa == Isa::kAuto) return best_isa();
  if (isa == Isa::kAvx512 && !cpu_has_avx512()) isa = Isa::kAvx2;
  if (isa == Isa::kAvx2 && !cpu_has_avx2()) isa = Isa::kScalar;
  return isa;
}

// From this many tokens on, the AVX-512 path decodes blocks once (gemm_blocked_avx512): below it the streaming
// kernel won in the DRAM regime (8-32 tokens), above it the block path (64 on). ROSE24_BLOCKED_FROM=N moves it
// (read once per process; the tests force both ways).
#ifndef ROSE24_BLOCKED_DEFAULT
#define ROSE24_BLOCKED_DEFAULT 48
#endif
int64_t blocked_from() {
  static const int64_t from = [] {
    const char* env = std::getenv("ROSE24_BLOCKED_FROM");
    return env && *env ? std::max<int64_t>(1, std::atoll(env)) : int64_t{ROSE24_BLOCKED_DEFAULT};
  }();
  return from;
}

template <typename T>
void gemm_panels(const T* values, const uint32_t* masks, int64_t rows, int64_t cols, const float* x, int64_t M,
                 int64_t ldx, const float* bias, float* y, int64_t ldy, int64_t p0, int64_t p1, Isa isa) {
  if (p0 < 0 || p1 > panels(rows) || p0 >= p1) return;  // nothing to do, never out of bounds
  switch (resolve(isa)) {
#if ROSE24_X86
    case Isa::kAvx512:
      if (M >= blocked_from())
        gemm_blocked_avx512(values, masks, rows, cols, x, M, ldx, bias, y, ldy, p0, p1);
      else
        gemm_avx512(values, masks, rows, cols, x, M, ldx, bias, y, ldy, p0, p1);
      return;
    case Isa::kAvx2: gemm_avx2(values, masks, rows, cols, x, M, ldx, bias, y, ldy, p0, p1); return;
#endif
    default: gemm_scalar(values, masks, rows, cols, x, M, ldx, bias, y, ldy, p0, p1);
  }
}

template <typename T>
void unpack_panels(const T* values, const uint32_t* masks, int64_t rows, int64_t cols, int64_t p0, int64_t p1,
                   T* out, int64_t ldo, Isa isa) {
  static_cast<void>(isa);  // unused where only the scalar path exists
#if ROSE24_X86
  if (resolve(isa) != Isa::kScalar) {
    unpack_avx2(values, masks, rows, cols, p0, p1, out, ldo);
    return;
  }
#endif
  unpack_scalar(values, masks, rows, cols, p0, p1, out, ldo);
}

template <typename T>
void gemm(const T* values, const uint32_t* masks, int64_t rows, int64_t cols, const float* x, int64_t M,
          int64_t ldx, const float* bias, float* y, int64_t ldy, int threads, Isa isa) {
  const int64_t P = panels(rows);
  const int64_t n = std::max<int64_t>(1, std::min<int64_t>(threads, P));
  if (n == 1) {
    gemm_panels(values, masks, rows, cols, x, M, ldx, bias, y, ldy, 0, P, isa);
    return;
  }
  std::vector<std::thread> pool;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t a = P * t / n, b = P * (t + 1) / n;
    pool.emplace_back([=] { gemm_panels(values, masks, rows, cols, x, M, ldx, bias, y, ldy, a, b, isa); });
  }
  for (auto& th : pool) th.join();
}

// ---- explicit instantiations -----------------------------------------------------------------------------------

#define ROSE24_INSTANTIATE(T)                                                                                     \
  template int64_t pack_bitmask<T>(const T*, const uint8_t*, int64_t, int64_t, T*, uint32_t*);                  \
  template void unpack_panels<T>(const T*, const uint32_t*, int64_t, int64_t, int64_t, int64_t, T*, int64_t, Isa);\
  template void gemm_panels<T>(const T*, const uint32_t*, int64_t, int64_t, const float*, int64_t, int64_t,       \
                               const float*, float*, int64_t, int64_t, int64_t, Isa);                            \
  template void gemm<T>(const T*, const uint32_t*, int64_t, int64_t, const float*, int64_t, int64_t,              \
                        const float*, float*, int64_t, int, Isa);
ROSE24_INSTANTIATE(float)
ROSE24_INSTANTIATE(uint16_t)

}  // namespace rose24
