// The WMMA tensor-core shadow-attention kernels (nvcuda::wmma 16x16x16, fp32 accumulators):
// forward (fwd_tc_kernel) and backward (dq_tc_kernel, dkdv_tc_kernel), bfloat16/float16, head_dim
// 64 or 128, 16-byte aligned rows, sm_80+. The op's default in builds without the CuTe kernels
// ("wmma", shadow_attention_kernels.h). Launched by shadow_attention_fwd.cu and
// shadow_attention_bwd.cu; a header so that tests/cpp/test_attention_wmma_emulated.cpp runs the
// same source in the host emulation (tests/cpp/wmma_emulation.h provides nvcuda::wmma there).
#pragma once

#include "shadow_attention_common.cuh"

#if !defined(SHADOWKV_CUDA_EMULATION)  // else tests/cpp/wmma_emulation.h, included first
#include <mma.h>
#endif

namespace shadowkv {
namespace cuda_attn {

// Tensor-core kernels: 4 warps x 16 rows own a 64-row tile; partner tiles are streamed through
// shared memory. Row pitches are padded (+8 halves / +4 floats) so that consecutive rows start
// in different banks, which also keeps every WMMA pointer 32-byte aligned.
template <int D>
struct TcTraits {
  static_assert(D % 16 == 0 && D <= 256, "tensor-core head_dim must be a multiple of 16");
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRows = kWarps * 16;  // own rows per block (queries, or keys for dK/dV)
  static constexpr int kFwdKeys = 64;        // forward: keys per step
  static constexpr int kDqKeys = 32;         // backward dQ: keys per step
  static constexpr int kDkvQueries = 32;     // backward dK/dV: queries per step
  static constexpr int kLd16 = D + 8;        // pitch of a [rows][D] 16-bit tile
  static constexpr int kDFrags = D / 16;     // accumulator fragments across the head dim
};

// ------------------------------------------------------------------------------------------
// Tensor-core building blocks (sm_80+).

namespace wmma = nvcuda::wmma;
using AccFrag = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
template <typename T>
using AFrag = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
template <typename T>
using BFragRow = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
template <typename T>
using BFragCol = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;

// Copies rows [0, n_rows) of a [*, D] 16-bit matrix into a [n_rows][LD] shared tile with 16-byte
// loads; rows r with !keep(r) become zeros so that the MMAs never read garbage (NaN * 0).
template <typename T, int D, int LD, class Keep>
__device__ __forceinline__ void load_rows_16b_if(T* __restrict__ dst, const T* __restrict__ src, int64_t stride,
                                                 int n_rows, Keep const& keep) {
  constexpr int kChunks = D / 8;
  for (int idx = threadIdx.x; idx < n_rows * kChunks; idx += blockDim.x) {
    const int r = idx / kChunks, c = idx % kChunks;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (keep(r)) val = *reinterpret_cast<const uint4*>(src + r * stride + c * 8);
    *reinterpret_cast<uint4*>(dst + r * LD + c * 8) = val;
  }
}

// Rows [0, valid) of the source, as load_rows_16b_if.
template <typename T, int D, int LD>
__device__ __forceinline__ void load_rows_16b(T* __restrict__ dst, const T* __restrict__ src, int64_t stride,
                                              int n_rows, int64_t valid) {
  load_rows_16b_if<T, D, LD>(dst, src, stride, n_rows, [valid](int r) { return r < valid; });
}

// WMMA keeps the element -> (row, col) map of a fragment private, but it is the same for every
// accumulator fragment. Loading a matrix whose entries are their own row numbers reveals the row
// of each register, which lets a warp scale accumulator rows (online softmax) in registers.
__device__ __forceinline__ void load_row_index(AccFrag& rows, float* scratch, int ld) {
  const int lane = threadIdx.x % 32;
  for (int idx = lane; idx < 256; idx += 32) scratch[(idx / 16) * ld + idx % 16] = static_cast<float>(idx / 16);
  __syncwarp();
  wmma::load_matrix_sync(rows, scratch, ld, wmma::mem_row_major);
  __syncwarp();
}

// Writes a warp's 16 x (16 * DF) accumulator strip to global rows [0, valid_rows) of `dst`,
// staging kChunk fragments at a time through the warp's float scratch (16 x ld, ld >= 16 kChunk).
template <typename T, int DF, int kChunk>
__device__ __forceinline__ void store_acc_rows(const AccFrag (&acc)[DF], float* scratch, int ld, T* dst,
                                               int64_t stride, int valid_rows) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int f0 = 0; f0 < DF; f0 += kChunk) {
#pragma unroll
    for (int c = 0; c < kChunk; ++c) {
      if (f0 + c < DF) wmma::store_matrix_sync(scratch + c * 16, acc[f0 + c], ld, wmma::mem_row_major);
    }
    __syncwarp();
    const int width = (DF - f0 < kChunk ? DF - f0 : kChunk) * 16;
    for (int idx = lane; idx < 16 * width; idx += 32) {
      const int r = idx / width, c = idx % width;
      if (r < valid_rows) dst[r * stride + f0 * 16 + c] = from_f32<T>(scratch[r * ld + c]);
    }
    __syncwarp();
  }
}

// ------------------------------------------------------------------------------------------
// Tensor-core kernel (bfloat16 / float16, D in {64, 128}).

template <typename T, int D>
struct FwdTcSmem {
  using Tr = TcTraits<D>;
  static constexpr int kLdS = Tr::kFwdKeys + 4;  // float scores
  static constexpr int kLdP = Tr::kFwdKeys + 8;  // 16-bit probabilities
  size_t q, k, v, s, pr, row, ev, kinds, bytes;
  __host__ __device__ FwdTcSmem() {
    SmemCarver c;
    q = c.take<T>(Tr::kRows * Tr::kLd16);
    k = c.take<T>(Tr::kFwdKeys * Tr::kLd16);
    v = c.take<T>(Tr::kFwdKeys * Tr::kLd16);
    s = c.take<float>(Tr::kRows * kLdS);
    pr = c.take<T>(Tr::kRows * kLdP);
    row = c.take<float>(Tr::kRows);
    ev = c.take<int>(Tr::kFwdKeys);
    kinds = c.take<int>(Tr::kThreads);
    bytes = c.bytes;
  }
};

template <typename T, int D>
__global__ void __launch_bounds__(TcTraits<D>::kThreads)
    fwd_tc_kernel(const ShadowAttentionParams p, const int2* __restrict__ ev_mm, int64_t n_ev_tiles, float scale_log2) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the host only picks this kernel on sm_80+
#else
  using Tr = TcTraits<D>;
  using L = FwdTcSmem<T, D>;
  constexpr int BN = Tr::kFwdKeys, LDT = Tr::kLd16, LDS = L::kLdS, LDP = L::kLdP, DF = Tr::kDFrags;
  const L lay;
  unsigned char* smem = dynamic_smem();
  T* Qs = reinterpret_cast<T*>(smem + lay.q);
  T* Ks = reinterpret_cast<T*>(smem + lay.k);
  T* Vs = reinterpret_cast<T*>(smem + lay.v);
  int* ev_s = reinterpret_cast<int*>(smem + lay.ev);
  int* kinds_s = reinterpret_cast<int*>(smem + lay.kinds);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* Sw = reinterpret_cast<float*>(smem + lay.s) + warp * 16 * LDS;  // this warp's 16 rows
  T* Pw = reinterpret_cast<T*>(smem + lay.pr) + warp * 16 * LDP;
  float* roww = reinterpret_cast<float*>(smem + lay.row) + warp * 16;

  const QueryTile t = query_tile(p, Tr::kRows);
  const T* kg = static_cast<const T*>(p.k) + t.b * p.k_stride[0] + t.hkv * p.k_stride[1];
  const T* vg = static_cast<const T*>(p.v) + t.b * p.v_stride[0] + t.hkv * p.v_stride[1];
  const int32_t* evg = p.evicted_at + t.b * p.ev_stride[0] + t.hkv * p.ev_stride[1];
  const int2* mm = ev_mm + (t.b * p.num_kv_heads + t.hkv) * n_ev_tiles;

  load_rows_16b<T, D, LDT>(Qs, static_cast<const T*>(p.q) + t.b * p.q_stride[0] + t.hq * p.q_stride[1] +
                                   t.i0 * p.q_stride[2],
                           p.q_stride[2], Tr::kRows, t.rows);

  AccFrag rowidx;
  load_row_index(rowidx, Sw, LDS);
  AccFrag o[DF];
#pragma unroll
  for (int f = 0; f < DF; ++f) wmma::fill_fragment(o[f], 0.f);

  // Softmax bookkeeping: lanes 2r and 2r+1 share row r of the warp's strip (interleaved columns).
  const int r = lane / 2, half = lane % 2;
  const int64_t pos = t.p0 + warp * 16 + r;
  float m = -INFINITY, l = 0.f;  // running max (log2 domain) and sum of exp2

  // Keys past the last query position are in every row's future.
  const int64_t n_key_tiles = (min(p.kv_len, t.p1 + 1) + BN - 1) / BN;
  for (int64_t tile = 0; tile < n_key_tiles; ++tile) {
    const TileKind kind = key_tile_kind<BN>(kinds_s, tile, n_key_tiles, mm, n_ev_tiles, p.kv_len, t.p0, t.p1);
    const int64_t k0 = tile * BN;
    if (kind == TileKind::kSkip) continue;  // uniform over the block
    __syncthreads();  // previous K/V/ev tile fully consumed (first pass: publishes Qs)
    load_rows_16b<T, D, LDT>(Ks, kg + k0 * p.k_stride[2], p.k_stride[2], BN, p.kv_len - k0);
    // V rows of keys that no valid row of the tile sees are zeros (kv_row_needed); K needs no
    // such care here, since masking selects its scores away.
    load_rows_16b_if<T, D, LDT>(Vs, vg + k0 * p.v_stride[2], p.v_stride[2], BN,
                                [&](int row) { return kv_row_needed(row, k0, p, t, kind, evg); });
    for (int j = threadIdx.x; j < BN; j += blockDim.x) ev_s[j] = k0 + j < p.kv_len ? evg[k0 + j] : kEvOutOfRange;
    __syncthreads();

    // S = Q K^T for the warp's 16 query rows.
#pragma unroll
    for (int n = 0; n < BN / 16; ++n) {
      AccFrag s;
      wmma::fill_fragment(s, 0.f);
#pragma unroll
      for (int kk = 0; kk < DF; ++kk) {
        AFrag<T> a;
        BFragCol<T> bk;
        wmma::load_matrix_sync(a, Qs + warp * 16 * LDT + kk * 16, LDT);
        wmma::load_matrix_sync(bk, Ks + n * 16 * LDT + kk * 16, LDT);
        wmma::mma_sync(s, a, bk, s);
      }
      wmma::store_matrix_sync(Sw + n * 16, s, LDS, wmma::mem_row_major);
    }
    __syncwarp();

    float x[BN / 2];
    float mx = -INFINITY;
#pragma unroll
    for (int c = 0; c < BN / 2; ++c) {
      const int col = half + 2 * c;
      float v = Sw[r * LDS + col] * scale_log2;
      if (kind == TileKind::kPartial && !visible(k0 + col, pos, ev_s[col])) v = -INFINITY;
      x[c] = v;
      mx = fmaxf(mx, v);
    }
    mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
    const float m_new = fmaxf(m, mx);
    const bool none = m_new == -INFINITY;  // no visible key in this row so far: avoid inf - inf
    const float alpha = none ? 1.f : exp2f(m - m_new);
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < BN / 2; ++c) {
      const float pr = none ? 0.f : exp2f(x[c] - m_new);
      sum += pr;
      Pw[r * LDP + half + 2 * c] = from_f32<T>(pr);
    }
    sum += __shfl_xor_sync(kFullMask, sum, 1);
    l = l * alpha + sum;
    m = m_new;
    if (half == 0) roww[r] = alpha;
    __syncwarp();

#pragma unroll
    for (int e = 0; e < rowidx.num_elements; ++e) {
      const float a = roww[static_cast<int>(rowidx.x[e])];
#pragma unroll
      for (int f = 0; f < DF; ++f) o[f].x[e] *= a;
    }
    // O += P V
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      AFrag<T> a;
      wmma::load_matrix_sync(a, Pw + kk * 16, LDP);
#pragma unroll
      for (int f = 0; f < DF; ++f) {
        BFragRow<T> bv;
        wmma::load_matrix_sync(bv, Vs + kk * 16 * LDT + f * 16, LDT);
        wmma::mma_sync(o[f], a, bv, o[f]);
      }
    }
  }

  // Rows that saw no key keep l == 0 and o == 0: out = 0, lse = -inf.
  const int row = warp * 16 + r;
  __syncwarp();  // every lane has read the last alpha from roww
  if (half == 0) {
    roww[r] = l > 0.f ? 1.f / l : 0.f;
    if (row < t.rows) {
      float* lse = static_cast<float*>(p.lse) + t.b * p.lse_stride[0] + t.hq * p.lse_stride[1] + t.i0 + row;
      *lse = l > 0.f ? (m + log2f(l)) * kLn2 : -INFINITY;
    }
  }
  __syncwarp();
#pragma unroll
  for (int e = 0; e < rowidx.num_elements; ++e) {
    const float a = roww[static_cast<int>(rowidx.x[e])];
#pragma unroll
    for (int f = 0; f < DF; ++f) o[f].x[e] *= a;
  }
  T* og = static_cast<T*>(p.out) + t.b * p.o_stride[0] + t.hq * p.o_stride[1] + (t.i0 + warp * 16) * p.o_stride[2];
  store_acc_rows<T, DF, BN / 16>(o, Sw, LDS, og, p.o_stride[2], t.rows - warp * 16);
#endif
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

}  // namespace cuda_attn
}  // namespace shadowkv
