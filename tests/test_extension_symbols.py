"""The compiled extension exports no C++ runtime of its own.

Some toolchains link libstdc++ into ``shadowkv._C`` statically. Exported, that copy mixes with
the libstdc++.so torch has already loaded (the dynamic linker binds some of our calls to the
other version): on a GPU image with GCC 13 headers and a GCC 14 runtime every error message
shadowkv formatted crashed the process. CMake links ``_C`` with ``--exclude-libs,ALL``; this
test reads the extension's dynamic symbol table to keep it that way.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from shadowkv import _C

# Members of std::locale / ios_base / ostream / istream, the throw and personality routines and
# the standard streams: defined only by a C++ runtime, never by shadowkv.
RUNTIME = re.compile(r"St6locale|St8ios_base|^_ZNK?S[oi]|^__cxa_throw$|^__gxx_personality_v0$|^_ZSt4cout$")


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("nm") is None,
                    reason="reads an ELF symbol table with binutils' nm")
def test_extension_exports_no_cxx_runtime():
    out = subprocess.run(["nm", "-D", "--defined-only", _C.__file__], capture_output=True, text=True, check=True)
    names = [line.split()[-1] for line in out.stdout.splitlines() if line.strip()]
    assert any(n.startswith("PyInit__C") for n in names), "nm read no symbols of the extension"
    leaked = [n for n in names if RUNTIME.search(n)]
    assert not leaked, (f"{_C.__file__} exports {len(leaked)} C++ runtime symbols (a statically linked "
                        f"libstdc++ that is not hidden), e.g. {leaked[:5]}")
