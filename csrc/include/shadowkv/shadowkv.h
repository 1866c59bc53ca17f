// Umbrella header: everything a C++ consumer of shadowkv_core needs.
//
// Errors: every entry point checks its params first and throws std::invalid_argument (naming
// the argument) before it writes anything. The CUDA entry points check the values in device
// arrays (lengths, page ids) only with check_values (without it a bad value shows as documented
// per op: a poisoned length of -1, NaN outputs), and throw std::runtime_error for CUDA errors
// and in a build without CUDA. Nothing is reported through return codes.
//
// Threads: an op is a function of its params. Calls that write disjoint memory may run at the
// same time from any threads; the library's own state (the workspace allocator, workspace.h;
// per-device kernel attributes; the detected CPU features) is set up under locks or once.
// Calls that write the same arrays (an append and an evict on one cache) race like any other
// writes to one array: serialise them per cache. A ParallelFor may run `body` on its disjoint
// [begin, end) ranges concurrently on several threads; the kernels write disjoint memory per
// range.
//
// Settings read at every op call, from the environment: SHADOWKV_CPU_ISA (the CPU kernels'
// instruction set), SHADOWKV_ATTENTION_KERNEL and SHADOWKV_DECODE_KERNEL (the CUDA kernels);
// `python -m shadowkv info` lists their values. Set them before starting threads that call ops:
// a setenv while another thread's op reads the environment is a data race (POSIX). A value
// outside its list makes every op that reads it throw std::invalid_argument naming it.
#pragma once

#include "shadowkv/dtypes.h"
#include "shadowkv/paged_kv.h"
#include "shadowkv/shadow_attention.h"
#include "shadowkv/version.h"
#include "shadowkv/workspace.h"
