// The small part of onnxruntime's C ABI that rose's custom-operator library uses, declared here because no
// reachable package ships onnxruntime's headers. Everything below follows onnxruntime's public C API
// (include/onnxruntime/core/session/onnxruntime_c_api.h), which is append-only across releases: the function
// table `OrtApi` only grows at its end, enums keep their values, and `OrtCustomOp` only gains fields at its end
// (onnxruntime reads the newer ones only when the op's `version` says they exist).
//
// We never name OrtApi's members: the table is an array of function pointers, and we call the slots we need by
// index (`ort::call<kSlot>(...)`), each with the signature the public header gives it. Every slot listed in
// `Slot` is exercised by tests/test_ort_op.py (ROSE_ORT_TRACE=1 reports each slot's first use).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

extern "C" {

// Opaque onnxruntime types: only ever handled by pointer.
struct OrtApi;
struct OrtStatus;
struct OrtSessionOptions;
struct OrtCustomOpDomain;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtValue;
struct OrtTensorTypeAndShapeInfo;
struct OrtShapeInferContext;

// The entry point onnxruntime hands to RegisterCustomOps.
struct OrtApiBase {
  const OrtApi* (*GetApi)(uint32_t version);  // nullptr when this onnxruntime lacks that API version
  const char* (*GetVersionString)();
};

// Values from onnxruntime's public enums (their numbering is part of the ABI).
enum OrtErrorCode : int { ORT_OK = 0, ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 };

enum ONNXTensorElementDataType : int {  // = onnx.TensorProto.DataType
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED = 0,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT = 1,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 = 6,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16 = 16,
};

enum OrtCustomOpInputOutputCharacteristic : int {
  INPUT_OUTPUT_REQUIRED = 0,
  INPUT_OUTPUT_OPTIONAL = 1,
  INPUT_OUTPUT_VARIADIC = 2,
};

enum OrtMemType : int { OrtMemTypeDefault = 0 };

// A custom operator's schema and kernel callbacks, as of OrtCustomOp version 17 (onnxruntime 1.17): 26 fields.
// onnxruntime reads a field only if `version` is at least the version that introduced it, and skips a null
// optional callback (CreateKernelV2/KernelComputeV2 from 16, InferOutputShapeFn and Get{Start,End}Version from 17;
// the last four from 18 and 20, never read here because we declare version 17).
struct OrtCustomOp {
  uint32_t version;
  void* (*CreateKernel)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info);
  const char* (*GetName)(const OrtCustomOp* op);
  const char* (*GetExecutionProviderType)(const OrtCustomOp* op);  // nullptr: the CPU execution provider
  ONNXTensorElementDataType (*GetInputType)(const OrtCustomOp* op, size_t index);
  size_t (*GetInputTypeCount)(const OrtCustomOp* op);
  ONNXTensorElementDataType (*GetOutputType)(const OrtCustomOp* op, size_t index);
  size_t (*GetOutputTypeCount)(const OrtCustomOp* op);
  void (*KernelCompute)(void* kernel, OrtKernelContext* context);
  void (*KernelDestroy)(void* kernel);
  OrtCustomOpInputOutputCharacteristic (*GetInputCharacteristic)(const OrtCustomOp* op, size_t index);
  OrtCustomOpInputOutputCharacteristic (*GetOutputCharacteristic)(const OrtCustomOp* op, size_t index);
  OrtMemType (*GetInputMemoryType)(const OrtCustomOp* op, size_t index);
  int (*GetVariadicInputMinArity)(const OrtCustomOp* op);
  int (*GetVariadicInputHomogeneity)(const OrtCustomOp* op);
  int (*GetVariadicOutputMinArity)(const OrtCustomOp* op);
  int (*GetVariadicOutputHomogeneity)(const OrtCustomOp* op);
  OrtStatus* (*CreateKernelV2)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info, void** kernel);
  OrtStatus* (*KernelComputeV2)(void* kernel, OrtKernelContext* context);
  OrtStatus* (*InferOutputShapeFn)(const OrtCustomOp* op, OrtShapeInferContext* context);
  int (*GetStartVersion)(const OrtCustomOp* op);
  int (*GetEndVersion)(const OrtCustomOp* op);
  size_t (*GetMayInplace)(int** input_index, int** output_index);
  void (*ReleaseMayInplace)(int* input_index, int* output_index);
  size_t (*GetAliasMap)(int** input_index, int** output_index);
  void (*ReleaseAliasMap)(int* input_index, int* output_index);
};

}  // extern "C"

namespace ort {

// The oldest C API version that has every slot below (KernelContext_ParallelFor: onnxruntime 1.17).
constexpr uint32_t kApiVersion = 17;

// Slot indices in the OrtApi table and their signatures (from the public header, API version in brackets).
#define ROSE_ORT_SLOTS(X)                                                                                          \
  X(CreateStatus, 0, OrtStatus*, OrtErrorCode code, const char* msg)                                              \
  X(CreateCustomOpDomain, 26, OrtStatus*, const char* domain, OrtCustomOpDomain** out)                            \
  X(CustomOpDomain_Add, 27, OrtStatus*, OrtCustomOpDomain* domain, const OrtCustomOp* op)                         \
  X(AddCustomOpDomain, 28, OrtStatus*, OrtSessionOptions* options, OrtCustomOpDomain* domain)                     \
  X(GetTensorMutableData, 51, OrtStatus*, OrtValue* value, void** out)                                            \
  X(GetTensorElementType, 60, OrtStatus*, const OrtTensorTypeAndShapeInfo* info, ONNXTensorElementDataType* out)  \
  X(GetDimensionsCount, 61, OrtStatus*, const OrtTensorTypeAndShapeInfo* info, size_t* out)                       \
  X(GetDimensions, 62, OrtStatus*, const OrtTensorTypeAndShapeInfo* info, int64_t* dims, size_t count)            \
  X(GetTensorTypeAndShape, 65, OrtStatus*, const OrtValue* value, OrtTensorTypeAndShapeInfo** out)                \
  X(KernelInfoGetAttribute_int64, 86, OrtStatus*, const OrtKernelInfo* info, const char* name, int64_t* out)      \
  X(KernelContext_GetInputCount, 88, OrtStatus*, const OrtKernelContext* context, size_t* out)                    \
  X(KernelContext_GetInput, 90, OrtStatus*, const OrtKernelContext* context, size_t index, const OrtValue** out)  \
  X(KernelContext_GetOutput, 91, OrtStatus*, OrtKernelContext* context, size_t index, const int64_t* dims,        \
    size_t count, OrtValue** out)                                                                                 \
  X(ReleaseStatus, 93, void, OrtStatus* status)                                                                   \
  X(ReleaseTensorTypeAndShapeInfo, 99, void, OrtTensorTypeAndShapeInfo* info)                                     \
  X(ReleaseCustomOpDomain, 101, void, OrtCustomOpDomain* domain)                                                  \
  /* [15] */ X(KernelInfo_GetNodeName, 244, OrtStatus*, const OrtKernelInfo* info, char* out, size_t* size)       \
  /* [15] */ X(KernelInfoGetConstantInput_tensor, 249, OrtStatus*, const OrtKernelInfo* info, size_t index,       \
               int* is_constant, const OrtValue** out)                                                            \
  /* [17] */ X(KernelContext_ParallelFor, 274, OrtStatus*, const OrtKernelContext* context,                       \
               void (*fn)(void*, size_t), size_t total, size_t num_batch, void* user_data)

enum Slot : size_t {
#define ROSE_ORT_ENUM(name, index, ...) k##name = index,
  ROSE_ORT_SLOTS(ROSE_ORT_ENUM)
#undef ROSE_ORT_ENUM
};

// The function-pointer type of each slot.
template <Slot S>
struct SlotType;
#define ROSE_ORT_TYPE(name, index, ret, ...) \
  template <>                                \
  struct SlotType<k##name> {                 \
    using type = ret (*)(__VA_ARGS__);       \
    static constexpr const char* label = #name; \
  };
ROSE_ORT_SLOTS(ROSE_ORT_TYPE)
#undef ROSE_ORT_TYPE

// Called on each slot's first use when ROSE_ORT_TRACE is set (the tests' proof that every slot is called).
void trace_slot(size_t index, const char* label);
extern std::atomic<bool> g_trace;

// The table onnxruntime gave us (set in RegisterCustomOps, the same table for every session of a process).
extern std::atomic<const OrtApi*> g_api;

template <Slot S, typename... Args>
inline auto call_on(const OrtApi* api, Args... args) {
  if (g_trace.load(std::memory_order_relaxed)) trace_slot(S, SlotType<S>::label);
  const auto fn = reinterpret_cast<typename SlotType<S>::type>(reinterpret_cast<void* const*>(api)[S]);
  return fn(args...);
}

template <Slot S, typename... Args>
inline auto call(Args... args) {
  return call_on<S>(g_api.load(std::memory_order_relaxed), args...);
}

}  // namespace ort
