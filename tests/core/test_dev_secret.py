"""The generated development JWT secret (issue 12, lower list): created with mode 0600 from its
first byte, atomically, the same for every process that starts at once."""

from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from joyhub.core.config import Settings

pytestmark = pytest.mark.unit


@pytest.fixture
def open_umask() -> object:
    """umask 0: whatever mode the code asks for is the mode the file gets."""
    old = os.umask(0)
    yield None
    os.umask(old)


def test_the_secret_file_is_never_readable_by_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, open_umask: object
) -> None:
    """Even if the process dies right after writing (chmod failing stands for that), no file
    with looser permissions than 0600 is left behind."""

    def dying(*args: object, **kwargs: object) -> None:
        raise OSError("killed before chmod")

    monkeypatch.setattr(os, "chmod", dying)
    monkeypatch.setattr(Path, "chmod", dying)
    settings = Settings(_env_file=None, data_dir=tmp_path / "d")  # type: ignore[call-arg]
    try:
        secret = settings.secret_key()
    except OSError:
        secret = None
    for path in (tmp_path / "d").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert secret is not None and len(secret) >= 32
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["jwt_secret"]  # no temporary left


def test_processes_starting_at_once_share_one_secret(tmp_path: Path) -> None:
    data = tmp_path / "d"

    def read() -> str:
        return Settings(_env_file=None, data_dir=data).secret_key()  # type: ignore[call-arg]

    with ThreadPoolExecutor(8) as pool:
        secrets = set(pool.map(lambda _: read(), range(16)))
    assert len(secrets) == 1
    assert stat.S_IMODE((data / "jwt_secret").stat().st_mode) == 0o600
