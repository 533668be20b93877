// Declarations of the aclnn entry points csrc/ascend calls, from their published signatures.
//
// CANN's aclnn headers (aclnnop/aclnn_*.h) are not part of the torch_npu wheel, and torch_npu's
// EXEC_NPU_CMD resolves the entry points at run time by name (dlsym in libopapi.so / the custom
// op libraries), so nothing here is linked against. The declarations exist so that every call
// site is checked at compile time: V4K_CHECK_ACLNN_CALL asserts that the argument list a call
// passes, after op-plugin's ConvertTypes (at::Tensor and c10::optional<at::Tensor> ->
// aclTensor*, scalars unchanged), has exactly the declared parameter types. CANN declares
// tensor inputs as `const aclTensor *`; the const is dropped here because ConvertTypes yields
// `aclTensor *` and the ABI is the same.
//
// aclnnSparseFlashAttentionV2 (CANN ops-transformer; torch_npu's npu_sparse_flash_attention
// calls it when `sinks` is given): inputs query, key, value, sparseIndices, blockTable?,
// actualSeqLengthsQuery?, actualSeqLengthsKv?, queryRope?, keyRope?, sinks?; attributes
// scaleValue, sparseBlockSize, layoutQuery, layoutKv, sparseMode, preTokens, nextTokens,
// attentionMode, returnSoftmaxLse; outputs attentionOut, softmaxMax, softmaxSum; then the aclnn
// two-phase tail (workspaceSize, executor). Parameter order as in op-plugin's
// SparseFlashAttentionKernelNpuOpApi.cpp call site.
#pragma once

#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

struct aclTensor;
struct aclOpExecutor;
typedef int aclnnStatus;

extern "C" {
aclnnStatus aclnnSparseFlashAttentionV2GetWorkspaceSize(
    aclTensor* query, aclTensor* key, aclTensor* value, aclTensor* sparseIndices, aclTensor* blockTable,
    aclTensor* actualSeqLengthsQuery, aclTensor* actualSeqLengthsKv, aclTensor* queryRope, aclTensor* keyRope,
    aclTensor* sinks, double scaleValue, int64_t sparseBlockSize, char* layoutQuery, char* layoutKv,
    int64_t sparseMode, int64_t preTokens, int64_t nextTokens, int64_t attentionMode, bool returnSoftmaxLse,
    aclTensor* attentionOut, aclTensor* softmaxMax, aclTensor* softmaxSum, uint64_t* workspaceSize,
    aclOpExecutor** executor);
}

namespace v4k_ascend {

template <typename F>
struct fn_args;
template <typename R, typename... A>
struct fn_args<R (*)(A...)> {
  using type = std::tuple<A...>;
};

}  // namespace v4k_ascend

// Asserts that `ConvertTypes(args..., workspace, executor)` matches the declared signature of
// `api`GetWorkspaceSize, parameter by parameter.
#define V4K_CHECK_ACLNN_CALL(api, ...)                                                              \
  static_assert(                                                                                    \
      std::is_same_v<typename ::v4k_ascend::fn_args<decltype(&api##GetWorkspaceSize)>::type,       \
                     std::decay_t<decltype(ConvertTypes(__VA_ARGS__, std::declval<uint64_t*&>(), \
                                                        std::declval<aclOpExecutor**&>()))>>,       \
      #api ": call arguments do not match the declared aclnn signature")
