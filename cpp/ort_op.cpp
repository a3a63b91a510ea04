// rose's onnxruntime custom-operator library: operator `Sparse24MatMul` in domain `rose`, running the 2:4 kernel
// core (sparse24.cpp) on onnxruntime's intra-op thread pool. No onnxruntime header and no PyTorch: the C ABI it
// needs is declared in ort_abi.h. The operator's contract is in cpp/README.md.
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "ort_abi.h"
#include "sparse24.h"

namespace ort {

std::atomic<const OrtApi*> g_api{nullptr};
std::atomic<bool> g_trace{false};

void trace_slot(size_t index, const char* label) {
  static std::atomic<bool> seen[512];
  if (index < 512 && !seen[index].exchange(true)) std::fprintf(stderr, "rose_ort: slot %zu %s\n", index, label);
}

}  // namespace ort

namespace {

using ort::call;

constexpr const char* kDomain = "rose";
constexpr const char* kOpName = "Sparse24MatMul";
enum Input : size_t { kX = 0, kValues = 1, kMasks = 2, kBias = 3, kInputs = 4 };

void trace(const std::string& what) {
  if (ort::g_trace.load(std::memory_order_relaxed)) std::fprintf(stderr, "rose_ort: %s\n", what.c_str());
}

OrtStatus* error(const std::string& msg) { return call<ort::kCreateStatus>(ORT_INVALID_ARGUMENT, msg.c_str()); }

const char* type_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    default: return "another type";
  }
}

std::string shape_text(const std::vector<int64_t>& dims) {
  std::string s = "(";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + (dims.size() == 1 ? ",)" : ")");
}

// Element type, shape and data of one tensor.
struct Tensor {
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> dims;
  int64_t numel = 1;
  void* data = nullptr;
};

#define ROSE_RETURN_IF_ERROR(expr)  \
  do {                              \
    if (OrtStatus* s_ = (expr)) return s_; \
  } while (0)

OrtStatus* inspect(const OrtValue* value, Tensor& t) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  ROSE_RETURN_IF_ERROR(call<ort::kGetTensorTypeAndShape>(value, &info));
  size_t rank = 0;
  OrtStatus* s = call<ort::kGetTensorElementType>(info, &t.type);
  if (!s) s = call<ort::kGetDimensionsCount>(info, &rank);
  if (!s) {
    t.dims.assign(rank, 0);
    s = call<ort::kGetDimensions>(info, t.dims.data(), rank);
  }
  call<ort::kReleaseTensorTypeAndShapeInfo>(info);
  if (s) return s;
  t.numel = 1;
  for (int64_t d : t.dims) {
    if (d < 0 || (d > 0 && t.numel > (int64_t{1} << 62) / d)) return error("a tensor's shape is too large");
    t.numel *= d;
  }
  // onnxruntime's API has no const variant before 1.23; the kernel never writes through input pointers
  return call<ort::kGetTensorMutableData>(const_cast<OrtValue*>(value), &t.data);
}

std::string group_text(int64_t flat, int64_t rows, int64_t cols) {
  const int64_t G = rose24::groups(cols), row = flat / G, g = flat % G;
  return (row < rows ? "row " : "padding row ") + std::to_string(row) + ", columns " + std::to_string(4 * g) + "-" +
         std::to_string(4 * g + 3);
}

// One node's kernel: its attributes, and the constant masks already checked when the session was created.
struct Kernel {
  std::string where;  // "rose.Sparse24MatMul node 'name'" for messages
  int64_t rows = 0, cols = 0;
  ONNXTensorElementDataType values_type = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  const void* checked_masks = nullptr;

  OrtStatus* fail(const std::string& msg) const { return error(where + ": " + msg); }

  // Checks one packed input against the attributes: element type, 1-D, exact length.
  OrtStatus* check_packed(const Tensor& t, const char* what, ONNXTensorElementDataType want, int64_t count) const {
    if (t.type != want)
      return fail(std::string(what) + " must be " + type_name(want) + ", got " + type_name(t.type));
    if (t.dims.size() != 1 || t.numel != count)
      return fail(std::string(what) + " must be 1-D with " + std::to_string(count) + " elements for a " +
                  std::to_string(rows) + "x" + std::to_string(cols) + " weight, got shape " + shape_text(t.dims));
    return nullptr;
  }

  OrtStatus* check_masks(const Tensor& masks) const {
    ROSE_RETURN_IF_ERROR(check_packed(masks, "masks", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32,
                                      rose24::mask_count(rows, cols)));
    if (masks.data == checked_masks) return nullptr;
    trace("checking masks of " + where);
    const int64_t bad = rose24::check_masks(static_cast<const uint32_t*>(masks.data), rows, cols);
    if (bad >= 0)
      return fail("masks are corrupt: " + group_text(bad, rows, cols) + " does not keep exactly 2 of 4 (a damaged "
                  "or wrongly packed weight)");
    return nullptr;
  }

  OrtStatus* check_values(const Tensor& values) const {
    return check_packed(values, "values", values_type, rose24::value_count(rows, cols));
  }

  OrtStatus* check_bias(const Tensor& bias) const {
    if (bias.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      return fail(std::string("bias must be float, got ") + type_name(bias.type));
    if (bias.dims.size() != 1 || bias.numel != rows)
      return fail("bias must be 1-D with " + std::to_string(rows) + " elements, got shape " + shape_text(bias.dims));
    return nullptr;
  }
};

OrtStatus* read_int(const OrtKernelInfo* info, const char* name, int64_t& out) {
  if (OrtStatus* s = call<ort::kKernelInfoGetAttribute_int64>(info, name, &out)) {
    call<ort::kReleaseStatus>(s);  // onnxruntime's own message does not say what the attribute is for
    return error(std::string("rose.Sparse24MatMul needs the int attribute '") + name +
                 "' (the dense weight is rows x cols)");
  }
  return nullptr;
}

std::string node_name(const OrtKernelInfo* info) {
  size_t size = 0;
  if (OrtStatus* s = call<ort::kKernelInfo_GetNodeName>(info, nullptr, &size)) {
    call<ort::kReleaseStatus>(s);
    return "";
  }
  std::string name(size, '\0');
  if (OrtStatus* s = call<ort::kKernelInfo_GetNodeName>(info, name.data(), &size)) {
    call<ort::kReleaseStatus>(s);
    return "";
  }
  name.resize(std::strlen(name.c_str()));
  return name;
}

OrtStatus* create_kernel(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** out,
                         ONNXTensorElementDataType values_type) {
  auto k = std::make_unique<Kernel>();
  k->values_type = values_type;
  const std::string name = node_name(info);
  k->where = std::string("rose.Sparse24MatMul") + (name.empty() ? "" : " node '" + name + "'");
  ROSE_RETURN_IF_ERROR(read_int(info, "rows", k->rows));
  ROSE_RETURN_IF_ERROR(read_int(info, "cols", k->cols));
  // bounds keep every count below int64's range and the kernel's int arithmetic exact
  if (k->rows <= 0 || k->cols <= 0 || k->cols % 4 || k->rows > (int64_t{1} << 31) || k->cols > (int64_t{1} << 31))
    return k->fail("needs rows > 0 and cols a positive multiple of 4, got rows=" + std::to_string(k->rows) +
                   " cols=" + std::to_string(k->cols));
  // Constant (initializer) weights are checked once, here: a bad one fails the session's creation.
  const Input packed[] = {kValues, kMasks};
  for (Input i : packed) {
    int is_constant = 0;
    const OrtValue* value = nullptr;
    ROSE_RETURN_IF_ERROR(call<ort::kKernelInfoGetConstantInput_tensor>(info, i, &is_constant, &value));
    if (!is_constant || !value) continue;
    Tensor t;
    ROSE_RETURN_IF_ERROR(inspect(value, t));
    if (i == kValues) {
      ROSE_RETURN_IF_ERROR(k->check_values(t));
    } else {
      ROSE_RETURN_IF_ERROR(k->check_masks(t));
      k->checked_masks = t.data;
    }
  }
  *out = k.release();
  return nullptr;
}

// ---- compute -------------------------------------------------------------------------------------------------

#ifndef ROSE_TASK_MACS
#define ROSE_TASK_MACS 131072
#endif
constexpr int64_t kTaskMacs = ROSE_TASK_MACS;

struct Job {
  const Kernel* k;
  const void* values;
  const uint32_t* masks;
  const float* x;
  const float* bias;
  float* y;
  int64_t M, panels_per_task, P;
};

void run_task(void* user, size_t task) {
  const Job& j = *static_cast<const Job*>(user);
  const int64_t p0 = static_cast<int64_t>(task) * j.panels_per_task;
  const int64_t p1 = std::min(j.P, p0 + j.panels_per_task);
  const Kernel& k = *j.k;
  if (k.values_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
    rose24::gemm_panels(static_cast<const float*>(j.values), j.masks, k.rows, k.cols, j.x, j.M, k.cols, j.bias, j.y,
                        k.rows, p0, p1, rose24::Isa::kAuto);
  else
    rose24::gemm_panels(static_cast<const uint16_t*>(j.values), j.masks, k.rows, k.cols, j.x, j.M, k.cols, j.bias,
                        j.y, k.rows, p0, p1, rose24::Isa::kAuto);
}

OrtStatus* compute(void* kernel, OrtKernelContext* ctx) {
  const Kernel& k = *static_cast<const Kernel*>(kernel);
  size_t n_inputs = 0;
  ROSE_RETURN_IF_ERROR(call<ort::kKernelContext_GetInputCount>(ctx, &n_inputs));
  Tensor in[kInputs];
  bool present[kInputs] = {false, false, false, false};
  for (size_t i = 0; i < std::min<size_t>(n_inputs, kInputs); ++i) {
    const OrtValue* v = nullptr;
    ROSE_RETURN_IF_ERROR(call<ort::kKernelContext_GetInput>(ctx, i, &v));
    if (!v) continue;  // an optional input left empty
    ROSE_RETURN_IF_ERROR(inspect(v, in[i]));
    present[i] = true;
  }
  if (!present[kX] || !present[kValues] || !present[kMasks])
    return k.fail("needs inputs X, values and masks (bias optional)");
  const Tensor& X = in[kX];
  if (X.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
    return k.fail(std::string("X must be float, got ") + type_name(X.type));
  if (X.dims.empty() || X.dims.back() != k.cols)
    return k.fail("X's last dimension must be cols=" + std::to_string(k.cols) + ", got shape " + shape_text(X.dims));
  ROSE_RETURN_IF_ERROR(k.check_values(in[kValues]));
  ROSE_RETURN_IF_ERROR(k.check_masks(in[kMasks]));
  if (present[kBias]) ROSE_RETURN_IF_ERROR(k.check_bias(in[kBias]));

  std::vector<int64_t> out_dims = X.dims;
  out_dims.back() = k.rows;
  OrtValue* out = nullptr;
  ROSE_RETURN_IF_ERROR(call<ort::kKernelContext_GetOutput>(ctx, 0, out_dims.data(), out_dims.size(), &out));
  const int64_t M = X.numel / k.cols;
  if (M == 0) return nullptr;
  Tensor Y;
  ROSE_RETURN_IF_ERROR(inspect(out, Y));

  const float* bias = present[kBias] ? static_cast<const float*>(in[kBias].data) : nullptr;
  Job job{&k, in[kValues].data, static_cast<const uint32_t*>(in[kMasks].data), static_cast<const float*>(X.data),
          bias, static_cast<float*>(Y.data), M, 0, rose24::panels(k.rows)};
  // Tasks of whole panel pairs (the AVX-512 path works on two panels at a time; with many tokens, on blocks of
  // 16), at least ~128k multiply-adds each so that small products stay on one thread, and at most 64 tasks for the
  // pool to balance.
  const int64_t panel_work = rose24::kPanel * k.cols * std::min<int64_t>(M, 1 << 20);  // no overflow
  const int64_t min_panels = (kTaskMacs + panel_work - 1) / panel_work;
  const int64_t unit = M >= rose24::blocked_from() ? rose24::kBlockPanels : 2;
  int64_t per_task = std::max<int64_t>({unit, min_panels, (job.P + 63) / 64});
  per_task = (per_task + unit - 1) / unit * unit;
  job.panels_per_task = per_task;
  const size_t tasks = static_cast<size_t>((job.P + per_task - 1) / per_task);
  if (tasks == 1) {
    run_task(&job, 0);
    return nullptr;
  }
  return call<ort::kKernelContext_ParallelFor>(ctx, &run_task, tasks, size_t{0}, static_cast<void*>(&job));
}

// ---- the operator's schema: two kernels of one operator, fp32 and bf16 values ---------------------------------

template <ONNXTensorElementDataType kValuesType>
struct Op {
  static OrtCustomOp make() {
    OrtCustomOp op;
    std::memset(&op, 0, sizeof(op));
    op.version = ort::kApiVersion;
    op.GetName = [](const OrtCustomOp*) { return kOpName; };
    op.GetExecutionProviderType = [](const OrtCustomOp*) -> const char* { return nullptr; };
    op.GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return kInputs; };
    op.GetInputType = [](const OrtCustomOp*, size_t i) {
      switch (i) {
        case kValues: return kValuesType;
        case kMasks: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
        default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;  // X, bias
      }
    };
    op.GetInputCharacteristic = [](const OrtCustomOp*, size_t i) {
      return i == kBias ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
    };
    op.GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
    op.GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 1; };
    op.GetOutputType = [](const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; };
    op.GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
    op.CreateKernelV2 = [](const OrtCustomOp* o, const OrtApi* api, const OrtKernelInfo* info, void** out) {
      return create_kernel(o, api, info, out, kValuesType);
    };
    op.KernelComputeV2 = [](void* kernel, OrtKernelContext* ctx) { return compute(kernel, ctx); };
    op.KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
    return op;
  }
};

const OrtCustomOp g_op_f32 = Op<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT>::make();
const OrtCustomOp g_op_bf16 = Op<ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16>::make();

// Domains live as long as the library: onnxruntime keeps pointers to them in every session options object that
// registered it, and unloads the library only after those are gone.
struct Domains {
  std::mutex mu;
  std::vector<OrtCustomOpDomain*> all;
  ~Domains() {
    for (OrtCustomOpDomain* d : all) call<ort::kReleaseCustomOpDomain>(d);
  }
} g_domains;

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                                const OrtApiBase* base) {
  ort::g_trace.store(std::getenv("ROSE_ORT_TRACE") != nullptr);
  // Test hook: ask for a newer API than this onnxruntime has, to see the message an old onnxruntime gives.
  uint32_t version = ort::kApiVersion;
  if (const char* v = std::getenv("ROSE_ORT_API_VERSION")) version = std::max<uint32_t>(version, std::atoi(v));
  const OrtApi* api = base->GetApi(version);
  if (!api) {
    const OrtApi* v1 = base->GetApi(1);  // every onnxruntime has version 1, whose slot 0 is CreateStatus
    if (!v1) return nullptr;
    // C API version N arrived with onnxruntime 1.N
    const std::string msg = std::string("rose's onnxruntime operators need C API version ") +
                            std::to_string(version) + " (onnxruntime 1." + std::to_string(version) +
                            " or newer); this onnxruntime is " + base->GetVersionString();
    return ort::call_on<ort::kCreateStatus>(v1, ORT_FAIL, msg.c_str());
  }
  ort::g_api.store(api);
  trace(std::string("kernel path ") + rose24::isa_name(rose24::best_isa()));
  OrtCustomOpDomain* domain = nullptr;
  ROSE_RETURN_IF_ERROR(call<ort::kCreateCustomOpDomain>(kDomain, &domain));
  {
    std::lock_guard<std::mutex> lock(g_domains.mu);
    g_domains.all.push_back(domain);
  }
  ROSE_RETURN_IF_ERROR(call<ort::kCustomOpDomain_Add>(domain, &g_op_f32));
  ROSE_RETURN_IF_ERROR(call<ort::kCustomOpDomain_Add>(domain, &g_op_bf16));
  return call<ort::kAddCustomOpDomain>(options, domain);
}
