// CUDA forward of shadow attention: out = softmax(scale * q k^T, shadow mask) v, plus the
// natural-log log-sum-exp per row (DESIGN.md section 2). FlashAttention-2 style: one block owns
// a query tile, streams the key tiles that can be visible to it and keeps an online softmax.
// The kernel families and how one is chosen: shadow_attention_kernels.h.
#include "shadow_attention_common.cuh"
#include "shadow_attention_kernels.h"

#include <cstdlib>
#include <string>

namespace shadowkv {
namespace {

using namespace cuda_attn;

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
// SIMT kernel (any dtype, any head_dim <= 256).

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
// Host side.

template <typename T, int D>
void launch_fwd_tc(const ShadowAttentionParams& p, const int2* mm, int64_t n_ev, float scale_log2, cudaStream_t s) {
  const size_t smem = FwdTcSmem<T, D>().bytes;
  auto kernel = fwd_tc_kernel<T, D>;
  set_smem_limit(kernel, smem);
  const int64_t blocks = p.batch * p.num_q_heads * ceil_div(p.q_len, TcTraits<D>::kRows);
  kernel<<<grid_1d(blocks, "fwd_tc_kernel"), TcTraits<D>::kThreads, smem, s>>>(p, mm, n_ev, scale_log2);
  check_launch("fwd_tc_kernel");
}

template <typename T>
void launch_fwd_simt(const ShadowAttentionParams& p, const int2* mm, int64_t n_ev, float scale_log2, cudaStream_t s) {
  const size_t smem = FwdSimtSmem(static_cast<int>(p.head_dim)).bytes;
  auto kernel = fwd_simt_kernel<T>;
  set_smem_limit(kernel, smem);
  const int64_t blocks = p.batch * p.num_q_heads * ceil_div(p.q_len, SimtTraits::kRows);
  kernel<<<grid_1d(blocks, "fwd_simt_kernel"), SimtTraits::kThreads, smem, s>>>(p, mm, n_ev, scale_log2);
  check_launch("fwd_simt_kernel");
}

bool fwd_uses_tensor_cores(const ShadowAttentionParams& p) {
  return p.dtype != DType::kFloat32 && (p.head_dim == 64 || p.head_dim == 128) && rows_16b_aligned(p.q, p.q_stride) &&
         rows_16b_aligned(p.k, p.k_stride) && rows_16b_aligned(p.v, p.v_stride) && device_cc_major() >= 8;
}

}  // namespace

namespace cuda_attn {

namespace {
// The SHADOWKV_ATTENTION_KERNEL values besides "auto", in the order the error message lists them;
// `cute`: the family exists only in builds with the CuTe kernels.
struct NamedKernel {
  const char* name;
  AttnKernel kernel;
  bool cute;
};
constexpr NamedKernel kNamedKernels[] = {
    {"cute", AttnKernel::kCute, true},          {"wgmma", AttnKernel::kWgmma, true},
    {"wgmma_ws", AttnKernel::kWgmmaWs, true},   {"wgmma_wsb", AttnKernel::kWgmmaWsb, true},
    {"wgmma_wsf", AttnKernel::kWgmmaWsf, true}, {"wgmma_fused", AttnKernel::kWgmmaFused, true},
    {"wmma", AttnKernel::kWmma, false},         {"simt", AttnKernel::kSimt, false},
};
}  // namespace

AttnKernel requested_kernel(const char* fn) {
  const char* env = std::getenv("SHADOWKV_ATTENTION_KERNEL");
  const std::string v = env == nullptr ? "" : env;
  if (v.empty() || v == "auto") {
#ifdef SHADOWKV_HAS_CUTE
    return AttnKernel::kAuto;  // wgmma_ws's forward at D=128, else wgmma's; cute where no sm_90a code runs
#else
    return AttnKernel::kWmma;
#endif
  }
  for (const NamedKernel& k : kNamedKernels) {
    if (v != k.name) continue;
#ifndef SHADOWKV_HAS_CUTE
    if (k.cute) {
      bad_arg(fn, "SHADOWKV_ATTENTION_KERNEL=" + v + ", but this build has no CuTe kernel (it was built without the "
              "CUTLASS headers: install nvidia-cutlass or set CUTLASS_DIR, then rebuild)");
    }
#endif
    return k.kernel;
  }
  std::string names = "auto";
  for (const NamedKernel& k : kNamedKernels) names += std::string(", ") + k.name;
  bad_arg(fn, "SHADOWKV_ATTENTION_KERNEL must be one of " + names + "; got '" + v + "'");
}

}  // namespace cuda_attn

void shadow_attention_fwd_cuda(const ShadowAttentionParams& p, void* stream) {
  check_shadow_attention_params(p, "shadow_attention_fwd_cuda");
  check_cuda_support(p, "shadow_attention_fwd_cuda");
  if (p.batch == 0 || p.num_q_heads == 0 || p.q_len == 0) return;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const AttnKernel choice = requested_kernel("shadow_attention_fwd_cuda");

  DeviceWorkspace ev_mm(ev_minmax_bytes(p), s);
  launch_ev_minmax(p, ev_mm.as<int2>(), s);
  const int64_t n_ev = ev_minmax_tiles(p);
  const float scale_log2 = static_cast<float>(p.scale * 1.4426950408889634);
  const bool tc = choice != AttnKernel::kSimt && fwd_uses_tensor_cores(p);
#ifdef SHADOWKV_HAS_CUTE
#ifdef SHADOWKV_HAS_SM90A  // else the wgmma families are not built (CMakeLists.txt): cute runs
  // auto: the warp-specialised forward where it was measured faster (H200, 2026-11-27, bf16,
  // D=128, L=8k: 0.87 vs 0.94 ms at 25% kept, 1.17 vs 1.58 ms dense; bench/RESULTS.md); head
  // dim 64 keeps wgmma's until a GPU has timed both there.
  if (tc && choice == AttnKernel::kAuto && wgmma_available(s)) {
    if (p.head_dim == 128) return launch_fwd_wgmma_ws(p, ev_mm.as<int2>(), n_ev, scale_log2, s);
    return launch_fwd_wgmma(p, ev_mm.as<int2>(), n_ev, scale_log2, s);
  }
  if (tc && (choice == AttnKernel::kWgmma || choice == AttnKernel::kWgmmaFused) && wgmma_available(s))
    return launch_fwd_wgmma(p, ev_mm.as<int2>(), n_ev, scale_log2, s);
  if (tc && (choice == AttnKernel::kWgmmaWs || choice == AttnKernel::kWgmmaWsb || choice == AttnKernel::kWgmmaWsf) &&
      wgmma_available(s))
    return launch_fwd_wgmma_ws(p, ev_mm.as<int2>(), n_ev, scale_log2, s);
#endif
  if (tc && choice != AttnKernel::kWmma)  // cute, and the wgmma families where no sm_90a code runs
    return launch_fwd_cute(p, ev_mm.as<int2>(), n_ev, scale_log2, s);
#endif

  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (!std::is_same<T, float>::value) {
      if (tc && p.head_dim == 64) return launch_fwd_tc<T, 64>(p, ev_mm.as<int2>(), n_ev, scale_log2, s);
      if (tc && p.head_dim == 128) return launch_fwd_tc<T, 128>(p, ev_mm.as<int2>(), n_ev, scale_log2, s);
    }
    launch_fwd_simt<T>(p, ev_mm.as<int2>(), n_ev, scale_log2, s);
  });
}

}  // namespace shadowkv
