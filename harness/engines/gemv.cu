// One-row bf16 products of the merged engine's decode step (harness/engines/gemv.py), each with the small
// computation before or after it folded in: the RMSNorm that feeds q/k/v, gate/up and lm_head, SiLU(gate) * up
// that feeds down, and the residual add after o and down. Rounding follows the model's eager bf16 forward: every
// value torch would store in bf16 is rounded to bf16 here too; sums and products are float32.
//
// A block of kWarps warps prepares the input once in shared memory, then each warp computes one output row at a
// time: its lanes stream the row in 16-byte chunks, kBatch chunks in flight per lane while the previous batch is
// multiplied, and reduce across the warp. The grid is sized to be resident at once, warps striding over the rows:
// no split along the inputs, so no second kernel to reduce. Launched with programmatic dependent launch, a kernel
// loads its first weights while the kernel before it finishes, and waits for that kernel
// (griddepcontrol.wait) before it reads anything the kernel before may have written.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kBatch = 8;  // 16-byte chunks of weights per lane per load batch

enum Prologue : int { kPlain = 0, kRmsNorm = 1, kSiluMul = 2 };

__device__ __forceinline__ uint4 load_weights(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ float lo(uint32_t u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float hi(uint32_t u) { return __uint_as_float(u & 0xffff0000u); }
__device__ __forceinline__ float round_bf16(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

__device__ __forceinline__ uint32_t pack(float a, float b) {
  __nv_bfloat162 r = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&r);
}

__device__ __forceinline__ float dot2(uint32_t w, uint32_t x, float acc) {
  return fmaf(hi(w), hi(x), fmaf(lo(w), lo(x), acc));
}

__device__ __forceinline__ float dot8(const uint4& w, const uint4& x, float acc) {
  return dot2(w.w, x.w, dot2(w.z, x.z, dot2(w.y, x.y, dot2(w.x, x.x, acc))));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float sum_squares(uint32_t u) { return lo(u) * lo(u) + hi(u) * hi(u); }

// HF's RMSNorm: weight * bf16(h * rsqrt(mean(h^2) + eps)), the product rounded to bf16
__device__ __forceinline__ uint32_t norm2(uint32_t h, uint32_t w, float rstd) {
  return pack(round_bf16(lo(w) * round_bf16(lo(h) * rstd)), round_bf16(hi(w) * round_bf16(hi(h) * rstd)));
}

__device__ __forceinline__ float silu_bf16(float g) { return round_bf16(g / (1.0f + expf(-g))); }

__device__ __forceinline__ uint32_t silu_mul2(uint32_t g, uint32_t u) {
  return pack(silu_bf16(lo(g)) * lo(u), silu_bf16(hi(g)) * hi(u));
}

__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void let_next_kernel_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// the input of the product, in shared memory as `chunks` 16-byte chunks of bf16
template <int P>
__device__ __forceinline__ void prepare(uint4* xs, const uint4* x, const uint4* norm_w, float eps, int chunks,
                                        float* partial) {
  if (P == kPlain) {
    for (int c = threadIdx.x; c < chunks; c += kThreads) xs[c] = x[c];
  } else if (P == kSiluMul) {  // x holds gate then up, each `chunks` long
    for (int c = threadIdx.x; c < chunks; c += kThreads) {
      const uint4 g = x[c], u = x[chunks + c];
      xs[c] = make_uint4(silu_mul2(g.x, u.x), silu_mul2(g.y, u.y), silu_mul2(g.z, u.z), silu_mul2(g.w, u.w));
    }
  } else {
    float squares = 0.0f;
    for (int c = threadIdx.x; c < chunks; c += kThreads) {
      const uint4 h = x[c];
      xs[c] = h;
      squares += sum_squares(h.x) + sum_squares(h.y) + sum_squares(h.z) + sum_squares(h.w);
    }
    squares = warp_sum(squares);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = squares;
    __syncthreads();
    float total = 0.0f;
#pragma unroll
    for (int i = 0; i < kWarps; ++i) total += partial[i];
    const float rstd = rsqrtf(total / static_cast<float>(chunks * 8) + eps);
    for (int c = threadIdx.x; c < chunks; c += kThreads) {  // the chunks this thread wrote above
      const uint4 h = xs[c], w = norm_w[c];
      xs[c] = make_uint4(norm2(h.x, w.x, rstd), norm2(h.y, w.y, rstd), norm2(h.z, w.z, rstd), norm2(h.w, w.w, rstd));
    }
  }
}

__device__ __forceinline__ void load_batch(uint4 (&buf)[kBatch], const uint4* w, int row, int n, int base,
                                           int chunks, int lane) {
  if (row >= n) return;
  const uint4* r = w + static_cast<size_t>(row) * chunks;
#pragma unroll
  for (int j = 0; j < kBatch; ++j) {
    const int c = base + j * 32 + lane;
    if (c < chunks) buf[j] = load_weights(r + c);
  }
}

// out[row] = bf16(W[row] . prepared x) (+ residual[row], rounded again), for every row < n
template <int P, bool kResidual>
__global__ void __launch_bounds__(kThreads, 2)
    gemv_kernel(const uint4* __restrict__ w, const uint4* __restrict__ x, const uint4* __restrict__ norm_w,
                const __nv_bfloat16* __restrict__ residual, __nv_bfloat16* __restrict__ out, int n, int chunks,
                float eps) {
  extern __shared__ uint4 xs[];
  __shared__ float partial[kWarps];
  const int lane = threadIdx.x & 31;
  const int stride = gridDim.x * kWarps;
  int row = blockIdx.x * kWarps + (threadIdx.x >> 5);
  int base = 0;
  uint4 current[kBatch];
  load_batch(current, w, row, n, base, chunks, lane);  // weights only: nothing the kernel before writes
  wait_for_previous_kernel();
  prepare<P>(xs, x, norm_w, eps, chunks, partial);
  __syncthreads();
  let_next_kernel_launch();
  float acc = 0.0f;
  while (row < n) {
    int next_row = row, next_base = base + 32 * kBatch;
    if (next_base >= chunks) {
      next_base = 0;
      next_row += stride;
    }
    uint4 next[kBatch];
    load_batch(next, w, next_row, n, next_base, chunks, lane);
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int c = base + j * 32 + lane;
      if (c < chunks) acc = dot8(current[j], xs[c], acc);
    }
    if (next_base == 0) {
      acc = warp_sum(acc);
      if (lane == 0) {
        float v = round_bf16(acc);
        if (kResidual) v = __bfloat162float(residual[row]) + v;
        out[row] = __float2bfloat16_rn(v);
      }
      acc = 0.0f;
    }
#pragma unroll
    for (int j = 0; j < kBatch; ++j) current[j] = next[j];
    row = next_row;
    base = next_base;
  }
}

template <int P, bool kResidual>
void launch(const at::Tensor& x, const at::Tensor& w, const uint4* norm_w, const at::Tensor* residual,
            at::Tensor& out, double eps, bool pdl) {
  auto kernel = gemv_kernel<P, kResidual>;
  const int n = static_cast<int>(w.size(0)), chunks = static_cast<int>(w.size(1) / 8);
  const size_t smem = static_cast<size_t>(chunks) * sizeof(uint4);
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  int per_sm = 0, device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  const int blocks = std::max(1, std::min((n + kWarps - 1) / kWarps, sms * std::max(per_sm, 1)));
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = c10::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = pdl ? 1 : 0;
  const __nv_bfloat16* res = residual ? reinterpret_cast<const __nv_bfloat16*>(residual->data_ptr()) : nullptr;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, reinterpret_cast<const uint4*>(w.data_ptr()),
                                    reinterpret_cast<const uint4*>(x.data_ptr()), norm_w, res,
                                    reinterpret_cast<__nv_bfloat16*>(out.data_ptr()), n, chunks,
                                    static_cast<float>(eps)));
}

void check_operand(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kBFloat16 && t.is_contiguous(), "qlora_gemv: ", what,
              " must be a contiguous bfloat16 CUDA tensor");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "qlora_gemv: ", what, " must be 16-byte aligned");
}

}  // namespace

// x: one row of the product's input (for prologue 2, gate then up); w: (n, k); returns (1, n)
at::Tensor gemv(const at::Tensor& x_in, const at::Tensor& w, const std::optional<at::Tensor>& norm_weight,
                double eps, const std::optional<at::Tensor>& residual_in, int64_t prologue, bool pdl) {
  TORCH_CHECK(w.dim() == 2 && w.size(1) % 8 == 0, "qlora_gemv: the weight must be (n, k) with k a multiple of 8");
  TORCH_CHECK(prologue >= kPlain && prologue <= kSiluMul, "qlora_gemv: prologue must be 0, 1 or 2");
  c10::cuda::CUDAGuard guard(w.device());
  const at::Tensor x = x_in.contiguous();
  check_operand(w, "the weight");
  check_operand(x, "the input");
  const int64_t k = w.size(1), n = w.size(0);
  TORCH_CHECK(x.numel() == (prologue == kSiluMul ? 2 * k : k), "qlora_gemv: the input holds ", x.numel(),
              " values for a weight of ", k, " inputs");
  const uint4* norm_w = nullptr;
  if (prologue == kRmsNorm) {
    TORCH_CHECK(norm_weight.has_value(), "qlora_gemv: prologue 1 (RMSNorm) needs the norm's weight");
    check_operand(*norm_weight, "the norm's weight");
    TORCH_CHECK(norm_weight->numel() == k, "qlora_gemv: the norm's weight must hold ", k, " values");
    norm_w = reinterpret_cast<const uint4*>(norm_weight->data_ptr());
  }
  at::Tensor residual;
  if (residual_in.has_value()) {
    residual = residual_in->contiguous();
    check_operand(residual, "the residual");
    TORCH_CHECK(residual.numel() == n, "qlora_gemv: the residual must hold ", n, " values");
  }
  at::Tensor out = at::empty({1, n}, w.options());
  const at::Tensor* r = residual.defined() ? &residual : nullptr;
  switch (prologue * 2 + (r != nullptr)) {
    case 0: launch<kPlain, false>(x, w, norm_w, r, out, eps, pdl); break;
    case 1: launch<kPlain, true>(x, w, norm_w, r, out, eps, pdl); break;
    case 2: launch<kRmsNorm, false>(x, w, norm_w, r, out, eps, pdl); break;
    case 3: launch<kRmsNorm, true>(x, w, norm_w, r, out, eps, pdl); break;
    case 4: launch<kSiluMul, false>(x, w, norm_w, r, out, eps, pdl); break;
    default: launch<kSiluMul, true>(x, w, norm_w, r, out, eps, pdl); break;
  }
  return out;
}

TORCH_LIBRARY(qlora_gemv, m) {
  m.def("gemv(Tensor x, Tensor w, Tensor? norm_weight, float eps, Tensor? residual, int prologue, bool pdl) -> Tensor");
}

TORCH_LIBRARY_IMPL(qlora_gemv, CUDA, m) { m.impl("gemv", &gemv); }
