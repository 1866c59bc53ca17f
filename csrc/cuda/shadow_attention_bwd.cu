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
// Tensor-core dQ kernel (bfloat16 / float16, D in {64, 128}).

template <typename T, int D>
struct DqTcSmem {
  using Tr = TcTraits<D>;
  static constexpr int kLdS = Tr::kDqKeys + 4;
  static constexpr int kLdP = Tr::kDqKeys + 8;
  size_t q, go, k, v, s, dp, ds, lse2, delta, ev, kinds, bytes;
  __host__ __device__ DqTcSmem() {
    SmemCarver c;
    q = c.take<T>(Tr::kRows * Tr::kLd16);
    go = c.take<T>(Tr::kRows * Tr::kLd16);
    k = c.take<T>(Tr::kDqKeys * Tr::kLd16);
    v = c.take<T>(Tr::kDqKeys * Tr::kLd16);
    s = c.take<float>(Tr::kRows * kLdS);
    dp = c.take<float>(Tr::kRows * kLdS);
    ds = c.take<T>(Tr::kRows * kLdP);
    lse2 = c.take<float>(Tr::kRows);
    delta = c.take<float>(Tr::kRows);
    ev = c.take<int>(Tr::kDqKeys);
    kinds = c.take<int>(Tr::kThreads);
    bytes = c.bytes;
  }
};

template <typename T, int D>
__global__ void __launch_bounds__(TcTraits<D>::kThreads)
    dq_tc_kernel(const ShadowAttentionBwdParams bp, const int2* __restrict__ ev_mm, int64_t n_ev_tiles,
                 const float* __restrict__ lse2_ws, const float* __restrict__ delta_ws, float scale_log2) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the host only picks this kernel on sm_80+
#else
  using Tr = TcTraits<D>;
  using L = DqTcSmem<T, D>;
  constexpr int BN = Tr::kDqKeys, LDT = Tr::kLd16, LDS = L::kLdS, LDP = L::kLdP, DF = Tr::kDFrags;
  const ShadowAttentionParams& p = bp.fwd;
  const L lay;
  unsigned char* smem = dynamic_smem();
  T* Qs = reinterpret_cast<T*>(smem + lay.q);
  T* dOs = reinterpret_cast<T*>(smem + lay.go);
  T* Ks = reinterpret_cast<T*>(smem + lay.k);
  T* Vs = reinterpret_cast<T*>(smem + lay.v);
  float* lse2_s = reinterpret_cast<float*>(smem + lay.lse2);
  float* delta_s = reinterpret_cast<float*>(smem + lay.delta);
  int* ev_s = reinterpret_cast<int*>(smem + lay.ev);
  int* kinds_s = reinterpret_cast<int*>(smem + lay.kinds);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* Sw = reinterpret_cast<float*>(smem + lay.s) + warp * 16 * LDS;
  float* dPw = reinterpret_cast<float*>(smem + lay.dp) + warp * 16 * LDS;
  T* dSw = reinterpret_cast<T*>(smem + lay.ds) + warp * 16 * LDP;

  const QueryTile t = query_tile(p, Tr::kRows);
  const T* kg = static_cast<const T*>(p.k) + t.b * p.k_stride[0] + t.hkv * p.k_stride[1];
  const T* vg = static_cast<const T*>(p.v) + t.b * p.v_stride[0] + t.hkv * p.v_stride[1];
  const int32_t* evg = p.evicted_at + t.b * p.ev_stride[0] + t.hkv * p.ev_stride[1];
  const int2* mm = ev_mm + (t.b * p.num_kv_heads + t.hkv) * n_ev_tiles;
  const int64_t ws_row0 = (t.b * p.num_q_heads + t.hq) * p.q_len + t.i0;

  load_rows_16b<T, D, LDT>(Qs, static_cast<const T*>(p.q) + t.b * p.q_stride[0] + t.hq * p.q_stride[1] +
                                   t.i0 * p.q_stride[2],
                           p.q_stride[2], Tr::kRows, t.rows);
  load_rows_16b<T, D, LDT>(dOs, static_cast<const T*>(bp.grad_out) + t.b * bp.do_stride[0] +
                                    t.hq * bp.do_stride[1] + t.i0 * bp.do_stride[2],
                           bp.do_stride[2], Tr::kRows, t.rows);
  for (int i = threadIdx.x; i < Tr::kRows; i += blockDim.x) {
    lse2_s[i] = i < t.rows ? lse2_ws[ws_row0 + i] : INFINITY;
    delta_s[i] = i < t.rows ? delta_ws[ws_row0 + i] : 0.f;
  }

  AccFrag dq[DF];
#pragma unroll
  for (int f = 0; f < DF; ++f) wmma::fill_fragment(dq[f], 0.f);
  const int r = lane / 2, half = lane % 2;  // elementwise pass: lane pair per row
  const int64_t pos = t.p0 + warp * 16 + r;

  // Keys past the last query position are in every row's future.
  const int64_t n_key_tiles = (min(p.kv_len, t.p1 + 1) + BN - 1) / BN;
  for (int64_t tile = 0; tile < n_key_tiles; ++tile) {
    const TileKind kind = key_tile_kind<BN>(kinds_s, tile, n_key_tiles, mm, n_ev_tiles, p.kv_len, t.p0, t.p1);
    const int64_t k0 = tile * BN;
    if (kind == TileKind::kSkip) continue;  // uniform over the block
    __syncthreads();  // previous tile consumed (first pass: publishes Qs, dOs, lse2_s, delta_s)
    const auto needed = [&](int row) { return kv_row_needed(row, k0, p, t, kind, evg); };
    load_rows_16b_if<T, D, LDT>(Ks, kg + k0 * p.k_stride[2], p.k_stride[2], BN, needed);
    load_rows_16b_if<T, D, LDT>(Vs, vg + k0 * p.v_stride[2], p.v_stride[2], BN, needed);
    for (int j = threadIdx.x; j < BN; j += blockDim.x) ev_s[j] = k0 + j < p.kv_len ? evg[k0 + j] : kEvOutOfRange;
    __syncthreads();

    // S = Q K^T and dP = dO V^T for the warp's 16 query rows.
#pragma unroll
    for (int n = 0; n < BN / 16; ++n) {
      AccFrag s, dp;
      wmma::fill_fragment(s, 0.f);
      wmma::fill_fragment(dp, 0.f);
#pragma unroll
      for (int kk = 0; kk < DF; ++kk) {
        AFrag<T> a;
        BFragCol<T> b;
        wmma::load_matrix_sync(a, Qs + warp * 16 * LDT + kk * 16, LDT);
        wmma::load_matrix_sync(b, Ks + n * 16 * LDT + kk * 16, LDT);
        wmma::mma_sync(s, a, b, s);
        wmma::load_matrix_sync(a, dOs + warp * 16 * LDT + kk * 16, LDT);
        wmma::load_matrix_sync(b, Vs + n * 16 * LDT + kk * 16, LDT);
        wmma::mma_sync(dp, a, b, dp);
      }
      wmma::store_matrix_sync(Sw + n * 16, s, LDS, wmma::mem_row_major);
      wmma::store_matrix_sync(dPw + n * 16, dp, LDS, wmma::mem_row_major);
    }
    __syncwarp();

    const float lse2_r = lse2_s[warp * 16 + r], delta_r = delta_s[warp * 16 + r];
#pragma unroll
    for (int c = 0; c < BN / 2; ++c) {
      const int col = half + 2 * c;
      const bool vis = kind == TileKind::kFull || visible(k0 + col, pos, ev_s[col]);
      const float pr = vis ? exp2f(Sw[r * LDS + col] * scale_log2 - lse2_r) : 0.f;
      dSw[r * LDP + col] = from_f32<T>(pr * (dPw[r * LDS + col] - delta_r));
    }
    __syncwarp();

    // dQ += dS K (the softmax scale is applied once at the end)
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      AFrag<T> a;
      wmma::load_matrix_sync(a, dSw + kk * 16, LDP);
#pragma unroll
      for (int f = 0; f < DF; ++f) {
        BFragRow<T> b;
        wmma::load_matrix_sync(b, Ks + kk * 16 * LDT + f * 16, LDT);
        wmma::mma_sync(dq[f], a, b, dq[f]);
      }
    }
  }

  const float scale = scale_log2 / kLog2e;
#pragma unroll
  for (int f = 0; f < DF; ++f) {
#pragma unroll
    for (int e = 0; e < dq[f].num_elements; ++e) dq[f].x[e] *= scale;
  }
  T* dqg = static_cast<T*>(bp.grad_q) + t.b * bp.dq_stride[0] + t.hq * bp.dq_stride[1] +
           (t.i0 + warp * 16) * bp.dq_stride[2];
  store_acc_rows<T, DF, BN / 16>(dq, Sw, LDS, dqg, bp.dq_stride[2], t.rows - warp * 16);
#endif
}

// ------------------------------------------------------------------------------------------
// Tensor-core dK/dV kernel (bfloat16 / float16, D in {64, 128}). Each warp owns 16 keys; the
// transposed products S^T = K Q^T and dP^T = V dO^T give P^T and dS^T row-major, which are the
// A operands of dV += P^T dO and dK += dS^T Q.

template <typename T, int D>
struct DkvTcSmem {
  using Tr = TcTraits<D>;
  static constexpr int kLdS = Tr::kDkvQueries + 4;
  static constexpr int kLdP = Tr::kDkvQueries + 8;
  size_t k, v, q, go, st, dpt, pt, dst, lse2, delta, ev, bytes;
  __host__ __device__ DkvTcSmem() {
    SmemCarver c;
    k = c.take<T>(Tr::kRows * Tr::kLd16);
    v = c.take<T>(Tr::kRows * Tr::kLd16);
    q = c.take<T>(Tr::kDkvQueries * Tr::kLd16);
    go = c.take<T>(Tr::kDkvQueries * Tr::kLd16);
    st = c.take<float>(Tr::kRows * kLdS);
    dpt = c.take<float>(Tr::kRows * kLdS);
    pt = c.take<T>(Tr::kRows * kLdP);
    dst = c.take<T>(Tr::kRows * kLdP);
    lse2 = c.take<float>(Tr::kDkvQueries);
    delta = c.take<float>(Tr::kDkvQueries);
    ev = c.take<int>(Tr::kRows);
    bytes = c.bytes;
  }
};

template <typename T, int D>
__global__ void __launch_bounds__(TcTraits<D>::kThreads)
    dkdv_tc_kernel(const ShadowAttentionBwdParams bp, const int2* __restrict__ ev_mm, int64_t n_ev_tiles,
                   const float* __restrict__ lse2_ws, const float* __restrict__ delta_ws, float scale_log2) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the host only picks this kernel on sm_80+
#else
  using Tr = TcTraits<D>;
  using L = DkvTcSmem<T, D>;
  constexpr int BM = Tr::kDkvQueries, LDT = Tr::kLd16, LDS = L::kLdS, LDP = L::kLdP, DF = Tr::kDFrags;
  const ShadowAttentionParams& p = bp.fwd;
  const L lay;
  unsigned char* smem = dynamic_smem();
  T* Ks = reinterpret_cast<T*>(smem + lay.k);
  T* Vs = reinterpret_cast<T*>(smem + lay.v);
  T* Qs = reinterpret_cast<T*>(smem + lay.q);
  T* dOs = reinterpret_cast<T*>(smem + lay.go);
  float* lse2_s = reinterpret_cast<float*>(smem + lay.lse2);
  float* delta_s = reinterpret_cast<float*>(smem + lay.delta);
  int* ev_s = reinterpret_cast<int*>(smem + lay.ev);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* STw = reinterpret_cast<float*>(smem + lay.st) + warp * 16 * LDS;
  float* dPTw = reinterpret_cast<float*>(smem + lay.dpt) + warp * 16 * LDS;
  T* PTw = reinterpret_cast<T*>(smem + lay.pt) + warp * 16 * LDP;
  T* dSTw = reinterpret_cast<T*>(smem + lay.dst) + warp * 16 * LDP;

  const KeyTile kt = key_tile(p, Tr::kRows, ev_mm, n_ev_tiles);
  const int32_t* evg = p.evicted_at + kt.b * p.ev_stride[0] + kt.hkv * p.ev_stride[1];
  const auto needed = [&](int row) { return own_kv_row_needed(row, p, kt, evg); };
  load_rows_16b_if<T, D, LDT>(Ks, static_cast<const T*>(p.k) + kt.b * p.k_stride[0] + kt.hkv * p.k_stride[1] +
                                      kt.k0 * p.k_stride[2],
                              p.k_stride[2], Tr::kRows, needed);
  load_rows_16b_if<T, D, LDT>(Vs, static_cast<const T*>(p.v) + kt.b * p.v_stride[0] + kt.hkv * p.v_stride[1] +
                                      kt.k0 * p.v_stride[2],
                              p.v_stride[2], Tr::kRows, needed);
  for (int j = threadIdx.x; j < Tr::kRows; j += blockDim.x) ev_s[j] = j < kt.rows ? evg[kt.k0 + j] : kEvOutOfRange;

  AccFrag dk[DF], dv[DF];
#pragma unroll
  for (int f = 0; f < DF; ++f) {
    wmma::fill_fragment(dk[f], 0.f);
    wmma::fill_fragment(dv[f], 0.f);
  }
  const int r = lane / 2, half = lane % 2;  // elementwise pass: lane pair per key row
  const int64_t key = kt.k0 + warp * 16 + r;

  const int64_t group = p.num_q_heads / p.num_kv_heads;
  for (int64_t g = 0; g < group; ++g) {
    const int64_t hq = kt.hkv * group + g;
    const T* qg = static_cast<const T*>(p.q) + kt.b * p.q_stride[0] + hq * p.q_stride[1];
    const T* dog = static_cast<const T*>(bp.grad_out) + kt.b * bp.do_stride[0] + hq * bp.do_stride[1];
    const int64_t ws_row0 = (kt.b * p.num_q_heads + hq) * p.q_len;
    for (int64_t i0 = kt.i_begin; i0 < kt.i_end; i0 += BM) {
      const auto [rows, p0, full] = query_rows(p, kt, Tr::kRows, i0, BM);
      __syncthreads();  // previous query tile consumed (first pass: publishes Ks, Vs, ev_s)
      load_rows_16b<T, D, LDT>(Qs, qg + i0 * p.q_stride[2], p.q_stride[2], BM, rows);
      load_rows_16b<T, D, LDT>(dOs, dog + i0 * bp.do_stride[2], bp.do_stride[2], BM, rows);
      for (int i = threadIdx.x; i < BM; i += blockDim.x) {
        lse2_s[i] = i < rows ? lse2_ws[ws_row0 + i0 + i] : INFINITY;  // padding rows get P = 0
        delta_s[i] = i < rows ? delta_ws[ws_row0 + i0 + i] : 0.f;
      }
      __syncthreads();

      // S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys.
#pragma unroll
      for (int n = 0; n < BM / 16; ++n) {
        AccFrag st, dpt;
        wmma::fill_fragment(st, 0.f);
        wmma::fill_fragment(dpt, 0.f);
#pragma unroll
        for (int kk = 0; kk < DF; ++kk) {
          AFrag<T> a;
          BFragCol<T> b;
          wmma::load_matrix_sync(a, Ks + warp * 16 * LDT + kk * 16, LDT);
          wmma::load_matrix_sync(b, Qs + n * 16 * LDT + kk * 16, LDT);
          wmma::mma_sync(st, a, b, st);
          wmma::load_matrix_sync(a, Vs + warp * 16 * LDT + kk * 16, LDT);
          wmma::load_matrix_sync(b, dOs + n * 16 * LDT + kk * 16, LDT);
          wmma::mma_sync(dpt, a, b, dpt);
        }
        wmma::store_matrix_sync(STw + n * 16, st, LDS, wmma::mem_row_major);
        wmma::store_matrix_sync(dPTw + n * 16, dpt, LDS, wmma::mem_row_major);
      }
      __syncwarp();

      const int ev_key = ev_s[warp * 16 + r];
#pragma unroll
      for (int c = 0; c < BM / 2; ++c) {
        const int col = half + 2 * c;
        const bool vis = full || visible(key, p0 + col, ev_key);
        const float pr = vis ? exp2f(STw[r * LDS + col] * scale_log2 - lse2_s[col]) : 0.f;
        PTw[r * LDP + col] = from_f32<T>(pr);
        dSTw[r * LDP + col] = from_f32<T>(pr * (dPTw[r * LDS + col] - delta_s[col]));
      }
      __syncwarp();

      // dV += P^T dO, dK += dS^T Q (scale applied at the end)
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk) {
        AFrag<T> a_p, a_ds;
        wmma::load_matrix_sync(a_p, PTw + kk * 16, LDP);
        wmma::load_matrix_sync(a_ds, dSTw + kk * 16, LDP);
#pragma unroll
        for (int f = 0; f < DF; ++f) {
          BFragRow<T> b;
          wmma::load_matrix_sync(b, dOs + kk * 16 * LDT + f * 16, LDT);
          wmma::mma_sync(dv[f], a_p, b, dv[f]);
          wmma::load_matrix_sync(b, Qs + kk * 16 * LDT + f * 16, LDT);
          wmma::mma_sync(dk[f], a_ds, b, dk[f]);
        }
      }
    }
  }

  const float scale = scale_log2 / kLog2e;
#pragma unroll
  for (int f = 0; f < DF; ++f) {
#pragma unroll
    for (int e = 0; e < dk[f].num_elements; ++e) dk[f].x[e] *= scale;
  }
  const int64_t row0 = kt.k0 + warp * 16;
  T* dkg = static_cast<T*>(bp.grad_k) + kt.b * bp.dk_stride[0] + kt.hkv * bp.dk_stride[1] + row0 * bp.dk_stride[2];
  T* dvg = static_cast<T*>(bp.grad_v) + kt.b * bp.dv_stride[0] + kt.hkv * bp.dv_stride[1] + row0 * bp.dv_stride[2];
  store_acc_rows<T, DF, BM / 16>(dk, STw, LDS, dkg, bp.dk_stride[2], kt.rows - warp * 16);
  store_acc_rows<T, DF, BM / 16>(dv, STw, LDS, dvg, bp.dv_stride[2], kt.rows - warp * 16);
#endif
}

// ------------------------------------------------------------------------------------------
// SIMT kernels (any dtype, any head_dim <= 256). Own rows are read as broadcasts from a
// [RB][D] float tile, RB = SimtTraits::bwd_rows(D) (32, or 16 above head_dim 192, with
// RB / 4 warps per block); partner rows (one per lane) from a [32][D|1] tile.

struct DqSimtSmem {
  size_t q, go, k, v, ev, kinds, bytes;
  __host__ __device__ explicit DqSimtSmem(int d) {
    SmemCarver c;
    q = c.take<float>(SimtTraits::bwd_rows(d) * d);
    go = c.take<float>(SimtTraits::bwd_rows(d) * d);
    k = c.take<float>(SimtTraits::kPartner * SimtTraits::partner_ld(d));
    v = c.take<float>(SimtTraits::kPartner * SimtTraits::partner_ld(d));
    ev = c.take<int>(SimtTraits::kPartner);
    kinds = c.take<int>(SimtTraits::kThreads);
    bytes = c.bytes;
  }
};

template <typename T>
__global__ void __launch_bounds__(SimtTraits::kThreads)
    dq_simt_kernel(const ShadowAttentionBwdParams bp, const int2* __restrict__ ev_mm, int64_t n_ev_tiles,
                   const float* __restrict__ lse2_ws, const float* __restrict__ delta_ws, float scale_log2) {
  constexpr int R = SimtTraits::kRowsPerWarp, NT = SimtTraits::kMaxDPerLane, BN = SimtTraits::kPartner;
  const ShadowAttentionParams& p = bp.fwd;
  const int D = static_cast<int>(p.head_dim), LDK = SimtTraits::partner_ld(D);
  const int RB = SimtTraits::bwd_rows(D);  // own query rows; the block has RB / R warps
  const DqSimtSmem lay(D);
  unsigned char* smem = dynamic_smem();
  float* Qs = reinterpret_cast<float*>(smem + lay.q);
  float* dOs = reinterpret_cast<float*>(smem + lay.go);
  float* Ks = reinterpret_cast<float*>(smem + lay.k);
  float* Vs = reinterpret_cast<float*>(smem + lay.v);
  int* ev_s = reinterpret_cast<int*>(smem + lay.ev);
  int* kinds_s = reinterpret_cast<int*>(smem + lay.kinds);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  const QueryTile t = query_tile(p, RB);
  const T* qg = static_cast<const T*>(p.q) + t.b * p.q_stride[0] + t.hq * p.q_stride[1] + t.i0 * p.q_stride[2];
  const T* dog = static_cast<const T*>(bp.grad_out) + t.b * bp.do_stride[0] + t.hq * bp.do_stride[1] +
                 t.i0 * bp.do_stride[2];
  const T* kg = static_cast<const T*>(p.k) + t.b * p.k_stride[0] + t.hkv * p.k_stride[1];
  const T* vg = static_cast<const T*>(p.v) + t.b * p.v_stride[0] + t.hkv * p.v_stride[1];
  const int32_t* evg = p.evicted_at + t.b * p.ev_stride[0] + t.hkv * p.ev_stride[1];
  const int2* mm = ev_mm + (t.b * p.num_kv_heads + t.hkv) * n_ev_tiles;
  const int64_t ws_row0 = (t.b * p.num_q_heads + t.hq) * p.q_len + t.i0;

  for (int idx = threadIdx.x; idx < RB * D; idx += blockDim.x) {
    const int rr = idx / D, d = idx % D;
    const bool in = rr < t.rows;
    Qs[idx] = in ? to_f32(qg[rr * p.q_stride[2] + d]) : 0.f;
    dOs[idx] = in ? to_f32(dog[rr * bp.do_stride[2] + d]) : 0.f;
  }
  float lse2[R], delta[R], dq[R][NT];
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int row = warp * R + i;
    lse2[i] = row < t.rows ? lse2_ws[ws_row0 + row] : INFINITY;
    delta[i] = row < t.rows ? delta_ws[ws_row0 + row] : 0.f;
#pragma unroll
    for (int u = 0; u < NT; ++u) dq[i][u] = 0.f;
  }
  const float* qw = Qs + warp * R * D;
  const float* dow = dOs + warp * R * D;

  // Keys past the last query position are in every row's future.
  const int64_t n_key_tiles = (min(p.kv_len, t.p1 + 1) + BN - 1) / BN;
  for (int64_t tile = 0; tile < n_key_tiles; ++tile) {
    const TileKind kind = key_tile_kind<BN>(kinds_s, tile, n_key_tiles, mm, n_ev_tiles, p.kv_len, t.p0, t.p1);
    const int64_t k0 = tile * BN;
    if (kind == TileKind::kSkip) continue;
    __syncthreads();
    for (int idx = threadIdx.x; idx < BN * D; idx += blockDim.x) {
      const int j = idx / D, d = idx % D;
      const bool in = kv_row_needed(j, k0, p, t, kind, evg);
      Ks[j * LDK + d] = in ? to_f32(kg[(k0 + j) * p.k_stride[2] + d]) : 0.f;
      Vs[j * LDK + d] = in ? to_f32(vg[(k0 + j) * p.v_stride[2] + d]) : 0.f;
    }
    for (int j = threadIdx.x; j < BN; j += blockDim.x) ev_s[j] = k0 + j < p.kv_len ? evg[k0 + j] : kEvOutOfRange;
    __syncthreads();

    // Lane j: s = q_i . k_j and dp = dO_i . v_j for key k0 + j and the warp's R rows.
    float s[R] = {}, dp[R] = {};
    const float* krow = Ks + lane * LDK;
    const float* vrow = Vs + lane * LDK;
    for (int d = 0; d < D; ++d) {
      const float kd = krow[d], vd = vrow[d];
#pragma unroll
      for (int i = 0; i < R; ++i) {
        s[i] += qw[i * D + d] * kd;
        dp[i] += dow[i * D + d] * vd;
      }
    }
    float ds[R];
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const bool vis = kind == TileKind::kFull || visible(k0 + lane, t.p0 + warp * R + i, ev_s[lane]);
      const float pr = vis ? exp2f(s[i] * scale_log2 - lse2[i]) : 0.f;
      ds[i] = pr * (dp[i] - delta[i]);
    }
    for (int j = 0; j < BN; ++j) {
      float dsj[R];
#pragma unroll
      for (int i = 0; i < R; ++i) dsj[i] = __shfl_sync(kFullMask, ds[i], j);
      const float* kj = Ks + j * LDK;
#pragma unroll
      for (int u = 0; u < NT; ++u) {
        const int d = lane + 32 * u;
        if (d < D) {
          const float kd = kj[d];
#pragma unroll
          for (int i = 0; i < R; ++i) dq[i][u] += dsj[i] * kd;
        }
      }
    }
  }

  const float scale = scale_log2 / kLog2e;
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int row = warp * R + i;
    if (row >= t.rows) continue;
    T* dqrow = static_cast<T*>(bp.grad_q) + t.b * bp.dq_stride[0] + t.hq * bp.dq_stride[1] +
               (t.i0 + row) * bp.dq_stride[2];
#pragma unroll
    for (int u = 0; u < NT; ++u) {
      const int d = lane + 32 * u;
      if (d < D) dqrow[d] = from_f32<T>(dq[i][u] * scale);
    }
  }
}

struct DkvSimtSmem {
  size_t k, v, q, go, lse2, delta, bytes;
  __host__ __device__ explicit DkvSimtSmem(int d) {
    SmemCarver c;
    k = c.take<float>(SimtTraits::bwd_rows(d) * d);
    v = c.take<float>(SimtTraits::bwd_rows(d) * d);
    q = c.take<float>(SimtTraits::kPartner * SimtTraits::partner_ld(d));
    go = c.take<float>(SimtTraits::kPartner * SimtTraits::partner_ld(d));
    lse2 = c.take<float>(SimtTraits::kPartner);
    delta = c.take<float>(SimtTraits::kPartner);
    bytes = c.bytes;
  }
};

template <typename T>
__global__ void __launch_bounds__(SimtTraits::kThreads)
    dkdv_simt_kernel(const ShadowAttentionBwdParams bp, const int2* __restrict__ ev_mm, int64_t n_ev_tiles,
                     const float* __restrict__ lse2_ws, const float* __restrict__ delta_ws, float scale_log2) {
  constexpr int R = SimtTraits::kRowsPerWarp, NT = SimtTraits::kMaxDPerLane, BM = SimtTraits::kPartner;
  const ShadowAttentionParams& p = bp.fwd;
  const int D = static_cast<int>(p.head_dim), LDQ = SimtTraits::partner_ld(D);
  const int RB = SimtTraits::bwd_rows(D);  // own key rows; the block has RB / R warps
  const DkvSimtSmem lay(D);
  unsigned char* smem = dynamic_smem();
  float* Ks = reinterpret_cast<float*>(smem + lay.k);
  float* Vs = reinterpret_cast<float*>(smem + lay.v);
  float* Qs = reinterpret_cast<float*>(smem + lay.q);
  float* dOs = reinterpret_cast<float*>(smem + lay.go);
  float* lse2_s = reinterpret_cast<float*>(smem + lay.lse2);
  float* delta_s = reinterpret_cast<float*>(smem + lay.delta);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  const KeyTile kt = key_tile(p, RB, ev_mm, n_ev_tiles);
  const T* kg = static_cast<const T*>(p.k) + kt.b * p.k_stride[0] + kt.hkv * p.k_stride[1] + kt.k0 * p.k_stride[2];
  const T* vg = static_cast<const T*>(p.v) + kt.b * p.v_stride[0] + kt.hkv * p.v_stride[1] + kt.k0 * p.v_stride[2];
  const int32_t* evg = p.evicted_at + kt.b * p.ev_stride[0] + kt.hkv * p.ev_stride[1];
  for (int idx = threadIdx.x; idx < RB * D; idx += blockDim.x) {
    const int rr = idx / D, d = idx % D;
    const bool in = own_kv_row_needed(rr, p, kt, evg);
    Ks[idx] = in ? to_f32(kg[rr * p.k_stride[2] + d]) : 0.f;
    Vs[idx] = in ? to_f32(vg[rr * p.v_stride[2] + d]) : 0.f;
  }
  int ev_key[R];
  float dk[R][NT], dv[R][NT];
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int row = warp * R + i;
    ev_key[i] = row < kt.rows ? evg[kt.k0 + row] : kEvOutOfRange;
#pragma unroll
    for (int u = 0; u < NT; ++u) dk[i][u] = dv[i][u] = 0.f;
  }
  const float* kw = Ks + warp * R * D;
  const float* vw = Vs + warp * R * D;

  const int64_t group = p.num_q_heads / p.num_kv_heads;
  for (int64_t g = 0; g < group; ++g) {
    const int64_t hq = kt.hkv * group + g;
    const T* qg = static_cast<const T*>(p.q) + kt.b * p.q_stride[0] + hq * p.q_stride[1];
    const T* dog = static_cast<const T*>(bp.grad_out) + kt.b * bp.do_stride[0] + hq * bp.do_stride[1];
    const int64_t ws_row0 = (kt.b * p.num_q_heads + hq) * p.q_len;
    for (int64_t i0 = kt.i_begin; i0 < kt.i_end; i0 += BM) {
      const auto [rows, p0, full] = query_rows(p, kt, RB, i0, BM);
      __syncthreads();  // previous query tile consumed (first pass: publishes Ks, Vs)
      for (int idx = threadIdx.x; idx < BM * D; idx += blockDim.x) {
        const int i = idx / D, d = idx % D;
        const bool in = i < rows;
        Qs[i * LDQ + d] = in ? to_f32(qg[(i0 + i) * p.q_stride[2] + d]) : 0.f;
        dOs[i * LDQ + d] = in ? to_f32(dog[(i0 + i) * bp.do_stride[2] + d]) : 0.f;
      }
      for (int i = threadIdx.x; i < BM; i += blockDim.x) {
        lse2_s[i] = i < rows ? lse2_ws[ws_row0 + i0 + i] : INFINITY;  // padding rows get P = 0
        delta_s[i] = i < rows ? delta_ws[ws_row0 + i0 + i] : 0.f;
      }
      __syncthreads();

      // Lane i: s = k_j . q_i and dp = v_j . dO_i for query i0 + i and the warp's R keys.
      float s[R] = {}, dp[R] = {};
      const float* qrow = Qs + lane * LDQ;
      const float* dorow = dOs + lane * LDQ;
      for (int d = 0; d < D; ++d) {
        const float qd = qrow[d], gd = dorow[d];
#pragma unroll
        for (int i = 0; i < R; ++i) {
          s[i] += kw[i * D + d] * qd;
          dp[i] += vw[i * D + d] * gd;
        }
      }
      float pr[R], ds[R];
      const float lse2_q = lse2_s[lane], delta_q = delta_s[lane];
#pragma unroll
      for (int i = 0; i < R; ++i) {
        const bool vis = full || visible(kt.k0 + warp * R + i, p0 + lane, ev_key[i]);
        pr[i] = vis ? exp2f(s[i] * scale_log2 - lse2_q) : 0.f;
        ds[i] = pr[i] * (dp[i] - delta_q);
      }
      for (int q = 0; q < BM; ++q) {
        float pq[R], dsq[R];
#pragma unroll
        for (int i = 0; i < R; ++i) {
          pq[i] = __shfl_sync(kFullMask, pr[i], q);
          dsq[i] = __shfl_sync(kFullMask, ds[i], q);
        }
        const float* qq = Qs + q * LDQ;
        const float* gq = dOs + q * LDQ;
#pragma unroll
        for (int u = 0; u < NT; ++u) {
          const int d = lane + 32 * u;
          if (d < D) {
            const float qd = qq[d], gd = gq[d];
#pragma unroll
            for (int i = 0; i < R; ++i) {
              dv[i][u] += pq[i] * gd;
              dk[i][u] += dsq[i] * qd;
            }
          }
        }
      }
    }
  }

  const float scale = scale_log2 / kLog2e;
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int row = warp * R + i;
    if (row >= kt.rows) continue;
    const int64_t j = kt.k0 + row;
    T* dkrow = static_cast<T*>(bp.grad_k) + kt.b * bp.dk_stride[0] + kt.hkv * bp.dk_stride[1] + j * bp.dk_stride[2];
    T* dvrow = static_cast<T*>(bp.grad_v) + kt.b * bp.dv_stride[0] + kt.hkv * bp.dv_stride[1] + j * bp.dv_stride[2];
#pragma unroll
    for (int u = 0; u < NT; ++u) {
      const int d = lane + 32 * u;
      if (d < D) {
        dkrow[d] = from_f32<T>(dk[i][u] * scale);
        dvrow[d] = from_f32<T>(dv[i][u]);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// Host side.

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
