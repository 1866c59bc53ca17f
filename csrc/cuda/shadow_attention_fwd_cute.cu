// Shadow-attention forward, FlashAttention-2 style with CUTLASS CuTe: bfloat16/float16,
// head_dim 64 or 128, sm_80+ (mma.sync m16n8k16, ldmatrix, cp.async). Built only when the CuTe
// headers are available (CUTLASS_DIR); chosen by shadow_attention_fwd.cu (see
// shadow_attention_kernels.h for when). Same results contract as the other kernels: out and lse
// of the shadow mask, fp32 accumulation, rows without a visible key give out = 0, lse = -inf.
//
// Per block: 64 query rows of one (batch, query head), 4 warps of 16 rows. Per key tile of 64:
//   wait K -> issue V copy -> S = Q K^T (registers) -> mask + online softmax -> wait V ->
//   issue next live K copy -> O += P V with P taken straight from S's registers.
// Key tiles that the eviction log hides from all 64 rows are never loaded (ev_minmax pre-pass).
#include "shadow_attention_common.cuh"
#include "shadow_attention_cute.cuh"
#include "shadow_attention_fwd_tile.cuh"
#include "shadow_attention_kernels.h"

namespace shadowkv {
namespace cuda_attn {
namespace {

using namespace cute;
using cuda_cute::acc_rowcol;
using cuda_cute::as_a_operand;
using cuda_cute::copy_rows;
using cuda_cute::copy_rows_if;
using cuda_cute::FwdTraits;
using cuda_cute::gmem_tile;
using cuda_cute::load_column_log;
using cuda_cute::OperandCopies;
using cuda_cute::gemm_rs;
using cuda_cute::gemm_ss;

template <typename T, int D>
__global__ void __launch_bounds__(FwdTraits<T, D>::kThreads)
    fwd_cute_kernel(const ShadowAttentionParams p, const int2* __restrict__ ev_mm, int64_t n_ev_tiles,
                    float scale_log2) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the host only picks this kernel on sm_80+
#else
  using Tr = FwdTraits<T, D>;
  using E = typename Tr::Element;
  constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN;
  const int tid = threadIdx.x;

  unsigned char* smem = dynamic_smem();
  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<E*>(smem)), typename Tr::SmemLayoutOwn{});
  Tensor sK = make_tensor(sQ.data() + size(sQ), typename Tr::SmemLayoutPartner{});
  Tensor sV = make_tensor(sK.data() + size(sK), typename Tr::SmemLayoutPartner{});
  Tensor sVt = make_tensor(sV.data(), typename Tr::SmemLayoutPartnerT{});
  Tensor sVtNoSwizzle = make_tensor(sV.data().get(), typename Tr::SmemLayoutPartnerTNoSwizzle{});
  int* kinds_s = reinterpret_cast<int*>(smem + Tr::kOwnBytes + 2 * Tr::kPartnerBytes);

  const QueryTile t = query_tile(p, BM);
  const E* qg = static_cast<const E*>(p.q) + t.b * p.q_stride[0] + t.hq * p.q_stride[1] + t.i0 * p.q_stride[2];
  const E* kg = static_cast<const E*>(p.k) + t.b * p.k_stride[0] + t.hkv * p.k_stride[1];
  const E* vg = static_cast<const E*>(p.v) + t.b * p.v_stride[0] + t.hkv * p.v_stride[1];
  const int32_t* evg = p.evicted_at + t.b * p.ev_stride[0] + t.hkv * p.ev_stride[1];
  const int2* mm = ev_mm + (t.b * p.num_kv_heads + t.hkv) * n_ev_tiles;

  Tensor gQ = gmem_tile<BM, D>(qg, p.q_stride[2], 0);

  typename Tr::GmemTiledCopy gmem_copy;
  auto gmem_thr = gmem_copy.get_thread_slice(tid);
  Tensor tQsQ = gmem_thr.partition_D(sQ);
  Tensor tKsK = gmem_thr.partition_D(sK);
  Tensor tVsV = gmem_thr.partition_D(sV);
  Tensor tQcQ = gmem_thr.partition_S(make_identity_tensor(Shape<Int<BM>, Int<D>>{}));
  Tensor tKVcKV = gmem_thr.partition_S(make_identity_tensor(Shape<Int<BN>, Int<D>>{}));

  typename Tr::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);
  Tensor tSrK = thr_mma.partition_fragment_B(sK);
  Tensor tOrVt = thr_mma.partition_fragment_B(sVtNoSwizzle);
  Tensor acc_o = partition_fragment_C(mma, Shape<Int<BM>, Int<D>>{});
  clear(acc_o);

  const OperandCopies<Tr> s2r(tid);
  Tensor tSsQ = s2r.a.partition_S(sQ);
  Tensor tSsK = s2r.b.partition_S(sK);
  Tensor tOsVt = s2r.bt.partition_S(sVt);

  // (row, key) of each score register, and the same registers as (rows, cols) for the softmax.
  Tensor tScS = thr_mma.partition_C(make_identity_tensor(Shape<Int<BM>, Int<BN>>{}));
  Tensor tScS_rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
  constexpr int kRows = decltype(size<0>(tScS_rc))::value;  // 2: rows lane/4 and lane/4 + 8
  constexpr int kCols = decltype(size<1>(tScS_rc))::value;
  float m_run[kRows], l_run[kRows];  // running max (log2 domain) and this thread's partial sum
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    m_run[r] = -INFINITY;
    l_run[r] = 0.f;
  }

  copy_rows(gmem_copy, gmem_thr.partition_S(gQ), tQsQ, tQcQ, t.rows);

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
    __syncthreads();  // K (and Q) landed for every thread; every warp is done with the last V
    // V rows that no valid row of the block can see are staged as zeros (v_row_needed).
    const TileKind kind_now = kind;
    copy_rows_if(gmem_copy, gmem_thr.partition_S(gmem_tile<BN, D>(vg, p.v_stride[2], k0)), tVsV, tKVcKV,
                 [&](int row) { return v_row_needed(row, k0, p, t, kind_now, evg); });
    cp_async_fence();

    Tensor acc_s = partition_fragment_C(mma, Shape<Int<BM>, Int<BN>>{});
    clear(acc_s);
    gemm_ss(acc_s, tSrQ, tSrK, tSsQ, tSsK, mma, s2r);

    // Mask, scale into the log2 domain, online softmax. P overwrites S in place.
    Tensor s = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));
    Tensor o_rc = make_tensor(acc_o.data(), acc_rowcol(acc_o.layout()));
    int ev_col[kCols];
    load_column_log(ev_col, evg, k0, p.kv_len, tScS_rc, kind == TileKind::kPartial, kEvOutOfRange);
    softmax_tile(s, tScS_rc, o_rc, ev_col, kind == TileKind::kPartial, k0, t.p0, scale_log2, m_run, l_run);

    cp_async_wait<0>();
    __syncthreads();  // V landed for every thread; every warp is done with this K
    if (next < n_key_tiles) {
      copy_rows(gmem_copy, gmem_thr.partition_S(gmem_tile<BN, D>(kg, p.k_stride[2], next * BN)), tKsK, tKVcKV,
                p.kv_len - next * BN);
    }
    cp_async_fence();

    // O += P V, with P rounded to the input type (as FlashAttention-2 does).
    gemm_rs(acc_o, as_a_operand<E>(acc_s), tOrVt, tOsVt, mma, s2r);

    tile = next;
    kind = next_kind;
  }
  cp_async_wait<0>();  // nothing may be in flight at exit (a block without live tiles loaded Q)

  // Normalise, write out (rows < t.rows) and lse (one lane per quad).
  Tensor o = make_tensor(acc_o.data(), acc_rowcol(acc_o.layout()));
  Tensor tOcO = thr_mma.partition_C(make_identity_tensor(Shape<Int<BM>, Int<D>>{}));
  write_rows<T>(p, t, o, make_tensor(tOcO.data(), acc_rowcol(tOcO.layout())), m_run, l_run);
#endif
}

template <typename T, int D>
void launch(const ShadowAttentionParams& p, const int2* mm, int64_t n_ev, float scale_log2, cudaStream_t s) {
  using Tr = FwdTraits<T, D>;
  const size_t smem = Tr::kOwnBytes + 2 * Tr::kPartnerBytes + Tr::kThreads * sizeof(int);  // + tile kinds
  auto kernel = fwd_cute_kernel<T, D>;
  set_smem_limit(kernel, smem);
  const int64_t blocks = p.batch * p.num_q_heads * ceil_div(p.q_len, Tr::kBlockM);
  kernel<<<grid_1d(blocks, "fwd_cute_kernel"), Tr::kThreads, smem, s>>>(p, mm, n_ev, scale_log2);
  check_launch("fwd_cute_kernel");
}

}  // namespace

void launch_fwd_cute(const ShadowAttentionParams& p, const int2* ev_mm, int64_t n_ev, float scale_log2,
                     cudaStream_t s) {
  dispatch_16bit_d64_d128(p.dtype, p.head_dim, "launch_fwd_cute", [&](auto tag, auto d) {
    launch<typename decltype(tag)::type, decltype(d)::value>(p, ev_mm, n_ev, scale_log2, s);
  });
}

}  // namespace cuda_attn
}  // namespace shadowkv
