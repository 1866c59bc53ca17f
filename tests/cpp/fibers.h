// Cooperative fibers for the CUDA host emulation (cuda_emulation.h): every CUDA thread of a block
// is a fiber with its own stack, and one OS thread runs them in turn. A fiber runs until it must
// wait (a barrier, an mbarrier phase), then hands control back to the scheduler, which resumes
// the first waiting fiber whose condition holds, round-robin in thread order.
//
// Why not an OS thread per CUDA thread (the emulation's first form): the kernels' warp
// collectives are barriers of 32 threads, so the tests spent most of their time in futex waits
// and the kernel's scheduler (the decode tests: 75 s wall, 97 CPU-s of system time on two
// cores), and under the sanitizers thread creation dominated too. Fibers switch in a few
// instructions, run in a deterministic order, and report a deadlock (every unfinished thread of
// a block waiting) at once instead of after a timeout.
//
// The sanitizers are told about the fibers:
//   * ThreadSanitizer: every fiber is a TSan fiber and switches do not synchronise, so an access
//     pair of two CUDA threads is a race unless the emulated synchronisation orders it: the
//     emulation calls release() where the hardware releases (barrier and mbarrier arrivals) and
//     acquire() where it acquires (a completed wait). The emulation's own bookkeeping is shared
//     by all fibers without such ordering and written unseen by TSan (see Quiet below).
//     A block's fibers start after everything the launching thread did and the launching thread
//     continues after all of them (as a kernel launch and its completion).
//   * AddressSanitizer: the stack switches are announced (__sanitizer_start/finish_switch_fiber).
// The switch is a few lines of x86-64 assembly (no signal-mask system call, and nothing the
// sanitizers intercept); other targets, or SHADOWKV_EMU_UCONTEXT, use swapcontext.
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#if !defined(__x86_64__) || defined(SHADOWKV_EMU_UCONTEXT)
#define SHADOWKV_EMU_SWAPCONTEXT 1
#include <ucontext.h>
#endif

#if defined(__SANITIZE_THREAD__)
#define SHADOWKV_EMU_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define SHADOWKV_EMU_TSAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define SHADOWKV_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SHADOWKV_EMU_ASAN 1
#endif
#endif

extern "C" {
#if defined(SHADOWKV_EMU_TSAN)
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_set_fiber_name(void* fiber, const char* name);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
void __tsan_ignore_thread_begin(void);
void __tsan_ignore_thread_end(void);
#endif
#if defined(SHADOWKV_EMU_ASAN)
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
void __asan_unpoison_memory_region(void const volatile* addr, size_t size);
#endif
}

namespace shadowkv_emu {

[[noreturn]] inline void die(const char* what) {
  std::fprintf(stderr, "cuda_emulation: %s\n", what);
  std::abort();
}

// The emulation's bookkeeping (counters, maps, the scheduler's view of a fiber, the lanes'
// exchange slots) is shared by all fibers without the ordering TSan would need, so TSan must not
// see its writes (reads then race with nothing): writes to it happen in functions built
// without TSan's instrumentation (SHADOWKV_EMU_UNWATCHED: the hot paths; such a function is
// never inlined into an instrumented one) or, where they go through library code (maps,
// vectors), while a Quiet is alive (TSan ignores the accesses; dearer: TSan records the stack
// at each). The kernels' own memory is never written either way.
#if defined(SHADOWKV_EMU_TSAN)
#define SHADOWKV_EMU_UNWATCHED __attribute__((no_sanitize("thread"), noinline))
#else
#define SHADOWKV_EMU_UNWATCHED
#endif

// Copies N bytes of the emulation's own state (a lane's exchange slot) unseen by TSan.
template <size_t N>
SHADOWKV_EMU_UNWATCHED void copy_unwatched(void* dst, const void* src) {
  __builtin_memcpy(dst, src, N);
}

struct Quiet {
#if defined(SHADOWKV_EMU_TSAN)
  Quiet() { __tsan_ignore_thread_begin(); }
  ~Quiet() { __tsan_ignore_thread_end(); }
#else
  Quiet() {}  // (user-provided: no unused-variable warning where it is declared)
#endif
  Quiet(const Quiet&) = delete;
  Quiet& operator=(const Quiet&) = delete;
};

// Happens-before edges for TSan: everything before release(x) happens before everything after
// a later acquire(x) (in any fiber). No-ops without TSan.
inline void release(void* x) {
#if defined(SHADOWKV_EMU_TSAN)
  __tsan_release(x);
#else
  (void)x;
#endif
}
inline void acquire(void* x) {
#if defined(SHADOWKV_EMU_TSAN)
  __tsan_acquire(x);
#else
  (void)x;
#endif
}

// One synchronisation object per generation (mod 64) of a barrier: a thread that left
// generation g early and arrives at g + 1 releases into another object than the one its
// slower peers still acquire from g, so their acquisition does not order them after its
// writes between the two.
struct SyncObjects {
  char cell[64];
  void* at(uint64_t generation) { return &cell[generation % 64]; }
};

#if !defined(SHADOWKV_EMU_SWAPCONTEXT)
// Saves the callee-saved registers and the SSE/x87 control words on the current stack, stores
// its stack pointer in *from and continues from the stack pointer `to` (saved the same way, or
// laid out by Fiber::start). System V x86-64.
__attribute__((naked, noinline)) inline void switch_stack(void** /*from*/, void* /*to*/) {
  asm("pushq %rbp\n\t"
      "pushq %rbx\n\t"
      "pushq %r12\n\t"
      "pushq %r13\n\t"
      "pushq %r14\n\t"
      "pushq %r15\n\t"
      "subq $8, %rsp\n\t"
      "stmxcsr (%rsp)\n\t"
      "fnstcw 4(%rsp)\n\t"
      "movq %rsp, (%rdi)\n\t"
      "movq %rsi, %rsp\n\t"
      "ldmxcsr (%rsp)\n\t"
      "fldcw 4(%rsp)\n\t"
      "addq $8, %rsp\n\t"
      "popq %r15\n\t"
      "popq %r14\n\t"
      "popq %r13\n\t"
      "popq %r12\n\t"
      "popq %rbx\n\t"
      "popq %rbp\n\t"
      "ret\n\t");
}
#endif

struct Context {
#if defined(SHADOWKV_EMU_SWAPCONTEXT)
  ucontext_t uc;
#else
  void* sp = nullptr;
#endif
};

inline void transfer(Context& from, Context& to) {
#if defined(SHADOWKV_EMU_SWAPCONTEXT)
  if (swapcontext(&from.uc, &to.uc) != 0) die("swapcontext failed");
#else
  switch_stack(&from.sp, to.sp);
#endif
}

void fiber_entry();

// A fiber: its stack (with a guard page below it) and, while it waits, its wait condition.
struct Fiber {
  static constexpr size_t kStackBytes = size_t{1} << 20;  // as deep as the kernels' frames need
  static constexpr size_t kGuardBytes = 4096;
  static constexpr size_t kReusedTopBytes = 16384;  // more than fiber_entry's frames take

  explicit Fiber(int index) : index(index) {
    void* p = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) die("mmap of a fiber stack failed");
    if (mprotect(p, kGuardBytes, PROT_NONE) != 0) die("mprotect of a fiber stack's guard page failed");
    mapping = static_cast<unsigned char*>(p);
    stack = mapping + kGuardBytes;
#if defined(SHADOWKV_EMU_TSAN)
    tsan = __tsan_create_fiber(0);
    name = "emulated CUDA thread " + std::to_string(index);
    __tsan_set_fiber_name(tsan, name.c_str());
#endif
  }
  ~Fiber() {
#if defined(SHADOWKV_EMU_TSAN)
    __tsan_destroy_fiber(tsan);
#endif
    munmap(mapping, kStackBytes + kGuardBytes);
  }
  Fiber(const Fiber&) = delete;
  Fiber& operator=(const Fiber&) = delete;

  // Lays out a fresh call of fiber_entry on the stack: the next resume starts it.
  void start() {
#if defined(SHADOWKV_EMU_ASAN)
    // The frames the fiber's last run left for good (fiber_entry's, the final switch's) keep
    // their redzones poisoned; every other frame returned and cleaned up after itself.
    __asan_unpoison_memory_region(stack + kStackBytes - kReusedTopBytes, kReusedTopBytes);
#endif
#if defined(SHADOWKV_EMU_SWAPCONTEXT)
    if (getcontext(&context.uc) != 0) die("getcontext failed");
    context.uc.uc_stack.ss_sp = stack;
    context.uc.uc_stack.ss_size = kStackBytes;
    context.uc.uc_link = nullptr;
    makecontext(&context.uc, fiber_entry, 0);
#else
    // What switch_stack pops: the control words (MXCSR 0x1f80, x87 0x037f: the defaults), six
    // registers, the return address (fiber_entry) and a null return address of fiber_entry,
    // which never returns; fiber_entry starts with the stack pointer 8 mod 16, as after a call.
    const uintptr_t top = reinterpret_cast<uintptr_t>(stack + kStackBytes) & ~uintptr_t{15};
    auto* frame = reinterpret_cast<uint64_t*>(top - 72);
    frame[0] = (uint64_t{0x037f} << 32) | 0x1f80;
    for (int r = 1; r <= 6; ++r) frame[r] = 0;
    frame[7] = reinterpret_cast<uint64_t>(&fiber_entry);
    frame[8] = 0;
    context.sp = frame;
#endif
    done = false;
    wait_word = nullptr;
  }

  const int index;
  unsigned char* mapping;
  unsigned char* stack;
  Context context;
  void* tsan = nullptr;
  void* asan_fake_stack = nullptr;
  std::string name;
  bool done = true;
  void* thread = nullptr;  // what the body published for the emulation (its Thread)
  // While it waits: resume once *wait_word != wait_seen; `waiting_for` says on what.
  const uint64_t* wait_word = nullptr;
  uint64_t wait_seen = 0;
  const char* waiting_for = nullptr;
};

// Runs a block's threads as fibers on the calling OS thread (one scheduler per OS thread; the
// fibers and their stacks are kept for the next block).
class Scheduler {
 public:
  using Body = void (*)(void* ctx, unsigned thread);

  // Runs body(ctx, t) for t = 0 .. threads - 1, each on its own fiber, until all have returned.
  // Dies when every unfinished fiber waits for a condition no other fiber can make true.
  void run(unsigned threads, Body body, void* ctx) {
    while (pool_.size() < threads) pool_.push_back(std::make_unique<Fiber>(static_cast<int>(pool_.size())));
    {
      Quiet q;
      body_ = body;
      ctx_ = ctx;
      for (unsigned i = 0; i < threads; ++i) pool_[i]->start();
    }
    release(&block_start_);  // the launch: the block starts after everything before it
    unsigned live = threads;
    while (live > 0) {
      unsigned resumed = 0;
      for (unsigned i = 0; i < threads; ++i) {
        Fiber& f = *pool_[i];
        if (!claim(f)) continue;
        resume(f);
        ++resumed;
        if (settle(f)) --live;
      }
      if (resumed == 0) deadlock(threads);
    }
    acquire(&block_end_);  // the kernel's completion: after every thread of the block
  }

  // In a fiber: returns once `word` (the emulation's, written unseen by TSan) differs from
  // `seen` (at once if it does now). Every wait of the emulation is one for a counter to move
  // on (a barrier's generation, an mbarrier's completed phases), and so the scheduler checks
  // it without running any of the fiber's code.
  void wait_for_change(const uint64_t& word, uint64_t seen, const char* what) {
    Fiber* f = prepare_wait(word, seen, what);
    if (f != nullptr) suspend(*f, false);
  }

  // In a fiber: what its body publishes about itself (the emulation's Thread), which
  // current_thread() returns while the fiber runs.
  SHADOWKV_EMU_UNWATCHED void set_thread(void* thread) { current_->thread = thread; }
  // The running fiber's published pointer; null outside a fiber.
  void* current_thread() const { return current_ != nullptr ? current_->thread : nullptr; }

 private:
  friend void fiber_entry();

  // Whether f is to run now (unfinished, and what it waits for happened); then it is current.
  SHADOWKV_EMU_UNWATCHED bool claim(Fiber& f) {
    if (f.done || (f.wait_word != nullptr && *f.wait_word == f.wait_seen)) return false;
    f.wait_word = nullptr;
    current_ = &f;
#if defined(SHADOWKV_EMU_TSAN)
    if (main_tsan_ == nullptr) main_tsan_ = __tsan_get_current_fiber();
#endif
    return true;
  }
  // After f handed control back: whether it finished.
  SHADOWKV_EMU_UNWATCHED bool settle(Fiber& f) {
    current_ = nullptr;
    return f.done;
  }
  // The current fiber, with its wait recorded, or null when the word moved on already.
  SHADOWKV_EMU_UNWATCHED Fiber* prepare_wait(const uint64_t& word, uint64_t seen, const char* what) {
    if (word != seen) return nullptr;
    Fiber* f = current_;
    f->wait_word = &word;
    f->wait_seen = seen;
    f->waiting_for = what;
    return f;
  }
  SHADOWKV_EMU_UNWATCHED void* main_tsan() const { return main_tsan_; }
  // fiber_entry's view of the launch, and its end.
  SHADOWKV_EMU_UNWATCHED Fiber* starting(Body& body, void*& ctx) const {
    body = body_;
    ctx = ctx_;
    return current_;
  }
  SHADOWKV_EMU_UNWATCHED static void finishing(Fiber& f) {
    f.done = true;
    f.thread = nullptr;
  }

  void resume(Fiber& f) {
#if defined(SHADOWKV_EMU_ASAN)
    __sanitizer_start_switch_fiber(&main_fake_stack_, f.stack, Fiber::kStackBytes);
#endif
#if defined(SHADOWKV_EMU_TSAN)
    __tsan_switch_to_fiber(f.tsan, 1 /* __tsan_switch_to_fiber_no_sync */);
#endif
    transfer(main_, f.context);
#if defined(SHADOWKV_EMU_ASAN)
    __sanitizer_finish_switch_fiber(main_fake_stack_, nullptr, nullptr);
#endif
  }

  // Back to the scheduler; for good when `finished` (the fiber is started afresh next time).
  void suspend(Fiber& f, bool finished) {
#if defined(SHADOWKV_EMU_ASAN)
    __sanitizer_start_switch_fiber(finished ? nullptr : &f.asan_fake_stack, main_bottom_, main_size_);
#endif
#if defined(SHADOWKV_EMU_TSAN)
    __tsan_switch_to_fiber(main_tsan(), 1 /* __tsan_switch_to_fiber_no_sync */);
#endif
    transfer(f.context, main_);
    if (finished) die("a finished fiber was resumed");
#if defined(SHADOWKV_EMU_ASAN)
    __sanitizer_finish_switch_fiber(f.asan_fake_stack, &main_bottom_, &main_size_);
#endif
  }

  [[noreturn]] void deadlock(unsigned threads) {
    Quiet q;
    std::string what = "every unfinished thread of the block waits (a deadlock; on a GPU it would hang):";
    int shown = 0, waiting = 0;
    for (unsigned i = 0; i < threads; ++i) {
      const Fiber& f = *pool_[i];
      if (f.done) continue;
      ++waiting;
      if (shown < 4) {
        what += "\n  thread " + std::to_string(i) + " waits for " + (f.waiting_for ? f.waiting_for : "?");
        ++shown;
      }
    }
    if (waiting > shown) what += "\n  ... and " + std::to_string(waiting - shown) + " more";
    die(what.c_str());
  }

  std::vector<std::unique_ptr<Fiber>> pool_;
  Fiber* current_ = nullptr;
  Context main_;
  void* main_tsan_ = nullptr;
  void* main_fake_stack_ = nullptr;
  const void* main_bottom_ = nullptr;
  size_t main_size_ = 0;
  Body body_ = nullptr;
  void* ctx_ = nullptr;
  char block_start_ = 0, block_end_ = 0;  // TSan synchronisation objects
};

inline Scheduler& scheduler() {
  static thread_local Scheduler s;
  return s;
}

// A fiber's first (and only) frame: runs the body for its thread, then returns to the scheduler
// for good.
inline void fiber_entry() {
  Scheduler& s = scheduler();
  Scheduler::Body body;
  void* ctx;
  Fiber* f = s.starting(body, ctx);
#if defined(SHADOWKV_EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &s.main_bottom_, &s.main_size_);
#endif
  acquire(&s.block_start_);
  try {
    body(ctx, static_cast<unsigned>(f->index));
  } catch (...) {
    die("an exception left an emulated CUDA thread");  // (as one leaving an OS thread terminates)
  }
  release(&s.block_end_);
  Scheduler::finishing(*f);
  s.suspend(*f, true);
}

}  // namespace shadowkv_emu
