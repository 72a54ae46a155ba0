"""The default socket's directory is private (issue 14 item 4): created 0700, and one that another local user
made first (or made writable to others, or a symlink) is refused, as ssh-agent and gpg-agent refuse theirs."""

import os
import subprocess
import sys

import pytest

from nextn.errors import ConfigError
from nextn.server.app import private_dir


def test_created_private(tmp_path):
    private_dir(tmp_path / "nextn-1000" / "nextn", tmp_path)
    for d in (tmp_path / "nextn-1000", tmp_path / "nextn-1000" / "nextn"):
        assert d.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("attack", ["world-writable", "symlink", "other owner"])
def test_a_directory_someone_else_controls_is_refused(tmp_path, attack):
    d = tmp_path / "nextn-1000"
    if attack == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        d.symlink_to(tmp_path / "elsewhere")
    else:
        d.mkdir(mode=0o700)
        if attack == "world-writable":
            os.chmod(d, 0o777)
        else:
            if os.getuid() != 0:
                pytest.skip("needs root to give the directory to another user (CI runs as root)")
            os.chown(d, 65534, 65534)
    with pytest.raises(ConfigError, match="not a private directory of this user"):
        private_dir(d / "nextn", tmp_path)


def test_serve_refuses_before_loading_anything(tmp_path):
    """`nextn serve` with the default socket under a runtime directory whose nextn/ is open to everyone:
    one line, the configuration exit code, no traceback."""
    (tmp_path / "nextn").mkdir()
    os.chmod(tmp_path / "nextn", 0o777)
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "INVOCATION_ID", "LISTEN_FDS")}
    env.update(XDG_RUNTIME_DIR=str(tmp_path), NEXTN_CONFIG_DIR=str(tmp_path / "etc"))
    r = subprocess.run([sys.executable, "-m", "nextn", "serve", "--model", str(tmp_path / "none.gguf")],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == ConfigError.exit_code, r.stderr
    assert "not a private directory" in r.stderr and "Traceback" not in r.stderr
