// The SIMT shadow-attention kernels: forward (fwd_simt_kernel) and backward (dq_simt_kernel,
// dkdv_simt_kernel), for every dtype the CUDA op takes (float32, bfloat16, float16), any head_dim
// <= 256 and any row stride: the kernels the op runs where no tensor-core kernel applies (float32,
// head dims other than 64 and 128, rows not 16-byte aligned, SHADOWKV_ATTENTION_KERNEL=simt).
// Launched by shadow_attention_fwd.cu and shadow_attention_bwd.cu; a header so that
// tests/cpp/test_attention_simt_emulated.cpp runs the same source in the host emulation.
// Same results contract as the other kernels: fp32 accumulation, rows without a visible key give
// out = 0, lse = -inf and no gradient.
#pragma once

#include "shadow_attention_common.cuh"

namespace shadowkv {
namespace cuda_attn {

// SIMT kernels: 8 warps x 4 rows own a 32-row tile; a partner tile has one row per lane.
struct SimtTraits {
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;  // the most threads of any SIMT block
  static constexpr int kRowsPerWarp = 4;
  static constexpr int kRows = kWarps * kRowsPerWarp;
  static constexpr int kPartner = 32;
  static constexpr int kMaxDPerLane = 8;  // head_dim <= 256 = 32 lanes x 8
  // Partner tiles are read with lane = row, so an odd pitch spreads the lanes over all banks.
  __host__ __device__ static int partner_ld(int d) { return d | 1; }
  // Own rows per block of the backward kernels, which stage two [rows][D] and two [32][D|1]
  // float tiles: for head_dim > 192 a 32-row block needs more than the 101,376 bytes per block
  // that sm_86/sm_89 allow (they run the sm_80 build), so those blocks have 4 warps, 16 rows.
  // The forward kernel stages one own tile and fits with 32 rows for every head_dim <= 256.
  __host__ __device__ static int bwd_rows(int d) { return d > 192 ? kRows / 2 : kRows; }
  __host__ __device__ static int bwd_threads(int d) { return bwd_rows(d) / kRowsPerWarp * 32; }
};

// ------------------------------------------------------------------------------------------
// Forward.

struct FwdSimtSmem {
  size_t q, k, v, ev, kinds, bytes;
  __host__ __device__ explicit FwdSimtSmem(int d) {
    SmemCarver c;
    q = c.take<float>(SimtTraits::kRows * d);
    k = c.take<float>(SimtTraits::kPartner * SimtTraits::partner_ld(d));
    v = c.take<float>(SimtTraits::kPartner * SimtTraits::partner_ld(d));
    ev = c.take<int>(SimtTraits::kPartner);
    kinds = c.take<int>(SimtTraits::kThreads);
    bytes = c.bytes;
  }
};

template <typename T>
__global__ void __launch_bounds__(SimtTraits::kThreads)
    fwd_simt_kernel(const ShadowAttentionParams p, const int2* __restrict__ ev_mm, int64_t n_ev_tiles, float scale_log2) {
  constexpr int R = SimtTraits::kRowsPerWarp, NT = SimtTraits::kMaxDPerLane, BN = SimtTraits::kPartner;
  const int D = static_cast<int>(p.head_dim), LDK = SimtTraits::partner_ld(D);
  const FwdSimtSmem lay(D);
  unsigned char* smem = dynamic_smem();
  float* Qs = reinterpret_cast<float*>(smem + lay.q);
  float* Ks = reinterpret_cast<float*>(smem + lay.k);
  float* Vs = reinterpret_cast<float*>(smem + lay.v);
  int* ev_s = reinterpret_cast<int*>(smem + lay.ev);
  int* kinds_s = reinterpret_cast<int*>(smem + lay.kinds);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  const QueryTile t = query_tile(p, SimtTraits::kRows);
  const T* qg = static_cast<const T*>(p.q) + t.b * p.q_stride[0] + t.hq * p.q_stride[1] + t.i0 * p.q_stride[2];
  const T* kg = static_cast<const T*>(p.k) + t.b * p.k_stride[0] + t.hkv * p.k_stride[1];
  const T* vg = static_cast<const T*>(p.v) + t.b * p.v_stride[0] + t.hkv * p.v_stride[1];
  const int32_t* evg = p.evicted_at + t.b * p.ev_stride[0] + t.hkv * p.ev_stride[1];
  const int2* mm = ev_mm + (t.b * p.num_kv_heads + t.hkv) * n_ev_tiles;

  for (int idx = threadIdx.x; idx < SimtTraits::kRows * D; idx += blockDim.x) {
    const int rr = idx / D, d = idx % D;
    Qs[idx] = rr < t.rows ? to_f32(qg[rr * p.q_stride[2] + d]) : 0.f;
  }

  float m[R], l[R], o[R][NT];
#pragma unroll
  for (int i = 0; i < R; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
#pragma unroll
    for (int u = 0; u < NT; ++u) o[i][u] = 0.f;
  }
  const float* qw = Qs + warp * R * D;

  // Keys past the last query position are in every row's future.
  const int64_t n_key_tiles = (min(p.kv_len, t.p1 + 1) + BN - 1) / BN;
  for (int64_t tile = 0; tile < n_key_tiles; ++tile) {
    const TileKind kind = key_tile_kind<BN>(kinds_s, tile, n_key_tiles, mm, n_ev_tiles, p.kv_len, t.p0, t.p1);
    const int64_t k0 = tile * BN;
    if (kind == TileKind::kSkip) continue;
    __syncthreads();
    for (int idx = threadIdx.x; idx < BN * D; idx += blockDim.x) {
      const int j = idx / D, d = idx % D;
      const bool in = k0 + j < p.kv_len;
      Ks[j * LDK + d] = in ? to_f32(kg[(k0 + j) * p.k_stride[2] + d]) : 0.f;
      Vs[j * LDK + d] = in ? to_f32(vg[(k0 + j) * p.v_stride[2] + d]) : 0.f;
    }
    for (int j = threadIdx.x; j < BN; j += blockDim.x) ev_s[j] = k0 + j < p.kv_len ? evg[k0 + j] : kEvOutOfRange;
    __syncthreads();

    // Lane j scores key k0 + j against the warp's R rows.
    float s[R] = {};
    const float* krow = Ks + lane * LDK;
    for (int d = 0; d < D; ++d) {
      const float kd = krow[d];
#pragma unroll
      for (int i = 0; i < R; ++i) s[i] += qw[i * D + d] * kd;
    }
    float pr[R];
#pragma unroll
    for (int i = 0; i < R; ++i) {
      float x = s[i] * scale_log2;
      if (kind == TileKind::kPartial && !visible(k0 + lane, t.p0 + warp * R + i, ev_s[lane])) x = -INFINITY;
      const float m_new = fmaxf(m[i], warp_max(x));
      const bool none = m_new == -INFINITY;
      const float alpha = none ? 1.f : exp2f(m[i] - m_new);
      pr[i] = none ? 0.f : exp2f(x - m_new);
      l[i] = l[i] * alpha + warp_sum(pr[i]);
      m[i] = m_new;
#pragma unroll
      for (int u = 0; u < NT; ++u) o[i][u] *= alpha;
    }
    // Lane owns head-dim slice d = lane + 32 u of each row's output. Keys with P == 0 (masked,
    // or past kv_len) are skipped, so that a non-finite V there cannot reach o (0 * NaN = NaN).
    for (int j = 0; j < BN; ++j) {
      float pj[R];
#pragma unroll
      for (int i = 0; i < R; ++i) pj[i] = __shfl_sync(kFullMask, pr[i], j);
      const float* vrow = Vs + j * LDK;
#pragma unroll
      for (int u = 0; u < NT; ++u) {
        const int d = lane + 32 * u;
        if (d < D) {
          const float vd = vrow[d];
#pragma unroll
          for (int i = 0; i < R; ++i) {
            if (pj[i] != 0.f) o[i][u] += pj[i] * vd;
          }
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int row = warp * R + i;
    if (row >= t.rows) continue;
    const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
    T* orow = static_cast<T*>(p.out) + t.b * p.o_stride[0] + t.hq * p.o_stride[1] + (t.i0 + row) * p.o_stride[2];
#pragma unroll
    for (int u = 0; u < NT; ++u) {
      const int d = lane + 32 * u;
      if (d < D) orow[d] = from_f32<T>(o[i][u] * inv);
    }
    if (lane == 0) {
      float* lse = static_cast<float*>(p.lse) + t.b * p.lse_stride[0] + t.hq * p.lse_stride[1] + t.i0 + row;
      *lse = l[i] > 0.f ? (m[i] + log2f(l[i])) * kLn2 : -INFINITY;
    }
  }
}

// ------------------------------------------------------------------------------------------
// Backward (dQ, dK/dV). Own rows are read as broadcasts from a [RB][D] float tile,
// RB = SimtTraits::bwd_rows(D) (32, or 16 above head_dim 192, with RB / 4 warps per block);
// partner rows (one per lane) from a [32][D|1] tile.

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

}  // namespace cuda_attn
}  // namespace shadowkv
