// Device scratch memory of the CUDA ops: decode partitions, eviction and append check records,
// attention tile statistics and the one-pass backward's fp32 dQ accumulator.
//
// By default an op takes it with cudaMallocAsync and gives it back with cudaFreeAsync on the
// op's stream. An application that manages device memory itself (an inference server's arena,
// PyTorch's caching allocator: the Python package installs that one) installs its own pair, so
// that the scratch comes out of, and counts against, the memory it already holds: memory cached
// by one allocator is invisible to the other, and a large workspace (the dQ accumulator is
// B x Hq x Lq x D floats) could otherwise fail while the application's pool has room.
#pragma once

#include <cstddef>

namespace shadowkv {

struct WorkspaceAllocator {
  // `bytes` (> 0) of device memory on the current device, usable by work queued on `stream` (a
  // cudaStream_t) after the call. Throws, or returns nullptr (the op then throws
  // std::runtime_error), when it cannot.
  void* (*allocate)(size_t bytes, void* stream) = nullptr;
  // Gives back what `allocate` returned, stream-ordered as cudaFreeAsync: the memory may be
  // reused only by work that runs after what is already queued on `stream`. Ops release their
  // workspace in destructors, also while an exception unwinds, so an exception from here is
  // swallowed (and that block lost) rather than propagated.
  void (*release)(void* ptr, void* stream) = nullptr;
};

// Installs `allocator` for the CUDA op calls that start after it returns (a call in flight keeps
// the pair it started with), or restores cudaMallocAsync / cudaFreeAsync when both pointers are
// null. Returns the pair it replaces ({null, null} for the default). Throws
// std::invalid_argument when exactly one pointer is null. Thread-safe.
WorkspaceAllocator set_workspace_allocator(WorkspaceAllocator allocator);

// The installed pair ({null, null}: the default).
WorkspaceAllocator workspace_allocator();

}  // namespace shadowkv
