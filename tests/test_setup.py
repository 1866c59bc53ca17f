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
    cache, checks = tmp_path / "CMakeCache.txt", tmp_path / "CMakeFiles" / "4.4.5"
    obj = tmp_path / "CMakeFiles" / "_C.dir" / "bindings.cpp.o"

    def configure(key, succeeds=True):
        """setup.py's sequence; whether the last configure's cache and compiler checks were kept."""
        stamp = configured_for(tmp_path, key)
        kept = cache.exists(), checks.exists()
        cache.write_text(key)  # a configure writes its cache, failed or not
        checks.mkdir(parents=True, exist_ok=True)
        obj.parent.mkdir(parents=True, exist_ok=True)
        obj.touch()
        if succeeds:
            stamp.write_text(key)
        return kept

    assert configure("venv-a") == (False, False)  # nothing there yet
    assert configure("venv-a") == (True, True)  # the same venv and tools: kept
    assert configure("venv-b", succeeds=False) == (False, False)  # another one: CMake looks again...
    assert configure("venv-a") == (False, False)  # ...and its failure does not pass for venv-a's cache
    obj.write_text("compiled")
    (tmp_path / "shadowkv-configured-for.txt").unlink()
    assert configure("venv-a") == (False, False)  # a cache of unknown origin (from before the stamp)
    assert obj.read_text() == "compiled"  # the objects stay: unchanged compile commands are not rebuilt
