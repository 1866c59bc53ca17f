// CUDA backward of shadow attention (FlashAttention-2 recomputation from the saved lse):
//   P = exp(scale q k^T - lse) on visible pairs, dS = P * (dO v^T - Delta + grad_lse),
//   Delta = rowsum(dO * O), dV = P^T dO, dK = scale dS^T q, dQ = scale dS k.
// Split into two kernels so that every gradient element is written exactly once and no atomics
// or zero-filled outputs are needed: a dQ kernel (block = query tile, streams key tiles) and a
// dK/dV kernel (block = key tile, streams the query tiles of every head of its GQA group). Both
// recompute S and dP; the extra two GEMMs buy deterministic results without an fp32 dQ buffer.
// The kernel families and how one is chosen: shadow_attention_kernels.h.
#include "shadow_attention_common.cuh"
#include "shadow_attention_kernels.h"
#include "shadow_attention_simt.cuh"
#include "shadow_attention_wmma.cuh"

namespace shadowkv {
namespace {

using namespace cuda_attn;

// Per-row inputs of both kernels, in a contiguous [B, Hq, Lq] workspace:
//   lse2  = lse * log2(e), or +inf for rows that saw no key (so that exp2(x - lse2) = 0),
//   delta = rowsum(dO * O) - grad_lse, or 0 for rows that saw no key.
template <typename T>
__global__ void bwd_rows_kernel(const ShadowAttentionBwdParams bp, float* __restrict__ lse2, float* __restrict__ delta) {
  const ShadowAttentionParams& p = bp.fwd;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.batch * p.num_q_heads * p.q_len) return;  // whole warps leave together
  const int64_t i = row % p.q_len, bh = row / p.q_len;
  const int64_t hq = bh % p.num_q_heads, b = bh / p.num_q_heads;
  const T* o = static_cast<const T*>(p.out) + b * p.o_stride[0] + hq * p.o_stride[1] + i * p.o_stride[2];
  const T* go = static_cast<const T*>(bp.grad_out) + b * bp.do_stride[0] + hq * bp.do_stride[1] + i * bp.do_stride[2];
  float acc = 0.f;
  for (int64_t d = lane; d < p.head_dim; d += 32) acc += to_f32(o[d]) * to_f32(go[d]);
  acc = warp_sum(acc);
  if (lane == 0) {
    const float g = bp.grad_lse == nullptr
                        ? 0.f
                        : static_cast<const float*>(bp.grad_lse)[b * bp.glse_stride[0] + hq * bp.glse_stride[1] + i];
    const float lse = static_cast<const float*>(p.lse)[b * p.lse_stride[0] + hq * p.lse_stride[1] + i];
    // A row that saw no key takes no part in the gradient (its P is 0): delta = 0 keeps a
    // non-finite grad_lse or dO of such a row from turning 0 * (dp - delta) into NaN.
    delta[row] = lse == -INFINITY ? 0.f : acc - g;
    lse2[row] = lse == -INFINITY ? INFINITY : lse * kLog2e;
  }
}

// ------------------------------------------------------------------------------------------
// Host side: launches of the kernels of shadow_attention_wmma.cuh and shadow_attention_simt.cuh.

template <typename Kernel>
void launch_bwd_kernel(Kernel kernel, const BwdLaunch& a, int64_t blocks, int threads, size_t smem, const char* name) {
  if (blocks == 0) return;
  set_smem_limit(kernel, smem);
  kernel<<<grid_1d(blocks, name), threads, smem, a.stream>>>(a.bp, a.mm, a.n_ev, a.lse2, a.delta, a.scale_log2);
  check_launch(name);
}

template <typename T, int D>
void launch_bwd_tc(const BwdLaunch& a) {
  using Tr = TcTraits<D>;
  const ShadowAttentionParams& p = a.bp.fwd;
  launch_bwd_kernel(dq_tc_kernel<T, D>, a, p.batch * p.num_q_heads * ceil_div(p.q_len, Tr::kRows), Tr::kThreads,
                    DqTcSmem<T, D>().bytes, "dq_tc_kernel");
  launch_bwd_kernel(dkdv_tc_kernel<T, D>, a, p.batch * p.num_kv_heads * ceil_div(p.kv_len, Tr::kRows), Tr::kThreads,
                    DkvTcSmem<T, D>().bytes, "dkdv_tc_kernel");
}

template <typename T>
void launch_bwd_simt(const BwdLaunch& a) {
  const ShadowAttentionParams& p = a.bp.fwd;
  const int d = static_cast<int>(p.head_dim);
  const int rows = SimtTraits::bwd_rows(d), threads = SimtTraits::bwd_threads(d);
  launch_bwd_kernel(dq_simt_kernel<T>, a, p.batch * p.num_q_heads * ceil_div(p.q_len, rows), threads,
                    DqSimtSmem(d).bytes, "dq_simt_kernel");
  launch_bwd_kernel(dkdv_simt_kernel<T>, a, p.batch * p.num_kv_heads * ceil_div(p.kv_len, rows), threads,
                    DkvSimtSmem(d).bytes, "dkdv_simt_kernel");
}

bool bwd_uses_tensor_cores(const ShadowAttentionBwdParams& bp) {
  const ShadowAttentionParams& p = bp.fwd;
  return p.dtype != DType::kFloat32 && (p.head_dim == 64 || p.head_dim == 128) && rows_16b_aligned(p.q, p.q_stride) &&
         rows_16b_aligned(p.k, p.k_stride) && rows_16b_aligned(p.v, p.v_stride) &&
         rows_16b_aligned(bp.grad_out, bp.do_stride) && device_cc_major() >= 8;
}

}  // namespace

void shadow_attention_bwd_cuda(const ShadowAttentionBwdParams& bp, void* stream) {
  constexpr const char* kFn = "shadow_attention_bwd_cuda";
  const ShadowAttentionParams& p = bp.fwd;
  check_shadow_attention_bwd_params(bp, kFn);
  check_cuda_support(p, kFn);
  const bool has_q = p.batch * p.num_q_heads * p.q_len > 0;
  const bool has_kv = p.batch * p.num_kv_heads * p.kv_len > 0;
  // Nothing to write when every gradient is empty; head_dim == 0 leaves empty gradients too.
  if (p.head_dim == 0 || (!has_q && !has_kv)) return;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const AttnKernel choice = requested_kernel(kFn);
  const bool tc = choice != AttnKernel::kSimt && bwd_uses_tensor_cores(bp);

  DeviceWorkspace ev_mm(ev_minmax_bytes(p), s);
  launch_ev_minmax(p, ev_mm.as<int2>(), s);
  const int64_t n_rows = has_q ? p.batch * p.num_q_heads * p.q_len : 0;
  DeviceWorkspace rows(2 * static_cast<size_t>(n_rows) * sizeof(float), s);
  float* lse2 = rows.as<float>();
  float* delta = lse2 == nullptr ? nullptr : lse2 + n_rows;

  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (n_rows > 0) {
      constexpr int kThreads = 256;
      bwd_rows_kernel<T><<<grid_1d(ceil_div(n_rows * 32, kThreads), "bwd_rows_kernel"), kThreads, 0, s>>>(bp, lse2,
                                                                                                         delta);
      check_launch("bwd_rows_kernel");
    }
    const BwdLaunch a{bp, ev_mm.as<int2>(), ev_minmax_tiles(p), lse2, delta,
                      static_cast<float>(p.scale * 1.4426950408889634), s};
    if constexpr (!std::is_same<T, float>::value) {
#ifdef SHADOWKV_HAS_CUTE
#ifdef SHADOWKV_HAS_SM90A  // else the wgmma families are not built (CMakeLists.txt): cute runs
      if (tc && (choice == AttnKernel::kAuto || choice == AttnKernel::kWgmma || choice == AttnKernel::kWgmmaWs) &&
          wgmma_available(s)) {
        return launch_bwd_wgmma(bp, a.mm, a.n_ev, lse2, delta, a.scale_log2, s);
      }
      if (tc && choice == AttnKernel::kWgmmaWsb && wgmma_available(s)) {
        return launch_bwd_wgmma_ws(bp, a.mm, a.n_ev, lse2, delta, a.scale_log2, s);
      }
      if (tc && choice == AttnKernel::kWgmmaWsf && wgmma_available(s)) {
        return launch_bwd_wgmma_wsf(bp, a.mm, a.n_ev, lse2, delta, a.scale_log2, s);
      }
      if (tc && choice == AttnKernel::kWgmmaFused && wgmma_available(s)) {
        return launch_bwd_wgmma_fused(bp, a.mm, a.n_ev, lse2, delta, a.scale_log2, s);
      }
#endif
      if (tc && choice != AttnKernel::kWmma) {  // cute, and the wgmma families where no sm_90a code runs
        return launch_bwd_cute(bp, a.mm, a.n_ev, lse2, delta, a.scale_log2, s);
      }
#endif
      if (tc) {
        if (p.head_dim == 64) return launch_bwd_tc<T, 64>(a);
        if (p.head_dim == 128) return launch_bwd_tc<T, 128>(a);
      }
    }
    launch_bwd_simt<T>(a);
  });
}

}  // namespace shadowkv
