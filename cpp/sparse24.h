// rose 2:4 sparse linear kernel for the CPU: y = x W^T (+ b) with W stored as kept values plus 2 bits each.
// Plain C++17, no PyTorch. See cpp/README.md for the layout and the reasoning behind it.
//
// Layout ("panel-8"): the R output rows are cut into panels of 8 rows (the last one padded with empty rows).
// For panel p and column group g (4 columns, C/4 groups), 16 values and one 32-bit word are stored:
//   values[(p * G + g) * 16 + r]     first kept value of row 8p+r in group g   (r = 0..7)
//   values[(p * G + g) * 16 + 8 + r] second kept value of that row and group
//   masks[p * G + g] bits 4r..4r+3   which of the group's 4 columns row 8p+r keeps (exactly two bits set)
// So each kept value costs its own bytes plus 2 bits: 2.125 of every 4 dense bytes in fp32, 1.0625 of 2 in bf16.
// The 4-bit keep mask holds the same information as two 2-bit indices, and it decodes into dense SIMD lanes with
// shifts and blends, no compares; it is also the bit order of the packed24 export's bitmask.
#pragma once

#include <cstdint>

namespace rose24 {

constexpr int kPanel = 8;

inline int64_t panels(int64_t rows) { return (rows + kPanel - 1) / kPanel; }
inline int64_t groups(int64_t cols) { return cols / 4; }
inline int64_t value_count(int64_t rows, int64_t cols) { return panels(rows) * groups(cols) * 16; }
inline int64_t mask_count(int64_t rows, int64_t cols) { return panels(rows) * groups(cols); }

// Which code path runs: the best the CPU has (kAuto), or one forced (for tests and benchmarks).
enum class Isa : int { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3 };

// The path kAuto picks on this CPU; honours ROSE24_ISA=scalar|avx2|avx512 in the environment.
Isa best_isa();
const char* isa_name(Isa isa);

// bf16 is stored as its upper 16 bits (uint16_t); conversions round to nearest even.
float bf16_to_f32(uint16_t v);
uint16_t f32_to_bf16(float f);

// Pack a dense row-major R x C matrix (leading dimension ldw). Returns -1 on success, else the flat index
// row * (C/4) + group of the first group (in row-major order) holding more than two nonzeros; nothing is written.
// C must be a multiple of 4 (the caller checks). Zeros are kept where a group has fewer than two nonzeros.
int64_t pack_dense(const float* W, int64_t rows, int64_t cols, int64_t ldw, float* values, uint32_t* masks);
int64_t pack_dense(const uint16_t* W, int64_t rows, int64_t cols, int64_t ldw, uint16_t* values, uint32_t* masks);

// Pack from the packed24 export (kept values R x C/2 in column order, bitmask R x ceil(C/8) bytes, bit j of
// byte b marking column 8b+j) without building the dense matrix. Returns -1 on success, else the flat index of
// the first group whose bitmask nibble does not have exactly two bits set.
template <typename T>
int64_t pack_bitmask(const T* kept, const uint8_t* bitmask, int64_t rows, int64_t cols, T* values, uint32_t* masks);

// Check packed masks (as read from a file or another runtime): every row's nibble in every group, padding rows
// included, must have exactly two bits set. Returns -1 if they do, else the flat index row * (C/4) + group of the
// first bad nibble in panel order (a row >= R is a padding row). A bad nibble never makes the kernels read out of
// bounds, but it would give a wrong product: callers that take masks from outside check them once.
int64_t check_masks(const uint32_t* masks, int64_t rows, int64_t cols);

// The dense rows [8*p0, min(8*p1, R)) as a row-major (rows x C) block at out (leading dimension ldo).
template <typename T>
void unpack_panels(const T* values, const uint32_t* masks, int64_t rows, int64_t cols, int64_t p0, int64_t p1,
                   T* out, int64_t ldo, Isa isa = Isa::kAuto);

// y[m, r] = sum_c x[m, c] W[r, c] (+ bias[r]) for output panels [p0, p1) and all M rows of x (fp32, leading
// dimensions ldx and ldy). T is float or uint16_t (bf16). Single-threaded; callers split panels across threads.
template <typename T>
void gemm_panels(const T* values, const uint32_t* masks, int64_t rows, int64_t cols, const float* x, int64_t M,
                 int64_t ldx, const float* bias, float* y, int64_t ldy, int64_t p0, int64_t p1, Isa isa);

// From this many rows of x on, the AVX-512 path decodes blocks of 16 panels once and reuses them for every row
// (callers splitting panels across threads should then hand out multiples of 16 panels). ROSE24_BLOCKED_FROM=N
// in the environment moves it (read once per process).
int64_t blocked_from();
constexpr int64_t kBlockPanels = 16;

// Convenience: the whole product with `threads` std::threads (the PyTorch binding uses its own thread pool).
template <typename T>
void gemm(const T* values, const uint32_t* masks, int64_t rows, int64_t cols, const float* x, int64_t M,
          int64_t ldx, const float* bias, float* y, int64_t ldy, int threads, Isa isa);

}  // namespace rose24
