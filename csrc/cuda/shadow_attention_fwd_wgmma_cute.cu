// Shadow-attention forward for sm_90a (H100/H200) with warpgroup MMAs (wgmma) through CUTLASS
// CuTe: bfloat16/float16, head_dim 64 or 128. Built only with the CuTe headers; its body is
// compiled only for sm_90a (elsewhere it traps, and the host never picks it: see
// wgmma_available). Same results contract as the other kernels: out and lse of the
// shadow mask, fp32 accumulation, rows without a visible key give out = 0, lse = -inf.
//
// Per block: 64 query rows of one (batch, query head), one warpgroup (4 warps). Per key tile of
// 64, the schedule of the sm_80 CuTe kernel (shadow_attention_fwd_cute.cu) with both products
// on wgmma (shadow_attention_wgmma.cuh):
//   wait K -> issue V copy -> S = Q K^T (wgmma, smem x smem) -> mask + online softmax ->
//   wait V -> issue next live K copy -> O += P V (wgmma, P from registers).
// Key tiles that the eviction log hides from all 64 rows are never loaded (ev_minmax pre-pass).
// Tiles are copied with cp.async; cp.async and the zero fills write shared memory through the
// generic proxy and wgmma reads it through the async proxy, so every thread fences
// (fence.proxy.async) before the barrier that publishes a tile.
#include "shadow_attention_common.cuh"
#include "shadow_attention_cute.cuh"
#include "shadow_attention_fwd_tile.cuh"
#include "shadow_attention_kernels.h"
#include "shadow_attention_wgmma.cuh"

#include <mutex>
#include <vector>

namespace shadowkv {
namespace cuda_attn {
namespace {

using namespace cute;
using cuda_cute::copy_rows;
using cuda_cute::copy_rows_if;
using cuda_cute::gmem_tile;
using cuda_cute::load_column_log;
using cuda_wgmma::acc_rowcol;
using cuda_wgmma::as_a_operand;
using cuda_wgmma::fence_smem_for_wgmma;
using cuda_wgmma::FwdTraits;

// 1 in the sm_90a build of this file, 0 in the others: what wgmma_available asks the loaded
// binary (the wgmma kernels' bodies are traps everywhere but sm_90a).
__global__ void wgmma_probe_kernel(int* out) { *out = SHADOWKV_WGMMA_BODY; }

template <typename T, int D>
__global__ void __launch_bounds__(FwdTraits<T, D>::kThreads)
    fwd_wgmma_kernel(const ShadowAttentionParams p, const int2* __restrict__ ev_mm, int64_t n_ev_tiles,
                     float scale_log2) {
#if !SHADOWKV_WGMMA_BODY
  __trap();  // the host only picks this kernel where the sm_90a body was built and loads
#else
  using Tr = FwdTraits<T, D>;
  using E = typename Tr::Element;
  constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN;
  const int tid = threadIdx.x;

  unsigned char* smem = cuda_wgmma::smem_1024();
  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<E*>(smem)), typename Tr::SmemLayoutOwn{});
  Tensor sK = make_tensor(make_smem_ptr(reinterpret_cast<E*>(smem + Tr::kOwnBytes)), typename Tr::SmemLayoutPartner{});
  Tensor sV = make_tensor(make_smem_ptr(reinterpret_cast<E*>(smem + Tr::kOwnBytes + Tr::kPartnerBytes)),
                          typename Tr::SmemLayoutPartner{});
  Tensor sVt = make_tensor(sV.data(), typename Tr::SmemLayoutPartnerT{});
  int* kinds_s = reinterpret_cast<int*>(smem + Tr::kOwnBytes + 2 * Tr::kPartnerBytes);

  const QueryTile t = query_tile(p, BM);
  const E* qg = static_cast<const E*>(p.q) + t.b * p.q_stride[0] + t.hq * p.q_stride[1] + t.i0 * p.q_stride[2];
  const E* kg = static_cast<const E*>(p.k) + t.b * p.k_stride[0] + t.hkv * p.k_stride[1];
  const E* vg = static_cast<const E*>(p.v) + t.b * p.v_stride[0] + t.hkv * p.v_stride[1];
  const int32_t* evg = p.evicted_at + t.b * p.ev_stride[0] + t.hkv * p.ev_stride[1];
  const int2* mm = ev_mm + (t.b * p.num_kv_heads + t.hkv) * n_ev_tiles;

  typename Tr::GmemTiledCopy gmem_copy;
  auto gmem_thr = gmem_copy.get_thread_slice(tid);
  Tensor tQsQ = gmem_thr.partition_D(sQ);
  Tensor tKsK = gmem_thr.partition_D(sK);
  Tensor tVsV = gmem_thr.partition_D(sV);
  Tensor tQcQ = gmem_thr.partition_S(make_identity_tensor(Shape<Int<BM>, Int<D>>{}));
  Tensor tKVcKV = gmem_thr.partition_S(make_identity_tensor(Shape<Int<BN>, Int<D>>{}));

  typename Tr::TiledMmaS mma_s;
  typename Tr::TiledMmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(tid);
  auto thr_o = mma_o.get_thread_slice(tid);
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);  // shared-memory descriptors
  Tensor tSrK = thr_s.partition_fragment_B(sK);
  Tensor tOrV = thr_o.partition_fragment_B(sVt);
  Tensor acc_o = partition_fragment_C(mma_o, Shape<Int<BM>, Int<D>>{});
  clear(acc_o);

  // (row, key) of each score register, and the same registers as (rows, cols) for the softmax.
  Tensor tScS = thr_s.partition_C(make_identity_tensor(Shape<Int<BM>, Int<BN>>{}));
  Tensor tScS_rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
  constexpr int kRows = decltype(size<0>(tScS_rc))::value;  // 2: rows lane/4 and lane/4 + 8 of the warp
  constexpr int kCols = decltype(size<1>(tScS_rc))::value;
  float m_run[kRows], l_run[kRows];  // running max (log2 domain) and this thread's partial sum
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    m_run[r] = -INFINITY;
    l_run[r] = 0.f;
  }

  copy_rows(gmem_copy, gmem_thr.partition_S(gmem_tile<BM, D>(qg, p.q_stride[2], 0)), tQsQ, tQcQ, t.rows);

  // Keys past the last query position are in every row's future.
  const int64_t n_key_tiles = (min(p.kv_len, t.p1 + 1) + BN - 1) / BN;
  auto next_live = [&](int64_t from, TileKind& kind) {
    return next_live_tile<BN>(from, n_key_tiles, kinds_s, mm, n_ev_tiles, p, t, kind);
  };

  TileKind kind = TileKind::kSkip;
  int64_t tile = next_live(0, kind);
  if (tile < n_key_tiles) {
    copy_rows(gmem_copy, gmem_thr.partition_S(gmem_tile<BN, D>(kg, p.k_stride[2], tile * BN)), tKsK, tKVcKV,
              p.kv_len - tile * BN);
  }
  cp_async_fence();

  while (tile < n_key_tiles) {
    const int64_t k0 = tile * BN;
    TileKind next_kind = TileKind::kSkip;
    const int64_t next = next_live(tile + 1, next_kind);

    cp_async_wait<0>();
    fence_smem_for_wgmma();
    __syncthreads();  // K (and Q) landed for every thread; the last P V wgmma is done with V
    // V rows no valid row of the block can see are staged as zeros (v_row_needed).
    const TileKind kind_now = kind;
    copy_rows_if(gmem_copy, gmem_thr.partition_S(gmem_tile<BN, D>(vg, p.v_stride[2], k0)), tVsV, tKVcKV,
                 [&](int row) { return v_row_needed(row, k0, p, t, kind_now, evg); });
    cp_async_fence();

    Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<BM>, Int<BN>>{});
    cuda_wgmma::gemm</*kZero=*/true, /*kRegisterA=*/false>(mma_s, tSrQ, tSrK, acc_s);

    // Mask, scale into the log2 domain, online softmax. P overwrites S in place.
    Tensor s = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));
    Tensor o_rc = make_tensor(acc_o.data(), acc_rowcol(acc_o.layout()));
    int ev_col[kCols];
    load_column_log(ev_col, evg, k0, p.kv_len, tScS_rc, kind == TileKind::kPartial, kEvOutOfRange);
    softmax_tile(s, tScS_rc, o_rc, ev_col, kind == TileKind::kPartial, k0, t.p0, scale_log2, m_run, l_run);

    cp_async_wait<0>();
    fence_smem_for_wgmma();
    __syncthreads();  // V landed for every thread; the S wgmma is done with this K
    if (next < n_key_tiles) {
      copy_rows(gmem_copy, gmem_thr.partition_S(gmem_tile<BN, D>(kg, p.k_stride[2], next * BN)), tKsK, tKVcKV,
                p.kv_len - next * BN);
    }
    cp_async_fence();

    // O += P V, with P rounded to the input type (as FlashAttention does).
    Tensor rP = as_a_operand<E>(acc_s);
    cuda_wgmma::gemm</*kZero=*/false, /*kRegisterA=*/true>(mma_o, rP, tOrV, acc_o);

    tile = next;
    kind = next_kind;
  }
  cp_async_wait<0>();  // nothing may be in flight at exit (a block without live tiles loaded Q)

  // Normalise, write out (rows < t.rows) and lse (one lane per quad).
  Tensor o = make_tensor(acc_o.data(), acc_rowcol(acc_o.layout()));
  Tensor tOcO = thr_o.partition_C(make_identity_tensor(Shape<Int<BM>, Int<D>>{}));
  write_rows<T>(p, t, o, make_tensor(tOcO.data(), acc_rowcol(tOcO.layout())), m_run, l_run);
#endif
}

template <typename T, int D>
void launch(const ShadowAttentionParams& p, const int2* mm, int64_t n_ev, float scale_log2, cudaStream_t s) {
  using Tr = FwdTraits<T, D>;
  // + tile kinds, + room to align the base to 1024 bytes
  const size_t smem = Tr::kOwnBytes + 2 * Tr::kPartnerBytes + Tr::kThreads * sizeof(int) + cuda_wgmma::kSmemAlignSlack;
  auto kernel = fwd_wgmma_kernel<T, D>;
  set_smem_limit(kernel, smem);
  const int64_t blocks = p.batch * p.num_q_heads * ceil_div(p.q_len, Tr::kBlockM);
  kernel<<<grid_1d(blocks, "fwd_wgmma_kernel"), Tr::kThreads, smem, s>>>(p, mm, n_ev, scale_log2);
  check_launch("fwd_wgmma_kernel");
}

}  // namespace

namespace {

// Asks the binary the driver loaded for the current device whether it has the sm_90a body (a
// plain 9.0 build of this file would carry the trap). Any failure means no. The probe runs on
// a stream of its own in relaxed capture mode, so a capture elsewhere in the process is not
// disturbed (callers do not probe while their own stream is capturing).
bool probe_wgmma_body() {
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  if (cudaThreadExchangeStreamCaptureMode(&mode) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  cudaStream_t stream = nullptr;
  int* flag = nullptr;
  int host = 0;
  bool ok = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess &&
            cudaMalloc(&flag, sizeof(int)) == cudaSuccess;
  if (ok) {
    wgmma_probe_kernel<<<1, 1, 0, stream>>>(flag);
    ok = cudaGetLastError() == cudaSuccess &&
         cudaMemcpyAsync(&host, flag, sizeof(int), cudaMemcpyDeviceToHost, stream) == cudaSuccess &&
         cudaStreamSynchronize(stream) == cudaSuccess;
  }
  if (flag != nullptr) cudaFree(flag);
  if (stream != nullptr) cudaStreamDestroy(stream);
  (void)cudaGetLastError();
  cudaThreadExchangeStreamCaptureMode(&mode);  // back to the caller's mode
  return ok && host == 1;
}

}  // namespace

bool wgmma_available(cudaStream_t caller) {
#ifndef SHADOWKV_HAS_SM90A
  (void)caller;
  return false;  // no 9.0a in SHADOWKV_CUDA_ARCHS: the kernel body was never compiled
#else
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    (void)cudaGetLastError();  // no usable device: nothing runs here
    return false;
  }
  if (major != 9 || minor != 0) return false;
  static std::mutex lock;
  static std::vector<int> known;  // per device: -1 not asked yet, 0 no, 1 yes
  std::lock_guard<std::mutex> guard(lock);
  if (static_cast<int>(known.size()) <= dev) known.resize(dev + 1, -1);
  if (known[dev] < 0) {
    // Not while the caller's stream is being captured: answer no this once (the cute kernel
    // runs) and ask at the next eager call.
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    if (caller != nullptr && (cudaStreamIsCapturing(caller, &status) != cudaSuccess ||
                              status != cudaStreamCaptureStatusNone)) {
      (void)cudaGetLastError();
      return false;
    }
    known[dev] = probe_wgmma_body() ? 1 : 0;
  }
  return known[dev] == 1;
#endif
}

void launch_fwd_wgmma(const ShadowAttentionParams& p, const int2* ev_mm, int64_t n_ev, float scale_log2,
                      cudaStream_t s) {
  if (!wgmma_available(s)) throw std::logic_error("launch_fwd_wgmma: the sm_90a body does not run here");
  dispatch_16bit_d64_d128(p.dtype, p.head_dim, "launch_fwd_wgmma", [&](auto tag, auto d) {
    launch<typename decltype(tag)::type, decltype(d)::value>(p, ev_mm, n_ev, scale_log2, s);
  });
}

}  // namespace cuda_attn
}  // namespace shadowkv
