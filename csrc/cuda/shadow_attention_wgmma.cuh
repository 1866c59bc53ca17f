// CuTe building blocks of the sm_90a (Hopper) shadow-attention kernels: warpgroup MMAs
// (wgmma.mma_async) instead of the per-warp mma.sync of shadow_attention_cute.cuh. Private:
// included by shadow_attention_{fwd,bwd}_wgmma_cute.cu and by the host-side layout test
// (tests/cpp/test_cute_layouts.cu), which checks the register maps below without a GPU.
//
// A warpgroup (4 warps, 128 threads) owns 64 rows, one wgmma atom high; a block has one ("wgmma")
// or two (the warp-specialised kernels' consumers: 128 own rows, so every partner tile staged in
// shared memory feeds twice the MMAs). In the forward, per key tile:
//   S = Q K^T   wgmma 64 x BN x 16, both operands read from shared memory by descriptor;
//   O += P V    wgmma 64 x D x 16, P from registers (the S accumulator, rounded to 16 bits: the
//               accumulator and the register A operand line up, see acc_as_a_operand) and V
//               from shared memory, read "MN-major" (V is stored [keys][D], D contiguous).
// The backward's products have the same two shapes (TileTraits).
// Shared tiles use the canonical 128-byte-swizzle wgmma layouts, which CuTe's descriptor
// builder checks at compile time; they are filled with 16-byte cp.async as in the sm_80 path.
#pragma once

#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/copy_traits_sm80.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "shadow_attention_cute.cuh"  // rounded_copy

// 1 where a wgmma kernel's body is compiled (the sm_90a pass), 0 elsewhere: the kernels are
// traps there, and the host never launches them (cuda_attn::wgmma_available).
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)) || \
    (defined(SHADOWKV_CUDA_EMULATION) && !defined(__CUDA_ARCH__))
#define SHADOWKV_WGMMA_BODY 1
#else
#define SHADOWKV_WGMMA_BODY 0
#endif

namespace shadowkv {
namespace cuda_wgmma {

using namespace cute;

// Extra dynamic shared memory a launch asks for, so that smem_1024() can round the base up.
constexpr size_t kSmemAlignSlack = 1024;

// Tile shapes, layouts and MMAs of one (element type, head_dim, partner rows) instantiation.
// As in the sm_80 kernels (shadow_attention_cute.cuh), a block owns kBlockM "own" rows (query
// rows in the forward and dQ kernels, key rows in dK/dV) and streams partner tiles of kBlockN
// rows. Every product of forward and backward is one of two wgmma shapes:
//   scores  64 x BN x D: own tile x partner tile^T, both K-major in shared memory
//           (S = Q K^T, dP = dO V^T, S^T = K Q^T, dP^T = V dO^T);
//   update  64 x D x BN: a probability-sized accumulator (P, dS, P^T, dS^T) as register A
//           operand times a partner tile read MN-major (O += P V, dQ += dS K, dV += P^T dO,
//           dK += dS^T Q).
//
// Warpgroups > 1 stacks that many warpgroups along the own rows (kBlockM = 64 x Warpgroups):
// each runs the same wgmmas on its own 64 rows against the shared partner tile, and the kernel
// bodies see one tiled MMA of kThreads threads, as with one warpgroup.
template <typename T, int D, int BlockN, int Warpgroups = 1>
struct TileTraits {
  static_assert(D == 64 || D == 128, "the wgmma kernels cover head_dim 64 and 128");
  static_assert(std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value, "16-bit inputs only");
  static_assert(BlockN % 32 == 0, "partner tiles are whole kEvTile (32-key) tiles");
  using Input = T;  // the CUDA type of the tensors (outputs are written as it)
  using Element = std::conditional_t<std::is_same<T, __half>::value, cute::half_t, cute::bfloat16_t>;

  static_assert(Warpgroups == 1 || Warpgroups == 2, "one or two warpgroups per block");
  static constexpr int kWarpgroups = Warpgroups;
  static constexpr int kThreads = 128 * Warpgroups;
  static constexpr int kBlockM = 64 * Warpgroups;  // own rows per block: one wgmma atom per warpgroup
  static constexpr int kBlockN = BlockN;
  static constexpr int kHeadDim = D;

  // The warpgroups tile the own rows (M); each atom is one warpgroup's 64 x N x 16 wgmma.
  using WarpgroupLayout = Layout<Shape<Int<Warpgroups>, _1, _1>>;
  using OpS = SHADOWKV_EMULATED(
      decltype(GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kBlockN>, Int<D>>>()));
  using OpO = SHADOWKV_EMULATED(decltype(GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<D>, Int<kBlockN>>,
                                                              GMMA::Major::K, GMMA::Major::MN>()));
  using TiledMmaS = decltype(make_tiled_mma(OpS{}, WarpgroupLayout{}));
  using TiledMmaO = decltype(make_tiled_mma(OpO{}, WarpgroupLayout{}));

  using SmemLayoutAtom = GMMA::Layout_K_SW128_Atom<Element>;  // 8 rows x 64 halves, 128-byte swizzle
  using SmemLayoutOwn = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockM>, Int<D>>{}));
  using SmemLayoutPartner = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockN>, Int<D>>{}));
  // A partner tile seen as [D][kBlockN] (the B operand of an update product, indexed
  // (n = d, k = partner row)); element (d, j) is the tile's (j, d): only the view changes.
  using SmemLayoutPartnerT =
      decltype(composition(SmemLayoutPartner{}, make_layout(Shape<Int<D>, Int<kBlockN>>{}, GenRowMajor{})));

  // Global -> shared: 8 threads cover one 64-element row segment with 16-byte cp.async each.
  using GmemTiledCopy =
      decltype(make_tiled_copy(Copy_Atom<SHADOWKV_EMULATED(SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>), Element>{},
                               Layout<Shape<Int<kThreads / 8>, _8>, Stride<_8, _1>>{}, Layout<Shape<_1, _8>>{}));

  static constexpr size_t kOwnBytes = kBlockM * D * sizeof(Element);
  static constexpr size_t kPartnerBytes = kBlockN * D * sizeof(Element);
  // The 128-byte swizzle is a function of the address bits: every tile starts on 1024 bytes.
  static_assert(kOwnBytes % 1024 == 0 && kPartnerBytes % 1024 == 0, "tiles must keep 1024-byte alignment");
};

// Forward: 64 query rows against key tiles of 64.
template <typename T, int D>
using FwdTraits = TileTraits<T, D, 64>;
// Backward: partner tiles of 64 rows too; double-buffered (cuda_cute::PartnerStages), two own
// and four partner tiles take 96 KB at head_dim 128.
template <typename T, int D>
using BwdTraits = TileTraits<T, D, 64>;
// Two warpgroups, 128 own rows (the warp-specialised kernels' two consumer warpgroups; the
// retired "wgmma2" kernels ran them without a producer). The forward's key tiles are 128 wide:
// the S = Q K^T wgmma is then 64 x 128 x 16 (a third less shared-memory traffic per MMA than
// 64 x 64). The backward keeps 64-row partner tiles.
template <typename T, int D>
using Fwd2Traits = TileTraits<T, D, 128, 2>;
template <typename T, int D>
using Bwd2Traits = TileTraits<T, D, 64, 2>;

// A wgmma accumulator layout ((2 cols, 2 rows, N / 8 col groups), MMA_M, MMA_N) seen as
// (rows = (2, MMA_M), cols = (2, N / 8, MMA_N)): the online softmax reduces along the second mode.
template <class Layout>
CUTE_HOST_DEVICE constexpr auto acc_rowcol(Layout acc) {
  static_assert(decltype(rank(acc))::value == 3, "expected an (MMA, MMA_M, MMA_N) accumulator layout");
  static_assert(decltype(rank<0>(acc))::value == 3, "expected a wgmma accumulator: ((2, 2, N / 8), M, N)");
  return make_layout(make_layout(get<0, 1>(acc), get<1>(acc)),
                     make_layout(get<0, 0>(acc), get<0, 2>(acc), get<2>(acc)));
}

// The accumulator registers of S (64 x N) seen as the register A operand of the 64 x . x 16
// wgmma that multiplies P: ((2, 2, 2), MMA_M, N / 16). Two neighbouring 8-column groups of C hold
// exactly one 16-wide k-slice of A, so P never leaves the registers.
template <class Layout>
CUTE_HOST_DEVICE constexpr auto acc_as_a_operand(Layout acc) {
  static_assert(decltype(rank(acc))::value == 3, "expected an (MMA, MMA_M, MMA_N) accumulator layout");
  auto l = logical_divide(acc, Shape<Shape<Underscore, Underscore, _2>, Underscore, Underscore>{});
  // l = ((2, 2, (2, N / 16)), MMA_M, MMA_N)
  return make_layout(make_layout(get<0, 0>(l), get<0, 1>(l), get<0, 2, 0>(l)), get<1>(l),
                     make_layout(get<0, 2, 1>(l), get<2>(l)));
}

// The S accumulator rounded to E and laid out as the register A operand (acc_as_a_operand).
template <typename E, class Acc>
CUTE_HOST_DEVICE auto as_a_operand(Acc const& acc) {
  return cuda_cute::rounded_copy<E>(acc, acc_as_a_operand(acc.layout()));
}

#if defined(__CUDACC__) || defined(SHADOWKV_CUDA_EMULATION)
// Queues acc (+)= A B over every k-slice (no arrive, commit or wait: see gemm). kZero starts
// from zero (the first slice overwrites acc).
template <bool kZero, class Mma, class FragA, class FragB, class Acc>
__device__ __forceinline__ void issue(Mma& mma, FragA& a, FragB const& b, Acc& acc) {
  mma.accumulate_ = kZero ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(a); ++k) {
    cute::gemm(mma, a(_, _, k), b(_, _, k), acc);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
}

// Keeps the compiler from touching an accumulator or register A operand (kRegister) while
// the asynchronous MMAs own it.
template <bool kRegister, class Frag>
__device__ __forceinline__ void fence_operand(Frag& f) {
  if constexpr (kRegister) warpgroup_fence_operand(f);
}

// acc (+)= A B (kZero: acc starts from zero) as one wgmma batch, waited for. B is a
// shared-memory descriptor fragment, A one too or (kRegisterA) a register fragment.
template <bool kZero, bool kRegisterA, class Mma, class FragA, class FragB, class Acc>
__device__ __forceinline__ void gemm(Mma& mma, FragA& a, FragB const& b, Acc& acc) {
  fence_operand<kRegisterA>(a);
  warpgroup_fence_operand(acc);
  warpgroup_arrive();
  issue<kZero>(mma, a, b, acc);
  warpgroup_commit_batch();
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc);
  fence_operand<kRegisterA>(a);
}

// acc1 (+)= A1 B1 and acc2 (+)= A2 B2 as one batch: the second product's MMAs queue behind the
// first's instead of waiting for them (the backward's S/dP and dV/dK pairs).
template <bool kZero, bool kRegisterA, class Mma, class FragA1, class FragB1, class Acc1, class FragA2,
          class FragB2, class Acc2>
__device__ __forceinline__ void gemm_pair(Mma& mma, FragA1& a1, FragB1 const& b1, Acc1& acc1, FragA2& a2,
                                          FragB2 const& b2, Acc2& acc2) {
  fence_operand<kRegisterA>(a1);
  fence_operand<kRegisterA>(a2);
  warpgroup_fence_operand(acc1);
  warpgroup_fence_operand(acc2);
  warpgroup_arrive();
  issue<kZero>(mma, a1, b1, acc1);
  issue<kZero>(mma, a2, b2, acc2);
  warpgroup_commit_batch();
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc1);
  warpgroup_fence_operand(acc2);
  fence_operand<kRegisterA>(a1);
  fence_operand<kRegisterA>(a2);
}

// The 1024-byte-aligned start of dynamic shared memory: the 128-byte swizzle (and CuTe's
// descriptors, base offset 0) need tiles on 1024-byte boundaries, and __align__ on dynamic
// shared memory is not a guarantee, so launches ask for 1024 spare bytes (kSmemAlignSlack).
__device__ __forceinline__ unsigned char* smem_1024() {
#if defined(SHADOWKV_CUDA_EMULATION) && !defined(__CUDA_ARCH__)
  unsigned char* shadowkv_wgmma_smem = static_cast<unsigned char*>(shadowkv_emu::dynamic_shared_memory());
#else
  extern __shared__ __align__(1024) unsigned char shadowkv_wgmma_smem[];
#endif
  return shadowkv_wgmma_smem + ((1024u - (cast_smem_ptr_to_uint(shadowkv_wgmma_smem) & 1023u)) & 1023u);
}

// Makes this thread's generic-proxy writes to shared memory (cp.async, zero fills) visible to
// the async proxy that wgmma reads shared memory through; a barrier must follow.
__device__ __forceinline__ void fence_smem_for_wgmma() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// The sm_90a family of the CuTe kernels, the same interface as cuda_cute::Family: scores are
// wgmma with both operands read from shared memory by descriptor, updates wgmma with the A
// operand in registers and the partner tile read MN-major; pairs are issued as one batch.
template <class Tr>
struct Family {
  using Traits = Tr;
  static constexpr const char* kName = Tr::kWarpgroups == 1 ? "wgmma" : "wgmma_ws";
  static constexpr bool kBody = SHADOWKV_WGMMA_BODY;
  static constexpr size_t kSmemSlack = kSmemAlignSlack;
  // The dQ and dK/dV kernels' mask steps in two copies, full and partial tiles.
  static constexpr bool kTwoMaskCopies = true;
  // dQ by its own kernel (FusedFamily: by the dK/dV kernel, with atomics).
  static constexpr bool kAtomicDq = false;
  static constexpr size_t kExtraSmem = 0;

  typename Tr::TiledMmaS mma_s;
  typename Tr::TiledMmaO mma_o;
  decltype(typename Tr::TiledMmaS{}.get_thread_slice(0)) thr_s;
  decltype(typename Tr::TiledMmaO{}.get_thread_slice(0)) thr_o;
  __device__ explicit Family(int tid) : thr_s(mma_s.get_thread_slice(tid)), thr_o(mma_o.get_thread_slice(tid)) {}

  __device__ static unsigned char* smem() { return smem_1024(); }
  // cp.async and zero fills write through the generic proxy, wgmma reads through the async one.
  __device__ static void publish() { fence_smem_for_wgmma(); }

  __device__ auto score_acc() const {
    return partition_fragment_C(mma_s, Shape<Int<Tr::kBlockM>, Int<Tr::kBlockN>>{});
  }
  __device__ auto out_acc() const {
    return partition_fragment_C(mma_o, Shape<Int<Tr::kBlockM>, Int<Tr::kHeadDim>>{});
  }
  __device__ auto score_coords() const {
    return thr_s.partition_C(make_identity_tensor(Shape<Int<Tr::kBlockM>, Int<Tr::kBlockN>>{}));
  }
  __device__ auto out_coords() const {
    return thr_o.partition_C(make_identity_tensor(Shape<Int<Tr::kBlockM>, Int<Tr::kHeadDim>>{}));
  }
  template <class Acc>
  __device__ static auto rowcol(Acc&& acc) {
    return make_tensor(acc.data(), acc_rowcol(acc.layout()));
  }
  template <class Acc>
  __device__ static auto a_operand(Acc const& acc) {
    return as_a_operand<typename Tr::Element>(acc);
  }

  // An own tile as the A operand of scores: its shared-memory descriptors.
  template <class Own>
  __device__ auto own(Own const& tile) const {
    return thr_s.partition_fragment_A(tile);
  }

  template <class Acc, class A, class Partner>
  __device__ void scores(Acc& acc, A& a, Partner const& b) {
    gemm</*kZero=*/true, /*kRegisterA=*/false>(mma_s, a, thr_s.partition_fragment_B(b), acc);
  }
  template <class Acc1, class A1, class P1, class Acc2, class A2, class P2>
  __device__ void scores_pair(Acc1& acc1, A1& a1, P1 const& b1, Acc2& acc2, A2& a2, P2 const& b2) {
    gemm_pair</*kZero=*/true, /*kRegisterA=*/false>(mma_s, a1, thr_s.partition_fragment_B(b1), acc1, a2,
                                                    thr_s.partition_fragment_B(b2), acc2);
  }

  template <class Acc, class RA, class Partner>
  __device__ void update(Acc& acc, RA& ra, Partner const& b) {
    gemm</*kZero=*/false, /*kRegisterA=*/true>(mma_o, ra, thr_o.partition_fragment_B(transposed(b)), acc);
  }
  // scores and update issued asynchronously, one wgmma batch each (arrive, the MMAs, commit):
  // the warpgroup goes on at once; wait<N>() waits until at most N batches are in flight
  // (batches complete in order). The caller fences the operands after the wait (fence()), so
  // that the compiler neither reads the accumulator early nor reuses the registers of a
  // register A operand while the MMAs may still read them.
  template <class Acc, class A, class Partner>
  __device__ void scores_async(Acc& acc, A& a, Partner const& b) {
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    issue</*kZero=*/true>(mma_s, a, thr_s.partition_fragment_B(b), acc);
    warpgroup_commit_batch();
  }
  template <class Acc, class RA, class Partner>
  __device__ void update_async(Acc& acc, RA& ra, Partner const& b) {
    warpgroup_fence_operand(ra);
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    issue</*kZero=*/false>(mma_o, ra, thr_o.partition_fragment_B(transposed(b)), acc);
    warpgroup_commit_batch();
  }
  template <int N>
  __device__ static void wait() {
    warpgroup_wait<N>();
  }
  template <class Frag>
  __device__ static void fence(Frag& f) {
    warpgroup_fence_operand(f);
  }

  template <class Acc1, class RA1, class P1, class Acc2, class RA2, class P2>
  __device__ void update_pair(Acc1& acc1, RA1& a1, P1 const& b1, Acc2& acc2, RA2& a2, P2 const& b2) {
    gemm_pair</*kZero=*/false, /*kRegisterA=*/true>(mma_o, a1, thr_o.partition_fragment_B(transposed(b1)), acc1,
                                                    a2, thr_o.partition_fragment_B(transposed(b2)), acc2);
  }

 private:
  template <class Partner>
  __device__ static auto transposed(Partner const& b) {
    return make_tensor(b.data(), typename Tr::SmemLayoutPartnerT{});
  }
};
#endif

}  // namespace cuda_wgmma
}  // namespace shadowkv
