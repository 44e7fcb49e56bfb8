// One-row bf16 products of the merged engine's decode step (harness/engines/gemv.py), each with the small
// computation before or after it folded in: the RMSNorm that feeds q/k/v, gate/up and lm_head, SiLU(gate) * up
// after gate/up (a warp computes a gate row and its up row), and the residual add after o and down. Rounding follows the model's eager bf16 forward: every
// value torch would store in bf16 is rounded to bf16 here too; sums and products are float32.
//
// A block of kWarps warps prepares the input once in shared memory, then each warp computes one output row at a
// time: its lanes stream the row in 16-byte chunks, one batch of kBatch chunks a lane in flight while the batch
// before it is multiplied, and reduce across the warp. The grid is sized to be resident at once, warps striding over the rows:
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

// the block's shape, how it loads weights and which outputs it takes; defined otherwise only by .ci/decode_probe.py,
// which times other choices under other op names
#ifndef GEMV_WARPS
#define GEMV_WARPS 8
#define GEMV_BATCH 8
#define GEMV_MIN_BLOCKS 2
#define GEMV_LIBRARY qlora_gemv
#endif
#ifndef GEMV_LOAD
#define GEMV_LOAD 0  // 0: non-coherent, no L1 allocation, 256-byte L2 prefetch; 1: evict-first (.cs); 2: plain __ldg
#endif
#ifndef GEMV_CONTIGUOUS
#define GEMV_CONTIGUOUS 0  // 0: warps stride over the outputs grid-wide; 1: each block takes one contiguous range
#endif
constexpr int kWarps = GEMV_WARPS;
constexpr int kThreads = kWarps * 32;
constexpr int kBatch = GEMV_BATCH;  // 16-byte chunks of weights per lane per load batch

enum Prologue : int { kPlain = 0, kRmsNorm = 1 };
enum Epilogue : int { kStore = 0, kResidual = 1, kSiluPairs = 2 };

__device__ __forceinline__ uint4 load_weights(const uint4* p) {
#if GEMV_LOAD == 2
  return __ldg(p);
#else
  uint4 v;
#if GEMV_LOAD == 1
  asm volatile("ld.global.cs.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
#else
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
#endif
  return v;
#endif
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

// Where a warp is in its work: output `o`, its part `s` (gate then up for kSiluPairs), and the first chunk `base`
// of the batch. Outputs stride by the grid's warps; each part is one weight row, read in batches of kBatch chunks
// a lane.
struct Step {
  int o, s, base;
};

template <int E>
__device__ __forceinline__ Step advance(Step t, int chunks, int stride) {
  t.base += 32 * kBatch;
  if (t.base >= chunks) {
    t.base = 0;
    if (E == kSiluPairs && t.s == 0) {
      t.s = 1;
    } else {
      t.s = 0;
      t.o += stride;
    }
  }
  return t;
}

template <int E>
__device__ __forceinline__ void load_batch(uint4 (&buf)[kBatch], const uint4* w, Step t, int end, int outputs,
                                           int chunks, int lane) {
  if (t.o >= end) return;
  const uint4* r = w + (static_cast<size_t>(t.o) + static_cast<size_t>(t.s) * outputs) * chunks;
#pragma unroll
  for (int j = 0; j < kBatch; ++j) {
    const int c = t.base + j * 32 + lane;
    if (c < chunks) buf[j] = load_weights(r + c);
  }
}

__device__ __forceinline__ float dot_batch(const uint4 (&buf)[kBatch], const uint4* xs, int base, int chunks,
                                           int lane, float acc) {
#pragma unroll
  for (int j = 0; j < kBatch; ++j) {
    const int c = base + j * 32 + lane;
    if (c < chunks) acc = dot8(buf[j], xs[c], acc);
  }
  return acc;
}

// after the batch at `t`, with `next` the step after it: a finished row is summed across the warp and stored
template <int E>
__device__ __forceinline__ void finish(Step t, Step next, float& acc, float& gate, const __nv_bfloat16* residual,
                                       __nv_bfloat16* out, int lane) {
  if (next.base != 0) return;
  const float sum = warp_sum(acc);
  acc = 0.0f;
  if (E == kSiluPairs && t.s == 0) {
    gate = sum;
    return;
  }
  if (lane != 0) return;
  float v = round_bf16(sum);
  if (E == kResidual) v = __bfloat162float(residual[t.o]) + v;
  if (E == kSiluPairs) v = silu_bf16(round_bf16(gate)) * v;
  out[t.o] = __float2bfloat16_rn(v);
}

// out[o] = bf16(W[o] . prepared x), plus residual[o] (rounded again), or SiLU(gate) * up with gate = W[o] . x and
// up = W[outputs + o] . x; for every o < outputs
template <int P, int E>
__global__ void __launch_bounds__(kThreads, GEMV_MIN_BLOCKS)
    gemv_kernel(const uint4* __restrict__ w, const uint4* __restrict__ x, const uint4* __restrict__ norm_w,
                const __nv_bfloat16* __restrict__ residual, __nv_bfloat16* __restrict__ out, int outputs, int chunks,
                float eps) {
  extern __shared__ uint4 xs[];
  __shared__ float partial[kWarps];
  const int lane = threadIdx.x & 31, warp = static_cast<int>(threadIdx.x >> 5), block = static_cast<int>(blockIdx.x);
#if GEMV_CONTIGUOUS
  const int per_block = (outputs + gridDim.x - 1) / gridDim.x;
  const int stride = kWarps, end = min(outputs, (block + 1) * per_block);
  Step t = {block * per_block + warp, 0, 0};
#else
  const int stride = gridDim.x * kWarps, end = outputs;
  Step t = {block * kWarps + warp, 0, 0};
#endif
  uint4 a[kBatch], b[kBatch];  // two batches in flight: the loop alternates between them, so no register copies
  load_batch<E>(a, w, t, end, outputs, chunks, lane);  // weights only: nothing the kernel before writes
  wait_for_previous_kernel();
  prepare<P>(xs, x, norm_w, eps, chunks, partial);
  __syncthreads();
  let_next_kernel_launch();
  float acc = 0.0f, gate = 0.0f;
  while (t.o < end) {
    Step next = advance<E>(t, chunks, stride);
    load_batch<E>(b, w, next, end, outputs, chunks, lane);
    acc = dot_batch(a, xs, t.base, chunks, lane, acc);
    finish<E>(t, next, acc, gate, residual, out, lane);
    t = next;
    if (t.o >= end) break;
    next = advance<E>(t, chunks, stride);
    load_batch<E>(a, w, next, end, outputs, chunks, lane);
    acc = dot_batch(b, xs, t.base, chunks, lane, acc);
    finish<E>(t, next, acc, gate, residual, out, lane);
    t = next;
  }
}

template <int P, int E>
void launch(const at::Tensor& x, const at::Tensor& w, const uint4* norm_w, const __nv_bfloat16* residual,
            at::Tensor& out, int outputs, double eps, bool pdl) {
  auto kernel = gemv_kernel<P, E>;
  const int chunks = static_cast<int>(w.size(1) / 8);
  const size_t smem = static_cast<size_t>(chunks) * sizeof(uint4);
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  int per_sm = 0, device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  const int blocks = std::max(1, std::min((outputs + kWarps - 1) / kWarps, sms * std::max(per_sm, 1)));
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
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, reinterpret_cast<const uint4*>(w.data_ptr()),
                                    reinterpret_cast<const uint4*>(x.data_ptr()), norm_w, residual,
                                    reinterpret_cast<__nv_bfloat16*>(out.data_ptr()), outputs, chunks,
                                    static_cast<float>(eps)));
}

void check_operand(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kBFloat16 && t.is_contiguous(), "qlora_gemv: ", what,
              " must be a contiguous bfloat16 CUDA tensor");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "qlora_gemv: ", what, " must be 16-byte aligned");
}

}  // namespace

// x: one row of the product's input; w: (n, k). With norm_weight, x is RMS-normed first. Returns (1, n), or with
// silu_pairs (1, n / 2): SiLU(gate) * up of the two halves of the product. With residual (n values), adds it.
at::Tensor gemv(const at::Tensor& x_in, const at::Tensor& w, const std::optional<at::Tensor>& norm_weight,
                double eps, const std::optional<at::Tensor>& residual_in, bool silu_pairs, bool pdl) {
  TORCH_CHECK(w.dim() == 2 && w.size(1) % 8 == 0, "qlora_gemv: the weight must be (n, k) with k a multiple of 8");
  TORCH_CHECK(!(silu_pairs && residual_in.has_value()), "qlora_gemv: silu_pairs takes no residual");
  TORCH_CHECK(!silu_pairs || w.size(0) % 2 == 0, "qlora_gemv: silu_pairs needs an even number of weight rows");
  c10::cuda::CUDAGuard guard(w.device());
  const at::Tensor x = x_in.contiguous();
  check_operand(w, "the weight");
  check_operand(x, "the input");
  const int64_t k = w.size(1);
  const int outputs = static_cast<int>(silu_pairs ? w.size(0) / 2 : w.size(0));
  TORCH_CHECK(x.numel() == k, "qlora_gemv: the input holds ", x.numel(), " values for a weight of ", k, " inputs");
  const uint4* norm_w = nullptr;
  if (norm_weight.has_value()) {
    check_operand(*norm_weight, "the norm's weight");
    TORCH_CHECK(norm_weight->numel() == k, "qlora_gemv: the norm's weight must hold ", k, " values");
    norm_w = reinterpret_cast<const uint4*>(norm_weight->data_ptr());
  }
  at::Tensor residual;
  if (residual_in.has_value()) {
    residual = residual_in->contiguous();
    check_operand(residual, "the residual");
    TORCH_CHECK(residual.numel() == outputs, "qlora_gemv: the residual must hold ", outputs, " values");
  }
  at::Tensor out = at::empty({1, outputs}, w.options());
  const auto* res = residual.defined() ? reinterpret_cast<const __nv_bfloat16*>(residual.data_ptr()) : nullptr;
  const int epilogue = silu_pairs ? kSiluPairs : (res ? kResidual : kStore);
  switch ((norm_w ? 3 : 0) + epilogue) {
    case 0: launch<kPlain, kStore>(x, w, norm_w, res, out, outputs, eps, pdl); break;
    case 1: launch<kPlain, kResidual>(x, w, norm_w, res, out, outputs, eps, pdl); break;
    case 2: launch<kPlain, kSiluPairs>(x, w, norm_w, res, out, outputs, eps, pdl); break;
    case 3: launch<kRmsNorm, kStore>(x, w, norm_w, res, out, outputs, eps, pdl); break;
    case 4: launch<kRmsNorm, kResidual>(x, w, norm_w, res, out, outputs, eps, pdl); break;
    default: launch<kRmsNorm, kSiluPairs>(x, w, norm_w, res, out, outputs, eps, pdl); break;
  }
  return out;
}

TORCH_LIBRARY(GEMV_LIBRARY, m) {
  m.def("gemv(Tensor x, Tensor w, Tensor? norm_weight, float eps, Tensor? residual, bool silu_pairs, bool pdl) -> "
        "Tensor");
}

TORCH_LIBRARY_IMPL(GEMV_LIBRARY, CUDA, m) {
  m.impl("gemv", &gemv);
}
