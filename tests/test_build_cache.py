"""The JIT build cache (marthe_ext/_ext.py) is per user, private, and refuses folders or
libraries that another user owns or that anyone may write, with a clear error."""
import os
import stat

import pytest

from marthe_ext import _ext

pytestmark = pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX owners and modes")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "shared"))
    return tmp_path / "shared"


@pytest.fixture
def forced_jit(monkeypatch):
    """load_extension as on a machine with no installed build: it goes for the JIT cache.
    Any attempt to actually build fails the test."""
    def no_prebuilt(kind):
        raise ImportError("no installed build (test)")

    def no_build(*a, **k):
        raise AssertionError("a build was started in a refused cache")

    monkeypatch.setattr(_ext, "_import_prebuilt", no_prebuilt)
    monkeypatch.setattr(_ext, "_jit_preconditions", lambda kind: None)
    monkeypatch.setattr(_ext.subprocess, "run", no_build)
    for name in ("_modules", "_jit_modules", "_jit_failed", "_reasons"):
        monkeypatch.setattr(_ext, name, {})


def test_cache_is_per_user(cache, monkeypatch):
    assert _ext.cache_root() == cache / f"marthe_ext-{os.getuid()}"
    assert _ext.cache_dir("cpu").is_relative_to(_ext.cache_root())
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache / "xdg"))
    assert _ext.cache_root() == cache / "xdg" / f"marthe_ext-{os.getuid()}"


def test_new_cache_folders_are_private(cache):
    path = _ext.secure_cache_dir("cpu")
    assert path == _ext.cache_dir("cpu") and path.is_dir()
    level = path
    while level != cache:
        assert stat.S_IMODE(level.stat().st_mode) == 0o700, level
        level = level.parent
    assert _ext.secure_cache_dir("cpu") == path  # idempotent


def test_world_writable_cache_is_refused(cache, forced_jit):
    path = _ext.secure_cache_dir("cpu")
    path.parent.chmod(0o777)
    with pytest.raises(_ext.UnsafeCache, match="world-writable"):
        _ext.secure_cache_dir("cpu")
    with pytest.raises(_ext.ExtensionUnavailable,
                       match="refusing the JIT build cache.*world-writable.*backend='torch'"):
        _ext.load_extension("cpu", allow_jit=True)
    # fixed by the user, the next attempt in the same process goes ahead
    path.parent.chmod(0o700)
    with pytest.raises(AssertionError, match="build was started"):
        _ext.load_extension("cpu", allow_jit=True)


def test_cache_owned_by_another_user_is_refused(cache, forced_jit, monkeypatch):
    _ext.secure_cache_dir("cpu")
    me = os.getuid()
    monkeypatch.setattr(_ext, "_uid", lambda: me + 1)  # as seen by another user
    monkeypatch.setattr(_ext, "cache_root", lambda: cache / f"marthe_ext-{me}")
    with pytest.raises(_ext.UnsafeCache, match=f"owned by uid {me}, not by this user"):
        _ext.secure_cache_dir("cpu")
    with pytest.raises(_ext.ExtensionUnavailable, match="owned by uid"):
        _ext.load_extension("cpu", allow_jit=True)


def test_symlink_to_a_world_writable_folder_is_refused(cache, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    elsewhere.chmod(0o777)
    _ext.cache_root().mkdir(parents=True)
    _ext.cache_root().chmod(0o700)
    (_ext.cache_dir("cpu").parent).symlink_to(elsewhere)
    with pytest.raises(_ext.UnsafeCache, match="world-writable"):
        _ext.secure_cache_dir("cpu")


def test_planted_library_is_not_imported(cache):
    build = _ext.secure_cache_dir("cpu")
    lib = build / "planted.so"
    lib.write_bytes(b"\x7fELF not really")
    lib.chmod(0o666)
    with pytest.raises(_ext.UnsafeCache, match="world-writable"):
        _ext._import_built("planted", build)
