// A host-only emulation of the CUDA features the staged paged-decode kernels use, so that the C++
// tests can run those kernels' own source on a machine without a GPU (and under AddressSanitizer:
// dynamic shared memory and the test's buffers are exact-size heap blocks).
//
// Include this before any csrc/cuda header. Every CUDA thread of a block is a fiber (fibers.h):
// one OS thread runs them in turn, each until it waits.
//   * __syncthreads is a barrier of the block's threads, __syncwarp one of a warp's 32 lanes
//     (both order memory), warp collectives (shuffles, ldmatrix, mma.sync; wmma_emulation.h's
//     wmma) exchange values through a per-warp buffer between two barriers of its 32 lanes;
//     a block whose unfinished threads all wait (a barrier not reached by all its threads, a
//     phase nobody completes) aborts at once, naming what they wait for (on a GPU it would hang
//     or be undefined);
//   * cp.async copies land only when cp.async.wait_group covers their group (the latest the
//     hardware may deliver them), so a read that misses a wait sees stale bytes; copies handed
//     to an mbarrier (cp.async.mbarrier.arrive) land when its phase completes;
//   * mbarriers (init, arrive, parity wait) and named barriers (bar.sync / bar.arrive by id)
//     count threads; a block that ends with copies on an unfinished phase or a named barrier
//     partly arrived aborts. Memory ordering is modelled for ThreadSanitizer only: arrivals at
//     __syncthreads, __syncwarp, named barriers and mbarriers release and completed waits
//     acquire (per barrier and generation); nothing else orders two threads of a block (warp
//     collectives exchange registers only, as on the hardware), so TSan reports an access pair
//     that no barrier orders.
//     Named barriers count threads where hardware counts warps;
//   * dynamic shared memory starts as 0xff bytes (NaN as floats): a read of a byte nobody wrote
//     shows up in the results; it is 16-byte aligned, no more, unless a launch asks for the
//     alignment its kernel declares (launch's smem_align). Static __shared__ variables are
//     function-local statics (blocks run one at a time, so each block has them to itself), but
//     they start as zeros and keep the previous block's values: a missing initialisation of one
//     does not show;
//   * ldmatrix and mma.sync follow the PTX ISA fragment layouts (csrc/cuda/mma_sync.cuh); mma
//     sums its 16 products in fp32 in k order (the hardware's order and rounding differ in the
//     last bits). ldmatrix rows must be 16-byte aligned and inside the block's shared memory.
// Blocks run one after another (in ascending order, or descending on request). Kernels are
// plain functions here: launch(grid, block, smem, f) runs f() once per thread.
#pragma once

#define SHADOWKV_CUDA_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __launch_bounds__(...)
#define __shared__ static

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <type_traits>
#include <vector>

#include "fibers.h"

namespace shadowkv_emu {

// All `n` threads arrive, then all go on. A barrier that orders memory (__syncthreads) releases
// at each arrival and acquires at each departure; the warp and warpgroup collectives' barriers
// do not (shuffles, ldmatrix, mma and wgmma exchange registers: on the hardware they order no
// memory accesses between lanes either, __syncwarp or a block barrier does).
class Barrier {
 public:
  Barrier(int n, bool orders_memory, const char* what) : n_(n), orders_memory_(orders_memory), what_(what) {}
  void wait() {
    uint64_t generation;
    const bool last = arrive(generation);
    if (orders_memory_) release(sync_.at(generation));
    if (!last) scheduler().wait_for_change(generation_, generation, what_);
    if (orders_memory_) acquire(sync_.at(generation));
  }

 private:
  // Counts an arrival: its generation, and whether it was the last one.
  SHADOWKV_EMU_UNWATCHED bool arrive(uint64_t& generation) {
    generation = generation_;
    if (++arrived_ < n_) return false;
    arrived_ = 0;
    ++generation_;
    return true;
  }

  int n_, arrived_ = 0;
  bool orders_memory_;
  const char* what_;
  uint64_t generation_ = 0;
  SyncObjects sync_;
};

struct Warp {
  Barrier barrier{32, false,
                  "a warp collective (shuffle, ballot, ldmatrix, mma.sync, wmma) that not all 32 lanes reach"};
  Barrier sync{32, true, "a __syncwarp that not all 32 lanes reach"};
  alignas(16) unsigned char slot[32][64];
  float mma_operands[2][16][16];  // wmma_emulation.h's mma_sync: A and B, decoded once per warp
};

// Four warps (sm_90 warpgroup-wide instructions): a barrier and a 16-byte slot per thread.
struct Warpgroup {
  Barrier barrier{128, false, "a warpgroup-wide instruction (wgmma) that not all 128 threads reach"};
  alignas(16) uint32_t slot[128][4];
};

struct Copy {
  void* dst;
  const void* src;
  bool valid;
  size_t bytes = 16;  // 16 or 4
};

inline void land(const std::vector<Copy>& group) {
  for (const Copy& c : group) {
    if (c.valid) {
      std::memcpy(c.dst, c.src, c.bytes);
    } else {
      std::memset(c.dst, 0, c.bytes);
    }
  }
}

// An mbarrier (csrc/cuda/mbarrier.cuh): a phase completes when `count` arrivals are in; the
// cp.async copies handed to it land then, all at once.
struct Mbarrier {
  int count = 0, pending = 0;
  uint64_t completed = 0;       // phases completed so far
  std::vector<Copy> copies;     // handed over by cp.async.mbarrier.arrive during this phase
  SyncObjects sync;             // by phase: its arrivals release, waits for it acquire
};

// A named barrier (bar.sync / bar.arrive): `threads` arrivals complete a generation.
struct NamedBarrier {
  int threads = 0, arrived = 0;
  uint64_t generation = 0;
  SyncObjects sync;
};

struct Block {
  explicit Block(int threads) : barrier(threads, true, "a barrier (__syncthreads) that not all its threads reach") {}
  Barrier barrier;
  // mbarriers (by address) and named barriers (by id); map nodes do not move, so their
  // synchronisation objects keep their addresses
  std::map<const void*, Mbarrier> mbarriers;
  std::map<int, NamedBarrier> named;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<std::unique_ptr<Warpgroup>> warpgroups;  // when the block has whole warpgroups
  unsigned char* smem = nullptr;    // dynamic shared memory: 16 bytes into `window`
  unsigned char* window = nullptr;  // 256 KB aligned: a shared-memory address is an offset in it
  size_t smem_bytes = 0;
};

struct Thread;
// Per-thread state of an emulation extension (cute_emulation.h: queued warpgroup MMAs).
struct Extension {
  virtual ~Extension() = default;
  virtual void at_exit(Thread&) {}
};

struct Thread {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
  Block* block;
  Warp* warp;
  Warpgroup* warpgroup;  // null when the block is not whole warpgroups
  int lane;
  std::unique_ptr<Extension> extension;
  std::vector<Copy> open_group;           // cp.async since the last commit
  std::deque<std::vector<Copy>> groups;  // committed, oldest first
};

// The running CUDA thread: what its fiber published (launch).
inline Thread& me() {
  void* t = scheduler().current_thread();
  if (t == nullptr) die("a device function ran outside launch()");
  return *static_cast<Thread*>(t);
}

// ---- warp collectives: write my value, barrier, read, barrier.
template <typename V>
V exchange(const V& mine, int src_lane) {
  static_assert(sizeof(V) <= sizeof(Warp::slot[0]), "exchange slot");
  Thread& t = me();
  copy_unwatched<sizeof(V)>(t.warp->slot[t.lane], &mine);
  t.warp->barrier.wait();
  V r;
  copy_unwatched<sizeof(V)>(&r, t.warp->slot[src_lane]);
  t.warp->barrier.wait();
  return r;
}

// ---- shared memory
inline void* dynamic_shared_memory() { return me().block->smem; }

inline bool in_shared(const void* p, size_t bytes) {
  const Block& b = *me().block;
  const auto* c = static_cast<const unsigned char*>(p);
  return c >= b.smem && c + bytes <= b.smem + b.smem_bytes;
}

// ---- cp.async
// A copy of `bytes` (16 or 4), both addresses aligned to it.
inline void cp_async(void* dst, const void* src, bool valid, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(dst) % bytes != 0 || reinterpret_cast<uintptr_t>(src) % bytes != 0)
    die(bytes == 16 ? "cp.async with an address that is not 16-byte aligned"
                    : "cp.async with an address that is not 4-byte aligned");
  if (!in_shared(dst, bytes)) die("cp.async destination outside the block's shared memory");
  me().open_group.push_back({dst, src, valid, bytes});
}
inline void cp_async_16(void* dst, const void* src, bool valid) { cp_async(dst, src, valid, 16); }
inline void cp_async_commit() {
  Thread& t = me();
  t.groups.push_back(std::move(t.open_group));
  t.open_group.clear();
}
inline void cp_async_wait(int n) {
  Thread& t = me();
  while (t.groups.size() > static_cast<size_t>(n)) {
    land(t.groups.front());
    t.groups.pop_front();
  }
}

// ---- mbarriers and named barriers (csrc/cuda/mbarrier.cuh). Their bookkeeping is the
// emulation's (Quiet); an arrival releases into its phase's (generation's) synchronisation object
// after its part (the phase's last arrival lands the phase's copies first), a completed wait
// acquires from it.
inline void check_mbarrier_address(const void* bar) {
  if (!in_shared(bar, 8) || reinterpret_cast<uintptr_t>(bar) % 8 != 0)
    die("mbarrier not 8-byte aligned in shared memory");
}
inline Mbarrier& mbarrier_at(Block& b, const void* bar) {
  check_mbarrier_address(bar);
  auto it = b.mbarriers.find(bar);  // (a read: the map's writes are Quiet)
  if (it == b.mbarriers.end()) die("an mbarrier was used before mbarrier.init");
  return it->second;
}
inline void mbar_init(void* bar, int count) {
  Block& b = *me().block;
  if (count <= 0) die("mbarrier.init with a count < 1");
  check_mbarrier_address(bar);
  Quiet q;
  Mbarrier& m = b.mbarriers[bar];
  m.count = m.pending = count;
  m.completed = 0;
  m.copies.clear();
}
// Counts an arrival: its phase, and whether it completed it.
SHADOWKV_EMU_UNWATCHED inline bool count_arrival(Mbarrier& m, uint64_t& phase) {
  phase = m.completed;
  if (--m.pending > 0) return false;
  m.pending = m.count;
  ++m.completed;
  return true;
}
// One arrival, after its copies (if any) joined the phase's: the last one of a phase lands them
// and completes it.
inline void mbar_arrive_on(Mbarrier& m) {
  uint64_t phase;
  if (count_arrival(m, phase) && !m.copies.empty()) {
    std::vector<Copy> landing;
    {
      Quiet q;
      landing.swap(m.copies);
    }
    land(landing);  // (the copies' writes: seen by TSan, ordered before the waits by the release)
  }
  release(m.sync.at(phase));
}
inline void mbar_arrive(void* bar) { mbar_arrive_on(mbarrier_at(*me().block, bar)); }
// cp.async.mbarrier.arrive.noinc: every copy this thread issued so far (committed or not) lands
// when the phase completes; the arrival counts at once (the latest the copies may land is then).
inline void cp_async_mbar_arrive(void* bar) {
  Thread& t = me();
  Mbarrier& m = mbarrier_at(*t.block, bar);
  {
    Quiet q;
    for (auto& group : t.groups) m.copies.insert(m.copies.end(), group.begin(), group.end());
    m.copies.insert(m.copies.end(), t.open_group.begin(), t.open_group.end());
    t.groups.clear();
    t.open_group.clear();
  }
  mbar_arrive_on(m);
}
// Returns once the phase of this parity completed: the current phase's parity differs.
inline void mbar_wait(void* bar, uint32_t parity) {
  Mbarrier& m = mbarrier_at(*me().block, bar);
  // The phase of this parity is the current one until `completed` moves on.
  if ((m.completed & 1u) == (parity & 1u)) scheduler().wait_for_change(m.completed, m.completed, "an mbarrier phase that never completes");
  acquire(m.sync.at(m.completed - 1));  // the latest completed phase: of this parity
}
// Counts an arrival of a `threads`-thread use: its generation, and whether it completed it.
SHADOWKV_EMU_UNWATCHED inline bool count_arrival(NamedBarrier& n, int threads, uint64_t& generation) {
  if (n.arrived == 0) n.threads = threads;
  if (n.threads != threads) die("named barrier used with two thread counts at once");
  generation = n.generation;
  if (++n.arrived < n.threads) return false;
  n.arrived = 0;
  ++n.generation;
  return true;
}
inline void named_barrier(int id, int threads, bool wait) {
  if (id <= 0 || id > 15 || threads <= 0 || threads % 32 != 0) die("named barrier: id 1..15, whole warps");
  Block& b = *me().block;
  auto it = b.named.find(id);
  if (it == b.named.end()) {
    Quiet q;
    it = b.named.emplace(id, NamedBarrier{}).first;
  }
  NamedBarrier* n = &it->second;
  uint64_t generation;
  const bool last = count_arrival(*n, threads, generation);
  release(n->sync.at(generation));
  if (!wait) return;
  if (!last) scheduler().wait_for_change(n->generation, generation, "a named barrier (bar.sync) that is never completed");
  acquire(n->sync.at(generation));
}

// ---- ldmatrix .x4 and mma.sync m16n8k16 (layouts: csrc/cuda/mma_sync.cuh)
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) die("ldmatrix row address not 16-byte aligned");
  if (!in_shared(row, 16)) die("ldmatrix row outside the block's shared memory");
  Thread& t = me();
  copy_unwatched<sizeof(row)>(t.warp->slot[t.lane], &row);
  t.warp->barrier.wait();
  const int g = t.lane / 4, q = t.lane % 4;
  for (int m = 0; m < 4; ++m) {
    const auto rows = [&](int i) {
      const void* p;
      copy_unwatched<sizeof(p)>(&p, t.warp->slot[8 * m + i]);
      return static_cast<const uint16_t*>(p);
    };
    const uint16_t lo = trans ? rows(2 * q)[g] : rows(g)[2 * q];
    const uint16_t hi = trans ? rows(2 * q + 1)[g] : rows(g)[2 * q + 1];
    r[m] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  t.warp->barrier.wait();
}

template <typename T>
float widen(uint16_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(v));
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return __bfloat162float(v);
  } else {
    return __half2float(v);
  }
}

template <typename T>
void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  struct Frag {
    uint32_t a[4], b[2];
  };
  Thread& t = me();
  Frag mine{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}};
  copy_unwatched<sizeof(mine)>(t.warp->slot[t.lane], &mine);
  t.warp->barrier.wait();
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    Frag f;
    copy_unwatched<sizeof(f)>(&f, t.warp->slot[l]);
    const int g = l / 4, q = l % 4;
    const auto put = [](float* dst, int stride, uint32_t reg) {
      dst[0] = widen<T>(static_cast<uint16_t>(reg & 0xffff));
      dst[stride] = widen<T>(static_cast<uint16_t>(reg >> 16));
    };
    put(&A[g][2 * q], 1, f.a[0]);
    put(&A[g + 8][2 * q], 1, f.a[1]);
    put(&A[g][2 * q + 8], 1, f.a[2]);
    put(&A[g + 8][2 * q + 8], 1, f.a[3]);
    put(&B[2 * q][g], 8, f.b[0]);
    put(&B[2 * q + 8][g], 8, f.b[1]);
  }
  t.warp->barrier.wait();
  const int g = t.lane / 4, q = t.lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = 2 * q + e % 2;
    float acc = c[e];
    for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
    c[e] = acc;
  }
}

// The order launch() runs the blocks in. A GPU promises none: a kernel whose blocks coordinate
// (a ticket that elects the last one) should pass in both.
enum class BlockOrder { kAscending, kDescending };

// Runs kernel() for every thread of every block of a one-dimensional grid, blocks one after
// another (in `order`), each with `smem_bytes` of dynamic shared memory aligned to `smem_align`
// bytes and no more: 16, the least CUDA promises, or what the kernel's extern __shared__
// declaration asks with __align__ (CUDA honours it: the WMMA attention kernels rely on 128).
template <typename Kernel>
void launch(unsigned grid, unsigned block_threads, size_t smem_bytes, Kernel&& kernel,
            BlockOrder order = BlockOrder::kAscending, size_t smem_align = 16) {
  if (block_threads % 32 != 0) die("blocks of whole warps only");
  if (smem_align < 16 || smem_align > 1024 || (smem_align & (smem_align - 1)) != 0)
    die("launch: smem_align must be a power of two in [16, 1024]");
  for (unsigned i = 0; i < grid; ++i) {
    const unsigned bx = order == BlockOrder::kAscending ? i : grid - 1 - i;
    Block blk(static_cast<int>(block_threads));
    for (unsigned w = 0; w < block_threads / 32; ++w) blk.warps.push_back(std::make_unique<Warp>());
    if (block_threads % 128 == 0)
      for (unsigned w = 0; w < block_threads / 128; ++w) blk.warpgroups.push_back(std::make_unique<Warpgroup>());
    // A 256 KB aligned window: a shared-memory address is its offset in it (wgmma descriptors
    // keep bits 4-17), as on the GPU. The dynamic shared memory starts smem_align bytes in (by
    // default 16, the least alignment CUDA promises), so kernels that need more (1024 for
    // 128-byte swizzles) must round up themselves, as on a GPU that gives them no more.
    void* raw = nullptr;
    if (posix_memalign(&raw, size_t{1} << 18, smem_bytes + smem_align) != 0) die("out of memory");
    std::unique_ptr<unsigned char, decltype(&std::free)> window(static_cast<unsigned char*>(raw), &std::free);
    std::memset(window.get(), 0xff, smem_bytes + smem_align);
    blk.window = window.get();
    blk.smem = window.get() + smem_align;
    blk.smem_bytes = smem_bytes;
    struct Launch {
      std::remove_reference_t<Kernel>* kernel;
      Block* blk;
      unsigned bx, grid, block_threads;
    } ctx{&kernel, &blk, bx, grid, block_threads};
    const auto body = [](void* c, unsigned tx) {
      const Launch& l = *static_cast<const Launch*>(c);
      Thread t{};
      t.thread_idx = make_uint3(tx, 0, 0);
      t.block_idx = make_uint3(l.bx, 0, 0);
      t.block_dim = dim3(l.block_threads);
      t.grid_dim = dim3(l.grid);
      t.block = l.blk;
      t.warp = l.blk->warps[tx / 32].get();
      t.warpgroup = l.blk->warpgroups.empty() ? nullptr : l.blk->warpgroups[tx / 128].get();
      t.lane = static_cast<int>(tx % 32);
      scheduler().set_thread(&t);
      (*l.kernel)();
      // A thread that exits with copies in flight has a missing wait (the kernels wait for all).
      for (const auto& group : t.groups)
        if (!group.empty()) die("a thread exited with cp.async copies in flight");
      if (!t.open_group.empty()) die("a thread exited with uncommitted cp.async copies");
      if (t.extension) t.extension->at_exit(t);
    };
    scheduler().run(block_threads, body, &ctx);
    // What the hardware leaves undefined at exit: copies that never landed, a barrier half passed.
    for (const auto& m : blk.mbarriers)
      if (!m.second.copies.empty()) die("a block ended with cp.async copies on an mbarrier whose phase never completed");
    for (const auto& n : blk.named)
      if (n.second.arrived != 0) die("a block ended with a named barrier partly arrived");
  }
}

}  // namespace shadowkv_emu

#define threadIdx (::shadowkv_emu::me().thread_idx)
#define blockIdx (::shadowkv_emu::me().block_idx)
#define blockDim (::shadowkv_emu::me().block_dim)
#define gridDim (::shadowkv_emu::me().grid_dim)

inline void __syncthreads() { ::shadowkv_emu::me().block->barrier.wait(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) ::shadowkv_emu::die("__syncwarp of a partial warp is not emulated");
  ::shadowkv_emu::me().warp->sync.wait();
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
[[noreturn]] inline void __trap() { ::shadowkv_emu::die("__trap()"); }

template <typename V>
V __shfl_xor_sync(unsigned mask, V v, int lane_mask) {
  if (mask != 0xffffffffu) ::shadowkv_emu::die("shuffles of a partial warp are not emulated");
  return ::shadowkv_emu::exchange(v, ::shadowkv_emu::me().lane ^ lane_mask);
}
// (width 32: the source lane is src_lane mod 32, as on the device)
template <typename V>
V __shfl_sync(unsigned mask, V v, int src_lane) {
  if (mask != 0xffffffffu) ::shadowkv_emu::die("shuffles of a partial warp are not emulated");
  return ::shadowkv_emu::exchange(v, src_lane & 31);
}

inline int atomicOr(int* p, int v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
// Float additions as a compare-and-swap loop on the bits (as the device's, atomic to every thread).
inline float atomicAdd(float* p, float v) {
  uint32_t* bits = reinterpret_cast<uint32_t*>(p);
  uint32_t old = __atomic_load_n(bits, __ATOMIC_SEQ_CST), sum;
  do {
    float f;
    std::memcpy(&f, &old, sizeof(f));
    f += v;
    std::memcpy(&sum, &f, sizeof(f));
  } while (!__atomic_compare_exchange_n(bits, &old, sum, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
  float f;
  std::memcpy(&f, &old, sizeof(f));
  return f;
}
// sm_90's vector float addition: each element atomic on its own, as on the device.
inline float2 atomicAdd(float2* p, float2 v) {
  if (reinterpret_cast<uintptr_t>(p) % 8 != 0) ::shadowkv_emu::die("atomicAdd(float2*): a misaligned address");
  const float x = atomicAdd(&p->x, v.x), y = atomicAdd(&p->y, v.y);
  return make_float2(x, y);
}
inline int atomicMin(int* p, int v) {
  int old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (v < old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
inline int atomicMax(int* p, int v) {
  int old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (v > old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
template <typename V>
V __ldcg(const V* p) {
  return __atomic_load_n(p, __ATOMIC_SEQ_CST);
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  if (mask != 0xffffffffu) ::shadowkv_emu::die("ballots of a partial warp are not emulated");
  ::shadowkv_emu::Thread& t = ::shadowkv_emu::me();
  const unsigned mine = predicate ? 1u : 0u;
  ::shadowkv_emu::copy_unwatched<sizeof(mine)>(t.warp->slot[t.lane], &mine);
  t.warp->barrier.wait();
  unsigned ballot = 0;
  for (int l = 0; l < 32; ++l) {
    unsigned bit;
    ::shadowkv_emu::copy_unwatched<sizeof(bit)>(&bit, t.warp->slot[l]);
    ballot |= bit << l;
  }
  t.warp->barrier.wait();
  return ballot;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
template <typename V>
V __ldg(const V* p) {
  return *p;
}
// A shared-memory pointer as the 32-bit address the hardware uses: its low bits (the block's
// shared memory is 256 KB aligned, see launch).
inline size_t __cvta_generic_to_shared(const void* p) {
  return static_cast<size_t>(reinterpret_cast<uintptr_t>(p) & 0xffffffffu);
}

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
