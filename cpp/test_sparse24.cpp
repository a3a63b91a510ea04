// Standalone test of the kernel core (no PyTorch): built and run under AddressSanitizer and
// UndefinedBehaviorSanitizer by tests/test_cpp.py, or by hand:
//   g++ -std=c++17 -O1 -g -fsanitize=address,undefined cpp/sparse24.cpp cpp/test_sparse24.cpp -o /tmp/t && /tmp/t
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "sparse24.h"

using namespace rose24;

static int failures = 0;
#define CHECK(cond, ...)                      \
  do {                                        \
    if (!(cond)) {                            \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);      \
      std::fprintf(stderr, "\n");             \
      ++failures;                             \
    }                                         \
  } while (0)

// A random 2:4 matrix (some groups with fewer than two nonzeros, some exact zeros).
static std::vector<float> random24(int64_t rows, int64_t cols, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int> pick(0, 5), sparse(0, 9);
  static const int pairs[6][2] = {{0, 1}, {0, 2}, {0, 3}, {1, 2}, {1, 3}, {2, 3}};
  std::vector<float> W(rows * cols, 0.0f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < cols / 4; ++g) {
      const int* pr = pairs[pick(rng)];
      const int kind = sparse(rng);
      if (kind != 0) W[r * cols + 4 * g + pr[0]] = normal(rng);
      if (kind != 1) W[r * cols + 4 * g + pr[1]] = normal(rng);
    }
  return W;
}

template <typename T>
static double max_rel_error(const std::vector<float>& y, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    num = std::max(num, std::fabs(y[i] - ref[i]));
    den = std::max(den, std::fabs(ref[i]));
  }
  return num / (den > 0 ? den : 1.0);
}

static void test_case(int64_t rows, int64_t cols, int64_t M, bool with_bias, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::vector<float> W = random24(rows, cols, rng);
  const int64_t ldx = cols + 3;  // rows of x not contiguous with each other
  std::vector<float> x(M * ldx), bias(rows);
  for (auto& v : x) v = normal(rng);
  for (auto& v : bias) v = normal(rng);
  const float* b = with_bias ? bias.data() : nullptr;

  // fp32 values
  std::vector<float> values(value_count(rows, cols));
  std::vector<uint32_t> masks(mask_count(rows, cols));
  CHECK(pack_dense(W.data(), rows, cols, cols, values.data(), masks.data()) == -1, "pack rejected a 2:4 matrix");
  std::vector<double> ref(M * rows);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t r = 0; r < rows; ++r) {
      double s = b ? b[r] : 0.0;
      for (int64_t c = 0; c < cols; ++c) s += double(x[m * ldx + c]) * W[r * cols + c];
      ref[m * rows + r] = s;
    }
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAuto})
    for (int threads : {1, 2, 3}) {
      std::vector<float> y(M * rows + 32, NAN);  // 32 guard values: masked stores are invisible to ASan
      gemm(values.data(), masks.data(), rows, cols, x.data(), M, ldx, b, y.data(), rows, threads, isa);
      bool guard = true;
      for (int64_t i = M * rows; i < M * rows + 32; ++i) guard &= std::isnan(y[i]);
      CHECK(guard, "%s %lldx%lld M=%lld wrote past the output", isa_name(isa), (long long)rows, (long long)cols,
            (long long)M);
      y.resize(M * rows);
      const double err = max_rel_error<float>(y, ref);
      CHECK(err <= 1e-5, "fp32 %s %lldx%lld M=%lld threads=%d: rel error %g", isa_name(isa), (long long)rows,
            (long long)cols, (long long)M, threads, err);
    }

  // unpack gives the matrix back exactly
  for (Isa isa : {Isa::kScalar, Isa::kAvx2}) {  // in two slices of panels, into a wider buffer
    const int64_t P = panels(rows), ld = cols + 4;
    std::vector<float> back(P * kPanel * ld, NAN);
    unpack_panels(values.data(), masks.data(), rows, cols, 0, P / 2, back.data(), ld, isa);
    unpack_panels(values.data(), masks.data(), rows, cols, P / 2, P, back.data() + (P / 2) * kPanel * ld, ld, isa);
    bool same = true;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) same &= back[r * ld + c] == W[r * cols + c];
    for (int64_t r = rows; r < P * kPanel; ++r) same &= std::isnan(back[r * ld]);  // padding rows untouched
    CHECK(same, "unpack (%s) does not give the matrix back (%lldx%lld)", isa_name(isa), (long long)rows,
          (long long)cols);
  }

  CHECK(check_masks(masks.data(), rows, cols) == -1, "check_masks rejected packed masks (%lldx%lld)",
        (long long)rows, (long long)cols);

  // packing from the packed24 export's (kept values, bitmask) gives the same bytes
  const int64_t mb = (cols + 7) / 8;
  std::vector<float> kept(rows * cols / 2);
  std::vector<uint8_t> bitmask(rows * mb, 0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < cols / 4; ++g) {
      const int64_t p = r / kPanel, G = cols / 4;
      const uint32_t nib = masks[p * G + g] >> (4 * (r % kPanel)) & 0xf;
      bitmask[r * mb + g / 2] |= static_cast<uint8_t>(nib << (4 * (g & 1)));
      kept[r * cols / 2 + 2 * g] = values[(p * G + g) * 16 + r % kPanel];
      kept[r * cols / 2 + 2 * g + 1] = values[(p * G + g) * 16 + 8 + r % kPanel];
    }
  std::vector<float> values2(values.size());
  std::vector<uint32_t> masks2(masks.size());
  CHECK(pack_bitmask(kept.data(), bitmask.data(), rows, cols, values2.data(), masks2.data()) == -1,
        "pack_bitmask rejected a valid bitmask");
  CHECK(values2 == values && masks2 == masks, "pack_bitmask differs from pack_dense");

  // bf16 values, fp32 accumulation: against the dense product of the bf16-rounded weights
  std::vector<uint16_t> Wh(rows * cols);
  for (int64_t i = 0; i < rows * cols; ++i) Wh[i] = f32_to_bf16(W[i]);
  std::vector<uint16_t> vh(values.size());
  CHECK(pack_dense(Wh.data(), rows, cols, cols, vh.data(), masks2.data()) == -1, "bf16 pack rejected 2:4");
  for (int64_t m = 0; m < M; ++m)
    for (int64_t r = 0; r < rows; ++r) {
      double s = b ? b[r] : 0.0;
      for (int64_t c = 0; c < cols; ++c) s += double(x[m * ldx + c]) * bf16_to_f32(Wh[r * cols + c]);
      ref[m * rows + r] = s;
    }
  for (Isa isa : {Isa::kScalar, Isa::kAvx2}) {
    std::vector<uint16_t> back(rows * cols, 0xffff);
    unpack_panels(vh.data(), masks2.data(), rows, cols, 0, panels(rows), back.data(), cols, isa);
    bool same = true;
    for (int64_t i = 0; i < rows * cols; ++i) same &= back[i] == Wh[i] || (back[i] == 0 && (Wh[i] & 0x7fff) == 0);
    CHECK(same, "bf16 unpack (%s) differs (%lldx%lld)", isa_name(isa), (long long)rows, (long long)cols);
  }
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    std::vector<float> y(M * rows, NAN);
    gemm(vh.data(), masks2.data(), rows, cols, x.data(), M, ldx, b, y.data(), rows, 2, isa);
    const double err = max_rel_error<float>(y, ref);
    CHECK(err <= 1e-5, "bf16 %s %lldx%lld M=%lld: rel error %g", isa_name(isa), (long long)rows, (long long)cols,
          (long long)M, err);
  }
}

static void test_errors(std::mt19937& rng) {
  std::vector<float> W = random24(9, 12, rng);
  W[5 * 12 + 4] = W[5 * 12 + 5] = W[5 * 12 + 6] = 1.0f;  // row 5, group 1 holds three nonzeros
  std::vector<float> values(value_count(9, 12));
  std::vector<uint32_t> masks(mask_count(9, 12));
  CHECK(pack_dense(W.data(), 9, 12, 12, values.data(), masks.data()) == 5 * 3 + 1, "a 3-of-4 group was accepted");
  W[8 * 12 + 0] = W[8 * 12 + 1] = W[8 * 12 + 2] = 1.0f;  // row 8 (a later panel) too: still row 5 is reported
  W[1 * 12 + 8] = W[1 * 12 + 9] = W[1 * 12 + 10] = 1.0f;  // and row 1, group 2: first in row-major order
  CHECK(pack_dense(W.data(), 9, 12, 12, values.data(), masks.data()) == 1 * 3 + 2, "not the first bad group");
  std::vector<float> kept(9 * 6, 1.0f);
  std::vector<uint8_t> bitmask(9 * 2, 0x33);
  bitmask[2 * 2 + 1] = 0x37;  // row 2, group 2: three bits
  CHECK(pack_bitmask(kept.data(), bitmask.data(), 9, 12, values.data(), masks.data()) == 2 * 3 + 2,
        "a bitmask nibble with three bits was accepted");

  // check_masks: the first bad nibble in panel order, padding rows included
  W = random24(9, 12, rng);
  CHECK(pack_dense(W.data(), 9, 12, 12, values.data(), masks.data()) == -1, "pack rejected a 2:4 matrix");
  CHECK(check_masks(masks.data(), 9, 12) == -1, "check_masks rejected good masks");
  std::vector<uint32_t> bad(masks);
  bad[1 * 3 + 2] ^= 1u << 4 * 0;  // panel 1 (row 8), group 2: one bit flipped
  CHECK(check_masks(bad.data(), 9, 12) == 8 * 3 + 2, "a flipped bit in row 8 was not found");
  bad[0 * 3 + 1] &= ~(0xfu << 4 * 6);  // panel 0, row 6, group 1: no bits at all
  CHECK(check_masks(bad.data(), 9, 12) == 6 * 3 + 1, "an empty nibble in row 6 was not the first reported");
  bad = masks;
  bad[1 * 3 + 0] |= 0xfu << 4 * 7;  // row 15: a padding row of the last panel
  CHECK(check_masks(bad.data(), 9, 12) == 15 * 3 + 0, "a bad padding-row nibble was not found");
  std::vector<uint32_t> many(mask_count(8, 4 * 3000), 0x33333333u);  // several blocks; the bad word in a late one
  CHECK(check_masks(many.data(), 8, 4 * 3000) == -1, "check_masks rejected good masks (several blocks)");
  many[2500] = 0x33333330u;
  CHECK(check_masks(many.data(), 8, 4 * 3000) == 2500, "a bad nibble in a late block was not found");
}

int main() {
  std::mt19937 rng(1234);
  std::printf("isa: %s\n", isa_name(best_isa()));
  // {203, 520}: several blocks of rows and columns in the many-token AVX-512 path, the last ones partial
  const int64_t shapes[][2] = {{1, 4}, {8, 8}, {9, 12}, {17, 36}, {31, 100}, {64, 64}, {70, 260}, {203, 520}};
  for (const auto& s : shapes)
    for (int64_t M : {1, 2, 3, 5, 6, 7, 13, 33}) test_case(s[0], s[1], M, (M % 2) == 1, rng);
  std::uniform_int_distribution<int> rr(1, 80), cc(1, 70), mm(1, 33);
  for (int i = 0; i < 40; ++i) test_case(rr(rng), 4 * cc(rng), mm(rng), i % 2, rng);
  test_errors(rng);
  if (failures) {
    std::fprintf(stderr, "%d failures\n", failures);
    return 1;
  }
  std::printf("all passed\n");
  return 0;
}
