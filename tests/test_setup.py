"""setup.py's reuse of build/cmake-<tag>/ across venvs (the CMake cache keeps absolute paths)."""

import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def configured_for(monkeypatch):
    if not (ROOT / "setup.py").exists():
        pytest.skip("no setup.py (tests run outside a checkout)")
    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: None)  # load setup.py's helpers only
    return runpy.run_path(str(ROOT / "setup.py"))["_configured_for"]


def test_a_cache_configured_elsewhere_is_dropped(configured_for, tmp_path):
    """A venv deleted after it configured the build folder made every later build fail in
    project() (its ninja gone), and with both venvs present _C linked the first one's torch."""
    def configure(key):
        stamp = configured_for(tmp_path, key)
        kept = (tmp_path / "CMakeCache.txt").exists()
        (tmp_path / "CMakeCache.txt").write_text("CMAKE_MAKE_PROGRAM:FILEPATH=/venv/bin/ninja\n")
        (tmp_path / "CMakeFiles").mkdir(exist_ok=True)
        (tmp_path / "build.ninja").write_text("objects stay\n")
        stamp.write_text(key)  # as setup.py does after a configure that succeeded
        return kept

    assert not configure("venv-a\n")  # nothing there yet
    assert configure("venv-a\n")  # the same venv and tools: the cache is kept
    assert not configure("venv-b\n")  # another one: CMake looks for everything again
    assert (tmp_path / "build.ninja").exists()  # the objects and their build log stay
    (tmp_path / "shadowkv-configured-for.txt").unlink()
    assert not configure("venv-b\n")  # a cache of unknown origin (before the stamp existed)
