"""The version number is written in four places by hand; they must agree.

pyproject.toml (the wheel's metadata), CMakeLists.txt's project() (the CMake package's
version file and the shared library's soname), csrc/include/shadowkv/version.h (C++ callers,
and ``shadowkv.__version__`` through ``_C.version()``). A bump of one alone would let
``find_package(shadowkv 0.2)`` accept a 0.1 library, or a wheel report another version."""

import re
from pathlib import Path

import shadowkv

ROOT = Path(__file__).resolve().parents[1]


def _read(rel: str) -> str:
    return (ROOT / rel).read_text()


def test_every_version_number_agrees():
    pyproject = re.search(r'^version = "([^"]+)"$', _read("pyproject.toml"), re.M).group(1)
    cmake = re.search(r"project\(shadowkv\s+VERSION\s+([0-9.]+)", _read("CMakeLists.txt")).group(1)
    header = _read("csrc/include/shadowkv/version.h")
    parts = [re.search(rf"#define SHADOWKV_VERSION_{p} (\d+)", header).group(1) for p in ("MAJOR", "MINOR", "PATCH")]
    string = re.search(r'#define SHADOWKV_VERSION_STRING "([^"]+)"', header).group(1)
    assert pyproject == cmake == ".".join(parts) == string == shadowkv.__version__
