// The "wgmma_fused" backward family (sm_90a): the wgmma family's dK/dV kernel also computes dQ,
// so the backward is one pass over the (key tile, query tile) pairs instead of two.
//
// Why: the two-kernel backward (a dQ kernel and a dK/dV kernel, every gradient written once)
// computes S and dP, the mask and the exponentials of every visible pair twice, seven products
// per pair; in the H200 profile both were issue-bound, 2.56 ms (dQ) and 3.55 ms (dK/dV)
// against the forward's 2.55 (bench/RESULTS.md). Here each dK/dV step also issues
// dQ_tile = dS K (64 query rows x D) and adds it to an fp32 dQ workspace with vector atomics
// (red.global.add.v2.f32); a last kernel scales it and rounds it to the input type. Five
// products per pair, one mask step. The price: dQ's fp32 sums arrive in a run-dependent order
// (bitwise non-deterministic, as FlashAttention-3's default backward), a [B, Hq, Lq, D] fp32
// workspace (twice a 16-bit dQ's bytes), and a wider reach for non-finite K values
// (shadow_attention_common.cuh, before kv_row_needed).
//
// Per step, after the mask (P^T and dS^T in registers, 64 keys x 64 query rows):
//   dV += P^T dO      as the wgmma family (register A), issued, not waited for;
//   dS^T -> shared memory (16-bit, [keys][query rows], 128-byte swizzle);
//   dK += dS^T Q      A = that tile, K-major (no register copy of dS^T);
//   dQ  = dS K        A = the same tile read MN-major (its transpose), B = the block's own K;
// both in one batch, then the dQ accumulator (64 x D fp32) goes out as 2-float atomics.
#pragma once

#include "shadow_attention_wgmma.cuh"

namespace shadowkv {
namespace cuda_wgmma {

#if defined(__CUDACC__) || defined(SHADOWKV_CUDA_EMULATION)
// If `pred`: dst[0] += a and dst[1] += b for an 8-byte aligned dst in global memory, each
// element atomically (one vector reduction on sm_90). A predicated PTX instruction: with C++'s
// `if` around atomicAdd, nvcc wrapped each in a branch and reconvergence (BSSY/BSYNC) and
// rematerialised its 64-bit address (SASS).
__device__ __forceinline__ void atomic_add2_if(bool pred, float* dst, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %3, 0;\n\t@p red.global.add.v2.f32 [%0], {%1, %2};\n\t}\n" ::"l"(dst),
      "f"(a), "f"(b), "r"(static_cast<int>(pred))
      : "memory");
#elif defined(SHADOWKV_CUDA_EMULATION) && !defined(__CUDA_ARCH__)
  if (pred) atomicAdd(reinterpret_cast<float2*>(dst), make_float2(a, b));
#else
  if (pred) {
    atomicAdd(dst, a);
    atomicAdd(dst + 1, b);
  }
#endif
}

// update_fused's barrier in dkdv_kernel: every thread of the block.
struct BlockSync {
  __device__ void operator()() const { __syncthreads(); }
};

// Tr: BwdTraits ("wgmma_fused": one warpgroup, 64 keys per block) or Bwd2Traits at head_dim 128
// ("wgmma_wsf": two consumer warpgroups, 128 keys, in the warp-specialised dK/dV kernel of
// shadow_attention_bwd_ws.cuh; the retired "wgmma2_fused" ran it in dkdv_kernel). With two, each
// warpgroup's dK/dV products cover its own 64 keys, and dQ = dS K (64 query rows x D, summed
// over the block's 128 keys) is split by columns: warpgroup w computes columns
// [w D / 2, (w + 1) D / 2). So every dQ element gets one reduction per 128 keys instead of per
// 64: half the atomic traffic per product.
template <class Tr>
struct FusedFamily : Family<Tr> {
  static constexpr int W = Tr::kWarpgroups;
  using E = typename Tr::Element;
  static constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN, D = Tr::kHeadDim;
  static_assert(BN == 64, "64 query rows per step: rows of the dS tile are one 128-byte swizzle row");
  // A warpgroup's dQ columns start on a 128-byte swizzle atom of the K tile read MN-major.
  static_assert((D / W) % 64 == 0, "two warpgroups need head_dim 128");
  static constexpr const char* kName = W == 1 ? "wgmma_fused" : "wgmma_wsf";
  static constexpr bool kAtomicDq = true;

  // dS^T as the dK/dV kernel's score accumulators hold it: [keys][query rows], query rows
  // contiguous: the A operand of dK += dS^T Q read K-major, and seen as [query rows][keys]
  // (only the view changes) the A operand of dQ = dS K read MN-major.
  using SmemLayoutDs = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<E>{}, Shape<Int<BM>, Int<BN>>{}));
  using SmemLayoutDsT = decltype(composition(SmemLayoutDs{}, make_layout(Shape<Int<BN>, Int<BM>>{}, GenRowMajor{})));
  // The own K tile [keys][D] as the B operand of dQ = dS K, indexed (n = d, k = key).
  using SmemLayoutOwnT =
      decltype(composition(typename Tr::SmemLayoutOwn{}, make_layout(Shape<Int<D>, Int<BM>>{}, GenRowMajor{})));
  static constexpr size_t kDsBytes = BM * BN * sizeof(E);
  static_assert(kDsBytes % 1024 == 0, "the dS tile keeps the 1024-byte alignment of what follows it");
  static constexpr size_t kExtraSmem = kDsBytes;  // after the own and partner tiles

  using OpDk = SHADOWKV_EMULATED(decltype(GMMA::ss_op_selector<E, E, float, Shape<_64, Int<D>, Int<BN>>,
                                                               GMMA::Major::K, GMMA::Major::MN>()));
  using OpDq = SHADOWKV_EMULATED(decltype(GMMA::ss_op_selector<E, E, float, Shape<_64, Int<D / W>, Int<BM>>,
                                                               GMMA::Major::MN, GMMA::Major::MN>()));
  // dK: warpgroups along the key rows (M), as the other products; dQ: along its columns (N).
  using TiledMmaDk = decltype(make_tiled_mma(OpDk{}, Layout<Shape<Int<W>, _1, _1>>{}));
  using TiledMmaDq = decltype(make_tiled_mma(OpDq{}, Layout<Shape<_1, Int<W>, _1>>{}));
  TiledMmaDk mma_dk;
  TiledMmaDq mma_dq;
  decltype(TiledMmaDk{}.get_thread_slice(0)) thr_dk;
  decltype(TiledMmaDq{}.get_thread_slice(0)) thr_dq;
  __device__ explicit FusedFamily(int tid)
      : Family<Tr>(tid), thr_dk(mma_dk.get_thread_slice(tid)), thr_dq(mma_dq.get_thread_slice(tid)) {}

  // One step's products after the mask: dV += P^T dO (rP: P^T rounded, register A), dK += dS^T Q
  // and dQ = dS K from dS^T (`ds_t`, the fp32 score accumulator) through the shared tile at
  // `ds_smem` (kDsBytes, 1024-byte aligned); then dQ's rows below `rows` are added to dq_rows
  // (row r, column d at dq_rows[r * D + d]). Called by the family's threads with uniform
  // arguments; `all_stored()` is a barrier over them (the whole block in dkdv_kernel, the
  // consumer warpgroups in the warp-specialised one). On return this warpgroup's products have
  // completed: it may overwrite the stages it read, and the dS tile once the other warpgroup has
  // passed the next `all_stored()` (dkdv_kernel's step barrier; a second tile in dkdv_ws_kernel).
  template <class AccDv, class RP, class DO, class AccDk, class DsT, class Q, class K, class Sync = BlockSync>
  // (Inlined by nvcc as it stands, no C7514 serialisation warning; __forceinline__ on it and its
  // helpers changed the register allocation: 12 spill reloads instead of 6, ptxas sm_90a.)
  __device__ void update_fused(AccDv& acc_dv, RP& rP, DO const& s_do, AccDk& acc_dk, DsT const& ds_t, Q const& s_q,
                               unsigned char* ds_smem, K const& s_k, float* __restrict__ dq_rows, int rows,
                               Sync const& all_stored = Sync{}) {
    this->update_async(acc_dv, rP, s_do);
    store_ds(ds_t, ds_smem);
    fence_smem_for_wgmma();
    all_stored();  // every thread's part of dS^T is in the tile

    Tensor sds = make_tensor(make_smem_ptr(reinterpret_cast<E*>(ds_smem)), SmemLayoutDs{});
    Tensor a_dk = thr_dk.partition_fragment_A(sds);
    Tensor b_dk = thr_dk.partition_fragment_B(make_tensor(s_q.data(), typename Tr::SmemLayoutPartnerT{}));
    Tensor a_dq = thr_dq.partition_fragment_A(make_tensor(sds.data(), SmemLayoutDsT{}));
    Tensor b_dq = thr_dq.partition_fragment_B(make_tensor(s_k.data(), SmemLayoutOwnT{}));
    Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<BN>, Int<D>>{});
    warpgroup_fence_operand(acc_dk);
    warpgroup_fence_operand(acc_dq);
    warpgroup_arrive();
    issue</*kZero=*/false>(mma_dk, a_dk, b_dk, acc_dk);
    issue</*kZero=*/true>(mma_dq, a_dq, b_dq, acc_dq);
    warpgroup_commit_batch();
    warpgroup_wait<0>();  // this batch and dV's
    warpgroup_fence_operand(acc_dk);
    warpgroup_fence_operand(acc_dq);
    warpgroup_fence_operand(acc_dv);
    warpgroup_fence_operand(rP);
    add_dq(acc_dq, dq_rows, rows);
  }

 private:
  // dS^T rounded to 16 bits into the tile, two neighbouring query columns (one 32-bit word) at a
  // time: the accumulator's entries 2i and 2i + 1 are columns c, c + 1 of one key row r. The
  // tile is SmemLayoutDs: rows of 128 bytes (BN = 64 columns), 16-byte chunks XOR-swizzled by
  // the row's low three bits (the 128-byte swizzle), so the pair stays adjacent. In the wgmma
  // accumulator layout a thread's rows are r0 + 8h (one swizzle pattern: r0 & 7) and its
  // columns c0 + 8j with c0 < 8 (inside a chunk), so the byte offset of (r, c) is
  //   128 r + (2 c0 | (16 j ^ 16 (r0 & 7))):
  // eight distinct XORs per thread, the row at an immediate offset. Through the CuTe tensor
  // each store cost ~6 instructions of 64-bit generic addressing (SASS); the emulated test
  // checks these offsets against CuTe's descriptors.
  template <class DsT>
  __device__ void store_ds(DsT const& ds_t, unsigned char* ds_smem) const {
    Tensor coords = this->score_coords();
    const int r0 = get<0>(coords(0)), c0 = get<1>(coords(0));
#if defined(SHADOWKV_CUDA_EMULATION) && !defined(__CUDA_ARCH__)  // the layout assumptions above
    if (cast_smem_ptr_to_uint(ds_smem) % 1024 != 0 || c0 >= 8) shadowkv_emu::die("store_ds: unexpected tile or layout");
    for (int i = 0; i < size(ds_t); ++i) {
      const int dr = get<0>(coords(i)) - r0, dc = get<1>(coords(i)) - c0;
      if (dr % 8 != 0 || dc != (i % 2) + 8 * (i / 4)) shadowkv_emu::die("store_ds: unexpected accumulator layout");
    }
#endif
    const int x = (r0 & 7) << 4;
    unsigned char* row0 = ds_smem + r0 * 128 + c0 * 2;
    CUTE_UNROLL
    for (int i = 0; i < size(ds_t); i += 2) {
      const int dr = get<0>(coords(i)) - r0, dc = get<1>(coords(i)) - c0;  // multiples of 8
      const cute::array<E, 2> pair{static_cast<E>(ds_t(i)), static_cast<E>(ds_t(i + 1))};
      *reinterpret_cast<uint32_t*>(row0 + dr * 128 + ((dc * 2) ^ x)) = *reinterpret_cast<const uint32_t*>(pair.data());
    }
  }

  // dq_rows[r * D + d] += acc(r, d) for the rows r < rows, as 2-float atomics (entries 2i and
  // 2i + 1: one row, neighbouring columns, 8-byte aligned). Addresses and row tests relative to
  // the thread's first entry, at compile-time offsets.
  template <class Acc>
  __device__ void add_dq(Acc const& acc, float* __restrict__ dq_rows, int rows) const {
    Tensor coords = thr_dq.partition_C(make_identity_tensor(Shape<Int<BN>, Int<D>>{}));
    const int r0 = get<0>(coords(0)), c0 = get<1>(coords(0));
    float* base = dq_rows + r0 * D + c0;
    const int valid = rows - r0;  // row offsets below it are rows < rows
    auto add = [&](auto all_rows) {
      CUTE_UNROLL
      for (int i = 0; i < size(acc); i += 2) {
        const int dr = get<0>(coords(i)) - r0, dc = get<1>(coords(i)) - c0;
        atomic_add2_if(all_rows || dr < valid, base + dr * D + dc, acc(i), acc(i + 1));
      }
    };
    // A whole query tile (all but the last of a head) in a copy without the row tests, which
    // ptxas turns into a branch around each reduction.
    if (rows >= BN) {
      add(cute::true_type{});
    } else {
      add(cute::false_type{});
    }
  }
};
#endif

}  // namespace cuda_wgmma
}  // namespace shadowkv
