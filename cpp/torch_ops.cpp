// PyTorch binding of the 2:4 kernel core:
// torch.ops.rose.sparse24_{pack,pack_bitmask,unpack,linear,isa,parallel_threads}.
// Threads come from PyTorch's own pool (at::parallel_for), so torch.set_num_threads governs both.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>

#include "sparse24.h"

namespace {

using rose24::Isa;

void check_values(const at::Tensor& values, const at::Tensor& masks, int64_t rows, int64_t cols) {
  TORCH_CHECK(rows > 0 && cols > 0 && cols % 4 == 0, "sparse24: needs rows > 0 and columns a multiple of 4, got ",
              rows, "x", cols);
  TORCH_CHECK(values.device().is_cpu() && masks.device().is_cpu(), "sparse24: packed weights must be on the CPU");
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16,
              "sparse24: values must be float32 or bfloat16, got ", values.scalar_type());
  TORCH_CHECK(masks.scalar_type() == at::kInt, "sparse24: masks must be int32, got ", masks.scalar_type());
  TORCH_CHECK(values.is_contiguous() && values.numel() == rose24::value_count(rows, cols),
              "sparse24: values do not match a ", rows, "x", cols, " weight (", values.numel(), " elements)");
  TORCH_CHECK(masks.is_contiguous() && masks.numel() == rose24::mask_count(rows, cols),
              "sparse24: masks do not match a ", rows, "x", cols, " weight (", masks.numel(), " elements)");
}

std::string bad_group(int64_t flat, int64_t cols) {
  const int64_t G = cols / 4, row = flat / G, g = flat % G;
  return "row " + std::to_string(row) + ", columns " + std::to_string(4 * g) + "-" + std::to_string(4 * g + 3);
}

std::tuple<at::Tensor, at::Tensor> pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "sparse24: the weight must be 2-D, got ", weight.dim(), "-D");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16,
              "sparse24: the weight must be float32 or bfloat16, got ", weight.scalar_type());
  const int64_t rows = weight.size(0), cols = weight.size(1);
  TORCH_CHECK(rows > 0 && cols % 4 == 0 && cols > 0, "sparse24: the weight's columns must be a multiple of 4, got ",
              rows, "x", cols);
  const at::Tensor W = weight.cpu().contiguous();
  at::Tensor values = at::empty({rose24::value_count(rows, cols)}, W.options());
  at::Tensor masks = at::empty({rose24::mask_count(rows, cols)}, W.options().dtype(at::kInt));
  auto* m = reinterpret_cast<uint32_t*>(masks.data_ptr<int32_t>());
  int64_t bad;
  if (W.scalar_type() == at::kFloat)
    bad = rose24::pack_dense(W.data_ptr<float>(), rows, cols, cols, values.data_ptr<float>(), m);
  else
    bad = rose24::pack_dense(reinterpret_cast<const uint16_t*>(W.data_ptr<at::BFloat16>()), rows, cols, cols,
                             reinterpret_cast<uint16_t*>(values.data_ptr<at::BFloat16>()), m);
  TORCH_CHECK(bad < 0, "sparse24: the weight is not 2:4: more than two nonzeros in ", bad_group(bad, cols));
  return {values, masks};
}

std::tuple<at::Tensor, at::Tensor> pack_bitmask(const at::Tensor& kept, const at::Tensor& bitmask, int64_t rows,
                                                int64_t cols) {
  TORCH_CHECK(rows > 0 && cols > 0 && cols % 4 == 0, "sparse24: needs columns a multiple of 4, got ", rows, "x", cols);
  TORCH_CHECK(kept.scalar_type() == at::kFloat || kept.scalar_type() == at::kBFloat16,
              "sparse24: kept values must be float32 or bfloat16, got ", kept.scalar_type());
  TORCH_CHECK(kept.numel() == rows * cols / 2, "sparse24: expected ", rows * cols / 2, " kept values, got ",
              kept.numel());
  TORCH_CHECK(bitmask.scalar_type() == at::kByte && bitmask.numel() == rows * ((cols + 7) / 8),
              "sparse24: expected a uint8 bitmask of ", rows, "x", (cols + 7) / 8, ", got ", bitmask.scalar_type(),
              " with ", bitmask.numel(), " elements");
  const at::Tensor K = kept.cpu().contiguous(), B = bitmask.cpu().contiguous();
  at::Tensor values = at::empty({rose24::value_count(rows, cols)}, K.options());
  at::Tensor masks = at::empty({rose24::mask_count(rows, cols)}, K.options().dtype(at::kInt));
  auto* m = reinterpret_cast<uint32_t*>(masks.data_ptr<int32_t>());
  int64_t bad;
  if (K.scalar_type() == at::kFloat)
    bad = rose24::pack_bitmask(K.data_ptr<float>(), B.data_ptr<uint8_t>(), rows, cols, values.data_ptr<float>(), m);
  else
    bad = rose24::pack_bitmask(reinterpret_cast<const uint16_t*>(K.data_ptr<at::BFloat16>()), B.data_ptr<uint8_t>(),
                               rows, cols, reinterpret_cast<uint16_t*>(values.data_ptr<at::BFloat16>()), m);
  TORCH_CHECK(bad < 0, "sparse24: the bitmask does not keep exactly two of four in ", bad_group(bad, cols));
  return {values, masks};
}

// Dense rows of panels [p0, p1) into out (row-major, leading dimension cols), in parallel over panels.
void unpack_into(const at::Tensor& values, const at::Tensor& masks, int64_t rows, int64_t cols, int64_t p0,
                 int64_t p1, at::Tensor& out) {
  const auto* m = reinterpret_cast<const uint32_t*>(masks.data_ptr<int32_t>());
  at::parallel_for(p0, p1, 1, [&](int64_t a, int64_t b) {
    if (values.scalar_type() == at::kFloat) {
      rose24::unpack_panels(values.data_ptr<float>(), m, rows, cols, a, b,
                            out.data_ptr<float>() + (a - p0) * rose24::kPanel * cols, cols);
    } else {
      rose24::unpack_panels(reinterpret_cast<const uint16_t*>(values.data_ptr<at::BFloat16>()), m, rows, cols, a, b,
                            reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) + (a - p0) * rose24::kPanel * cols,
                            cols);
    }
  });
}

at::Tensor unpack(const at::Tensor& values, const at::Tensor& masks, int64_t rows, int64_t cols) {
  check_values(values, masks, rows, cols);
  at::Tensor out = at::empty({rows, cols}, values.options());
  unpack_into(values, masks, rows, cols, 0, rose24::panels(rows), out);
  return out;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& masks, int64_t rows, int64_t cols,
                  const std::optional<at::Tensor>& bias, int64_t isa, int64_t dense_from, int64_t tile_bytes) {
  check_values(values, masks, rows, cols);
  TORCH_CHECK(isa >= 0 && isa <= 3, "sparse24: isa must be 0 (auto), 1 (scalar), 2 (avx2) or 3 (avx512), got ", isa);
  TORCH_CHECK(x.device().is_cpu(), "sparse24: the input must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "sparse24: the input must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == cols, "sparse24: the input's last dimension is ",
              x.dim() ? x.size(-1) : 0, " but the weight has ", cols, " columns");
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == rows, "sparse24: the bias must have ", rows, " elements");
    b = bias->to(at::kFloat).contiguous();
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = rows;
  at::Tensor x2 = x.reshape({-1, cols});
  const int64_t M = x2.size(0);
  if (M == 0) return at::zeros(shape, x.options());

  if (dense_from > 0 && M >= dense_from) {
    // Many tokens: the kernel above is dense-equivalent work with decoding on top, so BLAS wins. Unpack a few
    // panels at a time into one small dense tile (never the whole weight) and let at::mm do the product.
    // compute in fp32 unless input and weights are both bf16 (then like PyTorch's bf16 matmul), bias fused
    const auto compute = (x.scalar_type() == at::kBFloat16 && values.scalar_type() == at::kBFloat16) ? at::kBFloat16
                                                                                                    : at::kFloat;
    const at::Tensor xv = x2.to(compute);
    at::Tensor y = at::empty({M, rows}, xv.options());
    const at::Tensor bc = b.defined() ? b.to(compute) : b;
    const int64_t P = rose24::panels(rows);
    // at least 256 rows per tile: BLAS loses up to 30% on narrower products (measured on the dev machine)
    const int64_t tile_panels = std::min(
        P, std::max<int64_t>(256 / rose24::kPanel, tile_bytes / (rose24::kPanel * cols * values.element_size())));
    at::Tensor tile = at::empty({tile_panels * rose24::kPanel, cols}, values.options());
    for (int64_t p0 = 0; p0 < P; p0 += tile_panels) {
      const int64_t p1 = std::min(P, p0 + tile_panels);
      const int64_t r0 = p0 * rose24::kPanel, n = std::min(rows, p1 * rose24::kPanel) - r0;
      unpack_into(values, masks, rows, cols, p0, p1, tile);
      at::Tensor ys = y.narrow(1, r0, n);
      const at::Tensor wt = tile.narrow(0, 0, n).to(compute).t();
      if (bc.defined())
        at::addmm_out(ys, bc.narrow(0, r0, n), xv, wt);
      else
        at::mm_out(ys, xv, wt);
    }
    return y.to(x.scalar_type()).reshape(shape);
  }

  at::Tensor xf = x2.scalar_type() == at::kFloat ? x2 : x2.to(at::kFloat);
  if (xf.stride(1) != 1) xf = xf.contiguous();
  const int64_t ldx = xf.size(0) > 1 ? xf.stride(0) : cols;
  at::Tensor y = at::empty({M, rows}, x.options().dtype(at::kFloat));
  const auto* m = reinterpret_cast<const uint32_t*>(masks.data_ptr<int32_t>());
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const Isa path = static_cast<Isa>(isa);
  const int64_t P = rose24::panels(rows);
  // at least ~64k multiply-adds per task, so small layers do not pay for threads they cannot use
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, rose24::kPanel * cols * M));
  at::parallel_for(0, P, grain, [&](int64_t p0, int64_t p1) {
    if (values.scalar_type() == at::kFloat)
      rose24::gemm_panels(values.data_ptr<float>(), m, rows, cols, xp, M, ldx, bp, yp, rows, p0, p1, path);
    else
      rose24::gemm_panels(reinterpret_cast<const uint16_t*>(values.data_ptr<at::BFloat16>()), m, rows, cols, xp, M,
                          ldx, bp, yp, rows, p0, p1, path);
  });
  return (x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type())).reshape(shape);
}

std::string isa() { return rose24::isa_name(rose24::best_isa()); }

// How many threads one at::parallel_for of this library really uses (1 if it was built without OpenMP).
int64_t parallel_threads() {
  std::vector<int> used(at::get_num_threads() + 1, 0);
  at::parallel_for(0, 1024, 1, [&](int64_t, int64_t) { used[std::min<int>(at::get_thread_num(), used.size() - 1)] = 1; });
  return std::count(used.begin(), used.end(), 1);
}

}  // namespace

TORCH_LIBRARY(rose, m) {
  m.def("sparse24_pack(Tensor weight) -> (Tensor values, Tensor masks)");
  m.def("sparse24_pack_bitmask(Tensor kept, Tensor bitmask, int rows, int cols) -> (Tensor values, Tensor masks)");
  m.def("sparse24_unpack(Tensor values, Tensor masks, int rows, int cols) -> Tensor");
  m.def("sparse24_linear(Tensor x, Tensor values, Tensor masks, int rows, int cols, Tensor? bias=None, int isa=0, "
        "int dense_from=0, int tile_bytes=8388608) -> Tensor");
  m.def("sparse24_isa() -> str", &isa);
  m.def("sparse24_parallel_threads() -> int", &parallel_threads);
}

TORCH_LIBRARY_IMPL(rose, CPU, m) {
  m.impl("sparse24_pack", &pack);
  m.impl("sparse24_pack_bitmask", &pack_bitmask);
  m.impl("sparse24_unpack", &unpack);
  m.impl("sparse24_linear", &linear);
}
