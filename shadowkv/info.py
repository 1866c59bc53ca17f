"""What this installation is: versions, built CUDA archs, whether the running GPU is covered."""

from __future__ import annotations

import torch

from . import _C
from .ops import ATTENTION_KERNEL_ENV, ATTENTION_KERNELS, DECODE_KERNEL_ENV, DECODE_KERNELS


def built_archs() -> list[str]:
    """Compute capabilities the CUDA kernels were built for, e.g. ``['90a', '80']``."""
    return [a for a in _C.cuda_archs().split(";") if a]


def gpu_covered(major: int, minor: int, archs: list[str]) -> bool:
    """True when a GPU of compute capability ``major.minor`` can run one of ``archs``.

    Arch-specific builds (``90a``) run only on that exact capability; family-specific ones
    (``100f``) and plain SASS (``80``) run on the same major with an equal or newer minor.
    """
    cc = major * 10 + minor
    for a in archs:
        built = int(a.rstrip("af"))
        if built == cc if a.endswith("a") else (built // 10 == major and built <= cc):
            return True
    return False


def _cute_state() -> str:
    if _C.built_with_cute():
        wgmma = ("wgmma kernels on sm_90, the forward warp-specialised at head dim 128, mma.sync elsewhere; "
                 "wgmma, wgmma_ws, wgmma_wsb, wgmma_wsf, wgmma_fused by name"
                 if "90a" in built_archs() else "mma.sync; no wgmma kernels (9.0a not built)")
        return f"built, the default ({wgmma}; SHADOWKV_ATTENTION_KERNEL=wmma for the WMMA kernels)"
    return "not built (" + ("no CUTLASS headers" if _C.built_with_cuda() else "CPU-only build") + ")"


# The kernel choices the CUDA entry points read (an override set with _C.set_kernel_choice, as
# ops.attention_kernel() does, else the environment variable), and what each accepts
# (csrc/cuda/shadow_attention_fwd.cu, paged_decode_attention.cu; the lists live in ops.py).
KERNEL_ENV = {ATTENTION_KERNEL_ENV: ATTENTION_KERNELS, DECODE_KERNEL_ENV: DECODE_KERNELS}


def bad_kernel_choices() -> list[tuple[str, str, tuple[str, ...]]]:
    """``(setting, value, allowed)`` for each kernel setting (its override, else its environment
    variable) set to a name the CUDA calls would refuse at their first call (unset or "" is
    "auto"): info flags them, train refuses them up front."""
    return [(name, value, allowed) for name, allowed in KERNEL_ENV.items()
            if (value := _C.kernel_choice(name)) and value not in allowed]


def _cpu_isa_line() -> str:
    try:
        isa = _C.cpu_isa()
    except (ValueError, RuntimeError) as e:  # a bad SHADOWKV_CPU_ISA: the other lines still print
        isa = f"error: {e}"
    return f"CPU kernels: {isa} (SHADOWKV_CPU_ISA: auto, baseline, avx2, avx512)"


def _gpu_line(i: int, archs: list[str]) -> str:
    major, minor = torch.cuda.get_device_capability(i)
    head = f"GPU {i}: {torch.cuda.get_device_name(i)} sm_{major}{minor} -> "
    if not _C.built_with_cuda():  # the arch list is not the problem
        return head + "NOT covered: this build has no CUDA kernels (rebuild with SHADOWKV_CUDA=ON and nvcc on PATH)"
    if gpu_covered(major, minor, archs):
        return head + "covered"
    return head + f"NOT covered (rebuild with SHADOWKV_CUDA_ARCHS including {major}.{minor})"


def info_lines() -> list[str]:
    archs = built_archs()
    lines = [
        f"shadowkv {_C.version()}",
        f"torch {torch.__version__} (CUDA runtime {torch.version.cuda or 'none'})",
        f"CUDA kernels built: {'yes' if _C.built_with_cuda() else 'no'}",
        f"built archs: {', '.join('sm_' + a for a in archs) if archs else 'none'}",
        f"CuTe attention kernel: {_cute_state()}",
    ]
    if _C.built_with_cuda():
        lines.append("paged decode kernel: mma_rows where it applies (bf16/fp16, head dim 64/128, sm_80+), "
                     f"else warp (SHADOWKV_DECODE_KERNEL: {', '.join(KERNEL_ENV['SHADOWKV_DECODE_KERNEL'])})")
    for name, value, allowed in bad_kernel_choices():
        lines.append(f"{name}={value!r}: not a kernel name ({', '.join(allowed)}); CUDA calls will refuse it")
    if torch.cuda.is_available():
        lines.extend(_gpu_line(i, archs) for i in range(torch.cuda.device_count()))
    else:
        lines.append("GPU: none visible")
    lines.append(f"CPU threads: {torch.get_num_threads()}")
    lines.append(_cpu_isa_line())
    return lines
