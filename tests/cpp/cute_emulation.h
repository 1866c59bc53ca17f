// Host emulation of the CuTe hardware operations the shadow-attention kernels use, on top of
// cuda_emulation.h, so that those kernels' own source (csrc/cuda/shadow_attention_*cute*.cuh,
// shadow_attention_wgmma.cuh, shadow_attention_fwd_overlap.cuh) runs on a CPU. The kernels name
// each operation through SHADOWKV_EMULATED(Op), which is Op in a real build and Emulated<Op>
// here; Emulated<Op> has Op's register interface and MMA/Copy traits, and an emulated body:
//   * mma.sync m16n8k16 and ldmatrix (.x4, .trans): the warp collectives of cuda_emulation.h;
//   * cp.async (16 bytes): queued per thread; cp_async_fence / cp_async_wait of the kernels
//     (namespace cuda_attn) commit and land them, as cuda_emulation.h's cp.async;
//   * wgmma m64nNk16 (SS: both operands from shared memory by descriptor; RS: A from registers):
//     queued per thread at issue, batched by warpgroup_commit_batch, executed by
//     warpgroup_wait<N> for all batches but the N newest. The hardware may read the operands at
//     any moment in between, so the operands this thread's products need are read at issue and
//     again at the wait, and any difference aborts (a wgmma issued before its tile landed, a
//     tile or register operand overwritten while in flight). Accumulators hold a NaN marker
//     while in flight: a kernel that reads one before its wait computes with NaN, one that
//     writes one aborts. Shared-memory operands are decoded from the descriptor as the PTX ISA's
//     canonical layouts (128-byte swizzle, K- or MN-major, the only ones the kernels build), so
//     CuTe's descriptor construction is checked too. Each product sums 16 terms in fp32 in k
//     order (more exact than tensor cores: tight tolerances say nothing about the hardware).
// Not modelled: fence.proxy.async, warpgroup_arrive and warpgroup_fence_operand are no-ops (a
// missing proxy fence or register fence cannot be seen), and blocks run one at a time.
// Include this first in a test translation unit (it includes cuda_emulation.h).
#pragma once

#include "cuda_emulation.h"

// CuTe's smem pointer -> 32-bit address conversion, through the emulated __cvta_generic_to_shared.
#define CUTE_CVTA_GENERIC_TO_SHARED_ACTIVATED 1

#include <cute/tensor.hpp>  // first: CuTe's headers expect its order
#include <cute/atom/copy_atom.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm80.hpp>
#include <cute/arch/mma_sm90_gmma.hpp>

#include <algorithm>
#include <deque>
#include <tuple>
#include <utility>
#include <vector>

namespace shadowkv_emu {

template <class Op>
struct Emulated;

// ---- mma.sync m16n8k16, fp32 accumulators
template <class Real, typename T>
struct EmulatedMma16816 {
  using DRegisters = float[4];
  using ARegisters = uint32_t[4];
  using BRegisters = uint32_t[2];
  using CRegisters = float[4];
  static void fma(float& d0, float& d1, float& d2, float& d3, uint32_t const& a0, uint32_t const& a1,
                  uint32_t const& a2, uint32_t const& a3, uint32_t const& b0, uint32_t const& b1, float const& c0,
                  float const& c1, float const& c2, float const& c3) {
    float c[4] = {c0, c1, c2, c3};
    const uint32_t a[4] = {a0, a1, a2, a3}, b[2] = {b0, b1};
    mma_16816<T>(c, a, b);
    d0 = c[0];
    d1 = c[1];
    d2 = c[2];
    d3 = c[3];
  }
};
template <>
struct Emulated<cute::SM80_16x8x16_F32BF16BF16F32_TN>
    : EmulatedMma16816<cute::SM80_16x8x16_F32BF16BF16F32_TN, __nv_bfloat16> {};
template <>
struct Emulated<cute::SM80_16x8x16_F32F16F16F32_TN> : EmulatedMma16816<cute::SM80_16x8x16_F32F16F16F32_TN, __half> {};

// ---- ldmatrix .x4 (the thread's source register is its row of 8 halves)
template <bool kTrans>
struct EmulatedLdsm {
  using SRegisters = cute::uint128_t[1];
  using DRegisters = uint32_t[4];
  static void copy(cute::uint128_t const& smem_src, uint32_t& d0, uint32_t& d1, uint32_t& d2, uint32_t& d3) {
    uint32_t r[4];
    ldmatrix_x4(r, &smem_src, kTrans);
    d0 = r[0];
    d1 = r[1];
    d2 = r[2];
    d3 = r[3];
  }
};
template <>
struct Emulated<cute::SM75_U32x4_LDSM_N> : EmulatedLdsm<false> {};
template <>
struct Emulated<cute::SM75_U16x8_LDSM_T> : EmulatedLdsm<true> {};

// ---- cp.async, 16 bytes, global -> shared
template <class TS, class TD>
struct Emulated<cute::SM80_CP_ASYNC_CACHEGLOBAL<TS, TD>> {
  using SRegisters = TS[1];
  using DRegisters = TD[1];
  static void copy(TS const& gmem_src, TD& smem_dst) { cp_async_16(&smem_dst, &gmem_src, true); }
};

// ---- wgmma
namespace gmma = cute::SM90::GMMA;

struct GmmaJob {
  bool ss;                   // A from shared memory (else registers)
  bool bf16;                 // else fp16
  bool a_mn_major = false;   // SS: A read MN-major (else K-major); register A is K-major
  bool b_mn_major;           // B read MN-major (else K-major)
  int n;                     // N of m64nNk16
  uint64_t desc_a = 0, desc_b = 0;
  const uint32_t* a[4] = {};  // RS: this thread's A registers
  uint32_t a_at_issue[4] = {};
  std::vector<float> operands_at_issue;  // the smem operand values this thread's outputs need
  std::vector<float*> d;                 // this thread's n / 2 accumulators
  std::vector<float> c_in;               // their values at issue (when no earlier job is pending on them)
  std::vector<char> chained;             // 1: the input is an earlier queued job's result
  bool accumulate;                       // scale-d: D = A B + D (else D = A B)
};

// The marker an accumulator holds while a wgmma writing it is in flight (a NaN).
inline constexpr uint32_t kInFlightBits = 0x7fc0dea5u;
inline float in_flight_marker() {
  float f;
  std::memcpy(&f, &kInFlightBits, sizeof(f));
  return f;
}
inline bool is_in_flight_marker(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits == kInFlightBits;
}

struct GmmaQueue : Extension {
  std::vector<GmmaJob> open;
  std::deque<std::vector<GmmaJob>> batches;
  std::vector<float*> pending;  // accumulators of queued jobs
  void at_exit(Thread&) override {
    if (!open.empty() || !batches.empty()) die("a thread exited with wgmma in flight (no warpgroup_wait)");
  }
};

inline GmmaQueue& gmma_queue() {
  Thread& t = me();
  if (!t.extension) t.extension = std::make_unique<GmmaQueue>();
  return static_cast<GmmaQueue&>(*t.extension);
}

inline float widen16(uint16_t bits, bool bf16) { return bf16 ? widen<__nv_bfloat16>(bits) : widen<__half>(bits); }

// A 128-byte-swizzled canonical operand in shared memory, decoded from its descriptor once (and
// the block's shared-memory bounds looked up once: every element read is then one load of the
// operand itself, which matters under ThreadSanitizer, where each load is a call).
struct SmemOperand {
  uint32_t start, lbo, sbo;
  bool mn_major, bf16;
  const unsigned char *window, *lo, *hi;  // the block's 256 KB window, its dynamic shared memory
  SmemOperand(uint64_t desc, bool mn_major_, bool bf16_) : mn_major(mn_major_), bf16(bf16_) {
    const Block& b = *me().block;
    window = b.window;
    lo = b.smem;
    hi = b.smem + b.smem_bytes;
    cute::GmmaDescriptor d;
    d.desc_ = desc;
    if (d.bitfield.layout_type_ != uint8_t(gmma::LayoutType::B128))
      die("wgmma operand: only 128-byte swizzles are emulated");
    if (d.bitfield.base_offset_ != 0) die("wgmma operand: a base offset is not emulated");
    start = uint32_t(d.bitfield.start_address_) << 4;  // an offset in the block's 256 KB window
    lbo = uint32_t(d.bitfield.leading_byte_offset_) << 4;
    sbo = uint32_t(d.bitfield.stride_byte_offset_) << 4;
  }
  // Element (mn, k), k < 16.
  float at(int mn, int k) const {
    uint32_t off = start;
    if (mn_major) {  // ((8 elems, 8, m), (8, k)) : ((1, 8, LBO), (128 B, SBO))
      off += 2 * (mn % 64) + 128 * (k % 8) + sbo * (k / 8) + lbo * (mn / 64);
    } else {  // ((8, m), 16 elems) : ((128 B, SBO), 1)
      off += 128 * (mn % 8) + sbo * (mn / 8) + 2 * k;
    }
    off ^= ((off >> 7) & 7u) << 4;  // Swizzle<3,4,3> on the address bits
    const unsigned char* p = window + off;
    if (p < lo || p + 2 > hi) die("wgmma operand outside the block's shared memory");
    uint16_t bits;
    std::memcpy(&bits, p, 2);
    return widen16(bits, bf16);
  }
};

// The shared-memory operand values this thread's accumulators need, in a fixed order: its two A
// rows (SS only), then its N / 4 B columns 8i + 2q + {0, 1} (the warpgroup's threads together
// read every element, so a change anywhere is seen).
inline std::vector<float> smem_operands(const GmmaJob& j) {
  const int tid = static_cast<int>(me().thread_idx.x % 128), warp = tid / 32, g = (tid % 32) / 4, q = tid % 4;
  std::vector<float> v(static_cast<size_t>((j.ss ? 32 : 0) + 4 * j.n));
  float* out = v.data();
  if (j.ss) {
    const SmemOperand a(j.desc_a, j.a_mn_major, j.bf16);
    for (int h = 0; h < 2; ++h)
      for (int k = 0; k < 16; ++k) *out++ = a.at(16 * warp + g + 8 * h, k);
  }
  const SmemOperand b(j.desc_b, j.b_mn_major, j.bf16);
  for (int i = 0; i < j.n / 8; ++i)
    for (int e = 0; e < 2; ++e)
      for (int k = 0; k < 16; ++k) *out++ = b.at(8 * i + 2 * q + e, k);
  return v;
}

inline bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Runs one job: every thread of the warpgroup runs the same job at the same time.
inline void run_gmma(const GmmaJob& j) {
  Thread& t = me();
  if (t.warpgroup == nullptr) die("wgmma in a block that is not whole warpgroups");
  Warpgroup& wg = *t.warpgroup;
  const int tid = static_cast<int>(t.thread_idx.x % 128), warp = tid / 32, g = (tid % 32) / 4, q = tid % 4;
  const std::vector<float> ops = smem_operands(j);
  if (!same_bits(ops, j.operands_at_issue))
    die("a wgmma shared-memory operand changed between issue and wait (issued before it landed, or overwritten)");
  // The two A rows this thread's accumulators need: 16 warp + g and 16 warp + g + 8.
  float A[2][16];
  size_t next = 0;
  if (j.ss) {
    for (int h = 0; h < 2; ++h)
      for (int k = 0; k < 16; ++k) A[h][k] = ops[next++];
  } else {
    for (int r = 0; r < 4; ++r) {
      if (*j.a[r] != j.a_at_issue[r]) die("a wgmma register operand was rewritten between issue and wait");
      copy_unwatched<4>(&wg.slot[tid][r], j.a[r]);
    }
    wg.barrier.wait();
    // Register A (m64k16): warp w holds rows 16w .. 16w + 15 in mma.m16n8k16's A layout.
    for (int lane = 0; lane < 32; ++lane) {
      const int src = 32 * warp + lane, lg = lane / 4, lq = lane % 4;
      for (int r = 0; r < 4; ++r) {
        const int row = lg + 8 * (r % 2), col = 2 * lq + 8 * (r / 2);
        if (row % 8 != g) continue;
        uint32_t v;
        copy_unwatched<4>(&v, &wg.slot[src][r]);
        A[row / 8][col] = widen16(static_cast<uint16_t>(v & 0xffff), j.bf16);
        A[row / 8][col + 1] = widen16(static_cast<uint16_t>(v >> 16), j.bf16);
      }
    }
    wg.barrier.wait();
  }
  // Accumulator i: row 16 warp + g + 8 ((i % 4) / 2), column 8 (i / 4) + 2q + i % 2, whose B
  // values are entry (i / 4, i % 2) of this thread's columns in `ops`.
  (void)q;
  for (size_t i = 0; i < j.d.size(); ++i) {
    const int h = static_cast<int>(i % 4) / 2;
    const size_t col = 2 * (i / 4) + i % 2;
    if (!j.chained[i] && !is_in_flight_marker(*j.d[i])) die("an accumulator was written while its wgmma was in flight");
    float acc = !j.accumulate ? 0.0f : j.chained[i] ? *j.d[i] : j.c_in[i];
    for (int k = 0; k < 16; ++k) acc += A[h][k] * ops[next + col * 16 + k];
    *j.d[i] = acc;
  }
}

inline void gmma_commit() {
  GmmaQueue& queue = gmma_queue();
  queue.batches.push_back(std::move(queue.open));
  queue.open.clear();
}
inline void gmma_wait(int n) {
  GmmaQueue& queue = gmma_queue();
  if (!queue.open.empty()) die("warpgroup_wait with wgmma issued but not committed");
  while (queue.batches.size() > static_cast<size_t>(n)) {
    for (const GmmaJob& j : queue.batches.front()) run_gmma(j);
    queue.batches.pop_front();
  }
  queue.pending.clear();
  for (const auto& batch : queue.batches)
    for (const GmmaJob& j : batch) queue.pending.insert(queue.pending.end(), j.d.begin(), j.d.end());
}

// Queues a job: records what its operands are now and marks its accumulators in flight.
inline void gmma_issue(GmmaJob j) {
  GmmaQueue& queue = gmma_queue();
  j.operands_at_issue = smem_operands(j);
  if (!j.ss)
    for (int r = 0; r < 4; ++r) j.a_at_issue[r] = *j.a[r];
  const auto pending = [&](float* p) {
    for (const GmmaJob& o : queue.open)
      for (float* x : o.d)
        if (x == p) return true;
    return std::find(queue.pending.begin(), queue.pending.end(), p) != queue.pending.end();
  };
  j.c_in.resize(j.d.size());
  j.chained.resize(j.d.size());
  for (size_t i = 0; i < j.d.size(); ++i) {
    j.chained[i] = pending(j.d[i]);
    if (!j.chained[i]) {
      j.c_in[i] = *j.d[i];
      *j.d[i] = in_flight_marker();
    }
  }
  queue.open.push_back(std::move(j));
}

template <template <gmma::Major, gmma::Major, gmma::ScaleIn, gmma::ScaleIn> class OpT, gmma::Major tA, gmma::Major tB,
          gmma::ScaleIn sA, gmma::ScaleIn sB>
struct Emulated<OpT<tA, tB, sA, sB>> {
  using Real = OpT<tA, tB, sA, sB>;
  using DRegisters = typename Real::DRegisters;
  using ARegisters = typename Real::ARegisters;
  using BRegisters = typename Real::BRegisters;
  using CRegisters = typename Real::CRegisters;
  static_assert(sA == gmma::ScaleIn::One && sB == gmma::ScaleIn::One, "negated operands are not emulated");
  static constexpr bool kSS = std::is_same<ARegisters, uint64_t[1]>::value;
  static_assert(kSS || tA == gmma::Major::K, "a register A operand is K-major");
  static constexpr int kRegsA = kSS ? 1 : 4;
  static constexpr int kAcc = std::extent<CRegisters>::value;
  static constexpr bool kBf16 = std::is_same<typename cute::MMA_Traits<Real>::ValTypeA, cute::bfloat16_t>::value;

  // A callable object, not a function template: CuTe passes MMA_Op::fma to detail::explode.
  struct Fma {
    template <class... Args>
    void operator()(Args&&... args) const {
      static_assert(sizeof...(Args) == kRegsA + 1 + kAcc + 1, "wgmma operands");
      auto regs = std::forward_as_tuple(args...);
      GmmaJob j;
      j.ss = kSS;
      j.bf16 = kBf16;
      j.a_mn_major = tA == gmma::Major::MN;
      j.b_mn_major = tB == gmma::Major::MN;
      j.n = 2 * kAcc;
      if constexpr (kSS) {
        j.desc_a = static_cast<uint64_t>(std::get<0>(regs));
      } else {
        j.a[0] = &std::get<0>(regs);
        j.a[1] = &std::get<1>(regs);
        j.a[2] = &std::get<2>(regs);
        j.a[3] = &std::get<3>(regs);
      }
      j.desc_b = static_cast<uint64_t>(std::get<kRegsA>(regs));
      collect(j.d, regs, std::make_index_sequence<kAcc>{});
      j.accumulate = std::get<kRegsA + 1 + kAcc>(regs) == gmma::ScaleOut::One;
      gmma_issue(std::move(j));
    }
  };
  static constexpr Fma fma{};

 private:
  template <class Tuple, size_t... I>
  static void collect(std::vector<float*>& d, Tuple& regs, std::index_sequence<I...>) {
    d = {&std::get<kRegsA + 1 + I>(regs)...};
  }
};

}  // namespace shadowkv_emu

namespace cute {
// The emulated operations keep their real twins' layouts and value types.
template <class Op>
struct MMA_Traits<shadowkv_emu::Emulated<Op>> : MMA_Traits<Op> {};
template <class Op>
struct Copy_Traits<shadowkv_emu::Emulated<Op>> : Copy_Traits<Op> {};
}  // namespace cute

// The kernels' cp.async groups and warpgroup MMA batches: found before CuTe's (no-op on a host)
// by their unqualified calls in these namespaces.
namespace shadowkv {
namespace cuda_attn {
inline void cp_async_fence() { shadowkv_emu::cp_async_commit(); }
template <int N>
void cp_async_wait() {
  shadowkv_emu::cp_async_wait(N);
}
}  // namespace cuda_attn
namespace cuda_wgmma {
inline void warpgroup_arrive() {}
inline void warpgroup_commit_batch() { shadowkv_emu::gmma_commit(); }
template <int N>
void warpgroup_wait() {
  shadowkv_emu::gmma_wait(N);
}
}  // namespace cuda_wgmma
}  // namespace shadowkv
