// Host emulation of the nvcuda::wmma subset that the WMMA shadow-attention kernels use
// (csrc/cuda/shadow_attention_wmma.cuh), on top of cuda_emulation.h: m16n16k16 fragments
// (matrix_a / matrix_b of bfloat16 or float16, row_major or col_major; float accumulators),
// fill_fragment, load_matrix_sync, store_matrix_sync (mem_row_major / mem_col_major) and mma_sync.
//   * Element map: CUDA leaves a fragment's element -> (row, col) map unspecified (and it differs
//     between architectures). Here element e of lane l of every fragment is entry
//     (8 l + e) * 77 mod 256 of the 16 x 16 matrix (row-major index): scattered on purpose, not
//     the sm_80 layout, so kernel code that indexes frag.x assuming a layout fails. What the
//     kernels do assume (load_row_index), that all accumulator fragments share one map and that
//     load_matrix_sync, mma_sync and store_matrix_sync agree on it, holds.
//   * Every fragment holds 8 elements per lane, each matrix entry once (the hardware's 16-bit
//     operand fragments hold 16, with duplicates): num_elements is the hardware's for float
//     accumulators, the only fragments whose elements the kernels touch.
//   * load_matrix_sync, store_matrix_sync and mma_sync are collectives of all 32 lanes (a lane
//     missing aborts as a deadlock; a lane in another wmma operation, or passing another
//     pointer, ldm or layout, aborts: CUDA requires them equal across the warp). The pointer must
//     be 32-byte (256-bit) aligned, ldm a multiple of 16 bytes and at least 16 elements, and a
//     matrix in shared memory must lie inside the block's dynamic shared memory, else abort.
//   * After the lanes agree, each lane reads or writes its own elements: the barrier orders no
//     memory (as the other collectives), so a store another lane reads back (through
//     load_matrix_sync or plainly) needs a __syncwarp, or ThreadSanitizer reports the pair.
//   * mma_sync: D = C + A B with each entry's 16 products summed in fp32 in k order after C
//     (mma_16816's rounding: more exact than tensor cores, whose order and rounding differ).
// Include this first in a test translation unit (it includes cuda_emulation.h); the kernels'
// header then takes nvcuda::wmma from here instead of <mma.h>.
#pragma once

#include "cuda_emulation.h"

#include <cstdint>
#include <type_traits>

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, typename T, typename Layout = void>
class fragment {
  static_assert(M == 16 && N == 16 && K == 16, "wmma emulation: m16n16k16 only");
  static_assert(std::is_same<Use, accumulator>::value
                    ? std::is_same<T, float>::value && std::is_void<Layout>::value
                    : (std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value) &&
                          (std::is_same<Layout, row_major>::value || std::is_same<Layout, col_major>::value),
                "wmma emulation: 16-bit operands with a layout, float accumulators without one");

 public:
  using element_type = T;
  static constexpr int num_elements = 8;
  T x[num_elements];
};

}  // namespace wmma
}  // namespace nvcuda

namespace shadowkv_emu {

// Row-major index in the 16 x 16 matrix of element e of lane `lane` (every fragment kind).
inline int wmma_entry(int lane, int e) { return (8 * lane + e) * 77 % 256; }

enum class WmmaOp { kLoad, kStore, kMma };


// What each lane passes to a wmma collective: the lanes compare them before any of them goes on.
struct WmmaCall {
  WmmaOp op;
  const void* ptr;
  unsigned ldm;
  bool col_major;
};

// Every lane's call equal to this one's, or abort; a barrier of the warp before any lane goes on.
inline void wmma_agree(const WmmaCall& mine) {
  Thread& t = me();
  copy_unwatched<sizeof(mine)>(t.warp->slot[t.lane], &mine);
  t.warp->barrier.wait();
  WmmaCall first;  // all equal when each equals lane 0's
  copy_unwatched<sizeof(first)>(&first, t.warp->slot[0]);
  if (first.op != mine.op) die("wmma: the lanes of a warp are in different wmma operations");
  if (first.ptr != mine.ptr || first.ldm != mine.ldm || first.col_major != mine.col_major)
    die("wmma load/store: the lanes of a warp passed different pointers, ldm or layouts");
  t.warp->barrier.wait();
}

// A load or store of a 16 x 16 matrix of E at p (row r, column c at p[r * ldm + c], or
// p[c * ldm + r] when col_major): the checks, then the lanes' agreement. Returns the element
// offsets of this lane's entries.
template <typename E>
void wmma_begin(WmmaOp op, const E* p, unsigned ldm, bool col_major, size_t (&offset)[8]) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) die("wmma load/store: pointer not 32-byte (256-bit) aligned");
  if (ldm < 16 || (ldm * sizeof(E)) % 16 != 0)
    die("wmma load/store: ldm not a multiple of 16 bytes of at least 16 elements");
  const Block& b = *me().block;
  const auto* c = reinterpret_cast<const unsigned char*>(p);
  if (c >= b.window && c < b.window + (size_t{1} << 18) && !in_shared(p, (15 * size_t{ldm} + 16) * sizeof(E)))
    die("wmma load/store: a matrix outside the block's dynamic shared memory");
  wmma_agree({op, p, ldm, col_major});
  const int lane = me().lane;
  for (int e = 0; e < 8; ++e) {
    const int idx = wmma_entry(lane, e), r = idx / 16, col = idx % 16;
    offset[e] = col_major ? size_t{ldm} * col + r : size_t{ldm} * r + col;
  }
}

// A lane's mma_sync operands in its exchange slot: WmmaOp::kMma, then its 8 elements of A and of
// B, copied there unseen by TSan (they are registers).
constexpr size_t kSlotA = 16, kSlotB = 32;
template <typename T>
SHADOWKV_EMU_UNWATCHED void wmma_post_operands(Warp& w, int lane, const T (&a)[8], const T (&b)[8]) {
  static_assert(kSlotB + sizeof(b) <= sizeof(w.slot[0]), "exchange slot");
  const WmmaOp op = WmmaOp::kMma;
  __builtin_memcpy(w.slot[lane], &op, sizeof(op));
  __builtin_memcpy(w.slot[lane] + kSlotA, a, sizeof(a));
  __builtin_memcpy(w.slot[lane] + kSlotB, b, sizeof(b));
}

// The value of a bfloat16 or float16 (bits): arithmetic on the bits, so that the decode below
// calls no instrumented conversion (nor memcpy) under TSan.
template <typename T>
SHADOWKV_EMU_UNWATCHED inline float wmma_value(uint16_t h) {
  uint32_t u;
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    u = static_cast<uint32_t>(h) << 16;
  } else {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0x1f) {
      u = sign | 0x7f800000u | (man << 13);  // inf, NaN
    } else if (exp != 0) {
      u = sign | ((exp + 112) << 23) | (man << 13);
    } else {  // zero or subnormal: man * 2^-24, exact in float
      const float f = static_cast<float>(man) * 5.9604644775390625e-8f;
      __builtin_memcpy(&u, &f, sizeof(u));
      u |= sign;
    }
  }
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
}

// mma_sync's decode, by one lane between the two barriers: the 32 lanes' operands as A and B in
// the warp's mma_operands (the emulation's state: written unseen by TSan, as the slots). The
// other lanes read them after the second barrier, and the next mma_sync's decode comes after
// its first barrier, which every lane reaches only after it read them.
template <typename T>
SHADOWKV_EMU_UNWATCHED void wmma_decode(Warp& w) {
  for (int l = 0; l < 32; ++l) {
    WmmaOp op;
    __builtin_memcpy(&op, w.slot[l], sizeof(op));
    if (op != WmmaOp::kMma) die("wmma: the lanes of a warp are in different wmma operations");
    uint16_t a[8], b[8];
    __builtin_memcpy(a, w.slot[l] + kSlotA, sizeof(a));
    __builtin_memcpy(b, w.slot[l] + kSlotB, sizeof(b));
    for (int e = 0; e < 8; ++e) {
      const int idx = wmma_entry(l, e);
      w.mma_operands[0][idx / 16][idx % 16] = wmma_value<T>(a[e]);
      w.mma_operands[1][idx / 16][idx % 16] = wmma_value<T>(b[e]);
    }
  }
}

// mma_sync's products for one lane after the decode: out[e] = c[e] + row r of A times column
// col of B, for its entries (r, col). Reads the emulation's state only (unseen by TSan: cheaper,
// and no kernel memory is touched).
SHADOWKV_EMU_UNWATCHED inline void wmma_products(const Warp& w, int lane, const float (&c)[8], float (&out)[8]) {
  const float(&A)[16][16] = w.mma_operands[0];
  const float(&B)[16][16] = w.mma_operands[1];
  for (int e = 0; e < 8; ++e) {
    const int idx = wmma_entry(lane, e), r = idx / 16, col = idx % 16;
    float acc = c[e];
    for (int k = 0; k < 16; ++k) acc += A[r][k] * B[k][col];
    out[e] = acc;
  }
}

}  // namespace shadowkv_emu

namespace nvcuda {
namespace wmma {

template <class Use, typename T, typename Layout, typename V>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, const V& v) {
  for (T& x : f.x) x = static_cast<T>(v);
}

template <class Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "an accumulator load takes a layout_t");
  size_t offset[8];
  shadowkv_emu::wmma_begin(shadowkv_emu::WmmaOp::kLoad, p, ldm, std::is_same<Layout, col_major>::value, offset);
  for (int e = 0; e < 8; ++e) f.x[e] = p[offset[e]];
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm,
                             layout_t layout) {
  size_t offset[8];
  shadowkv_emu::wmma_begin(shadowkv_emu::WmmaOp::kLoad, p, ldm, layout == mem_col_major, offset);
  for (int e = 0; e < 8; ++e) f.x[e] = p[offset[e]];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  size_t offset[8];
  shadowkv_emu::wmma_begin(shadowkv_emu::WmmaOp::kStore, static_cast<const float*>(p), ldm, layout == mem_col_major,
                           offset);
  for (int e = 0; e < 8; ++e) p[offset[e]] = f.x[e];
}

// d = c + a b (d may be c).
template <typename T, typename LayoutA, typename LayoutB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LayoutA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LayoutB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  using namespace shadowkv_emu;
  Thread& t = me();
  wmma_post_operands(*t.warp, t.lane, a.x, b.x);
  t.warp->barrier.wait();
  if (t.lane == 0) wmma_decode<T>(*t.warp);
  t.warp->barrier.wait();
  float out[8];
  wmma_products(*t.warp, t.lane, c.x, out);
  for (int e = 0; e < 8; ++e) d.x[e] = out[e];
}

}  // namespace wmma
}  // namespace nvcuda
