"""``nanoscout keys`` / :func:`create_keys`: a pair is never replaced without ``--overwrite``,
the secret key is never readable by others, and a bad folder is a one-line error (exit 2)."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from nanoscout.cli.main import main
from nanoscout.wire.errors import ConfigError
from nanoscout.wire.transport import create_keys

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_refuses_to_replace_a_pair(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    assert main(["keys", str(tmp_path)]) == 0
    secret = tmp_path / "nanoscout.key_secret"
    before = secret.read_bytes()
    capsys.readouterr()
    assert main(["keys", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nanoscout keys: error: ") and "--overwrite" in err
    assert "\n" not in err
    assert secret.read_bytes() == before
    # one file of the pair is enough to refuse
    (tmp_path / "nanoscout.key_secret").unlink()
    assert main(["keys", str(tmp_path)]) == 2
    assert not secret.exists()
    assert main(["keys", str(tmp_path), "--overwrite"]) == 0
    assert secret.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nanoscout.key",
                                                           "nanoscout.key_secret"]


def test_secret_key_is_never_readable_by_others(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The secret file is created 0600, not created with the umask's mode and chmod'ed later."""
    seen: list[tuple[str, int, int]] = []
    real_open = open

    def spy_open(file: object, *args: object, **kwargs: object) -> object:
        f = real_open(file, *args, **kwargs)  # type: ignore[call-overload]
        if str(file).endswith(".key_secret"):
            path = Path(str(file))
            seen.append((str(file), _mode(path), _mode(path.parent)))
        return f

    import builtins

    monkeypatch.setattr(builtins, "open", spy_open)
    old = os.umask(0o022)
    try:
        public, secret = create_keys(tmp_path / "k", "n")
    finally:
        os.umask(old)
        monkeypatch.undo()
    assert seen and all(mode == 0o600 for _, mode, _ in seen), seen
    # written in a folder that others cannot enter either
    assert all(folder_mode & 0o077 == 0 for _, _, folder_mode in seen), seen
    assert _mode(secret) == 0o600
    assert _mode(public) == 0o644
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["n.key", "n.key_secret"]


@pytest.mark.parametrize("make", [lambda d: d / "afile" / "sub", lambda d: d / "afile"])
def test_keys_bad_folder_is_one_line(tmp_path: Path, make: object,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("x")
    assert main(["keys", str(make(tmp_path))]) == 2  # type: ignore[operator]
    err = capsys.readouterr().err.strip()
    assert err.startswith("nanoscout keys: error: ") and "\n" not in err
    assert "afile" in err


def test_create_keys_refuses_a_path_as_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="plain file name"):
        create_keys(tmp_path, "../elsewhere")
