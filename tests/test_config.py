"""engine/config.py: load order and provenance, every kind of error (message asserted), the shipped file."""

import dataclasses
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from nextn import config, default_model
from nextn.errors import ConfigError

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "nextn.toml"


@pytest.fixture
def etc(tmp_path, monkeypatch):
    d = tmp_path / "etc"
    (d / "conf.d").mkdir(parents=True)
    monkeypatch.setenv("NEXTN_CONFIG_DIR", str(d))
    return d


def without_default_model(cfg):
    """cfg with model.path back at "" where load() filled in the embedded default model."""
    if cfg.sources.get("model.path") != default_model.SOURCE:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=""))


def test_defaults_without_files(etc):
    cfg = config.load()
    # no model configured: the embedded default model (issue 13)
    assert cfg.model.path == str(default_model.path()) and cfg.sources["model.path"] == default_model.SOURCE
    assert without_default_model(cfg) == config.Config()
    assert cfg.server.parallel == 4 and cfg.server.socket_mode == "0660" and cfg.log.level == "info"
    assert {v for k, v in cfg.sources.items() if k != "model.path"} == {"default"}


def test_shipped_file_documents_every_key_commented_out_at_its_default(etc):
    """Issue 14 item 14: the shipped nextn.toml states no value of its own (upgrades replace it: no .pacnew,
    no stale renamed key), and documents every key as `# key = default` under its doc line."""
    cfg = config.load(SHIPPED, system=False)
    assert without_default_model(cfg) == config.Config()
    assert all(not v for v in tomllib.loads(SHIPPED.read_text()).values()), "a key is set, not commented out"
    text = SHIPPED.read_text().splitlines()
    section = None
    found = {}
    for n, line in enumerate(text):
        if line.startswith("["):
            section = line.strip("[]")
        elif m := re.match(r"^# ([a-z0-9_]+) = (.*)$", line):
            found[f"{section}.{m.group(1)}"] = (n, m.group(2))
    for dotted, f in config.iter_fields():
        assert dotted in found, f"{dotted} missing from config/nextn.toml"
        n, value = found[dotted]
        assert tomllib.loads(f"v = {value}")["v"] == f.default, f"{dotted}: shown default {value} is not {f.default!r}"
        assert text[n - 1].startswith("#") and not re.match(r"^# [a-z0-9_]+ = ", text[n - 1]), f"{dotted}: no doc line"
        if f.metadata["flag"]:
            assert f.metadata["flag"] in text[n - 1], f"{dotted}: comment does not name {f.metadata['flag']}"


def test_shipped_model_drop_in_loads_after_the_main_file(etc):
    shipped_dropin = SHIPPED.parent / "conf.d" / "50-model.toml"
    (etc / "nextn.toml").write_text(SHIPPED.read_text())
    (etc / "conf.d" / "50-model.toml").write_text(shipped_dropin.read_text().replace('path = ""', 'path = "/m.gguf"'))
    cfg = config.load()
    assert cfg.model.path == "/m.gguf" and "conf.d/50-model.toml" in cfg.sources["model.path"]


def test_load_order_and_provenance(etc, tmp_path):
    (etc / "nextn.toml").write_text("[server]\nparallel = 2\nmax_queue = 5\n[log]\nlevel = 'debug'\n")
    (etc / "conf.d" / "20-b.toml").write_text("[server]\nmax_queue = 7\n")
    (etc / "conf.d" / "10-a.toml").write_text("[server]\nmax_queue = 6\n\n[model]\nctx_size = 128\n")
    (etc / "conf.d" / "ignored.txt").write_text("[server]\nmax_queue = 99\n")
    user = tmp_path / "user.toml"
    user.write_text("[model]\nctx_size = 256\nbatch_size = 32\n")
    cfg = config.load(user, {"model.batch_size": (64, "--batch-size")})
    assert cfg.server.parallel == 2 and cfg.server.max_queue == 7  # conf.d sorted: 20-b after 10-a
    assert cfg.model.ctx_size == 256 and cfg.model.batch_size == 64 and cfg.log.level == "debug"
    assert cfg.sources["server.parallel"] == f"{etc / 'nextn.toml'}:2"
    assert cfg.sources["server.max_queue"] == f"{etc / 'conf.d' / '20-b.toml'}:2"
    assert cfg.sources["model.ctx_size"] == f"{user}:2"
    assert cfg.sources["model.batch_size"] == "--batch-size"
    assert cfg.sources["sampling.top_k"] == "default"
    shown = config.show(cfg)
    assert re.search(r"^ctx_size = 256 +# .*user\.toml:2$", shown, re.MULTILINE)
    assert re.search(r"^batch_size = 64 +# --batch-size$", shown, re.MULTILINE)
    assert re.search(r'^level = "debug" +# .*nextn\.toml:5$', shown, re.MULTILINE)


def test_system_file_given_as_config_is_read_once_so_drop_ins_still_win(etc):
    """nextn.service runs `nextn serve --config /etc/nextn/nextn.toml`: conf.d must still override it."""
    (etc / "nextn.toml").write_text("[model]\nctx_size = 1024\n")
    (etc / "conf.d" / "10-local.toml").write_text("[model]\nctx_size = 2048\n")
    cfg = config.load(etc / "nextn.toml")
    assert cfg.model.ctx_size == 2048
    assert cfg.sources["model.ctx_size"] == f"{etc / 'conf.d' / '10-local.toml'}:2"


def test_int_is_accepted_for_float_key(etc, tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[server]\ndrain_timeout = 5\n")
    cfg = config.load(f)
    assert cfg.server.drain_timeout == 5.0 and isinstance(cfg.server.drain_timeout, float)


@pytest.mark.parametrize(
    "body, message",
    [
        ("[server]\nparalel = 2\n", r"c\.toml:2: unknown key server\.paralel \(did you mean 'parallel'\?\)"),
        ("[sever]\nparallel = 2\n", r"c\.toml:1: unknown section \[sever\] \(did you mean 'server'\?\)"),
        ("[server]\nparallel = 'four'\n", r"c\.toml:2: server\.parallel = 'four' is invalid: allowed an integer"),
        ("[server]\nparallel = 0\n", r"c\.toml:2: server\.parallel = 0 is invalid: allowed a value 1 \.\. 64"),
        ("[server]\nparallel = true\n", r"server\.parallel = True is invalid: allowed an integer"),
        ("\n[log]\nlevel = 'loud'\n", r"c\.toml:3: log\.level = 'loud' is invalid: allowed one of 'debug', 'info'"),
        ("[sampling]\ntop_p = 1.5\n", r"sampling\.top_p = 1\.5 is invalid: allowed a value 0\.0 \.\. 1\.0"),
        ("[model]\nctx_size = -1\n", r"model\.ctx_size = -1 is invalid: allowed a value >= 0"),
        ("[model]\npath = 3\n", r"model\.path = 3 is invalid: allowed a string"),
        ("[server]\nsocket_mode = '0999'\n", r"server\.socket_mode = '0999' is invalid: allowed octal"),
        ("[server]\ntcp = 'localhost'\n", r"server\.tcp = 'localhost' is invalid: allowed '' or HOST:PORT"),
        ("[server\nparallel = 2\n", r"c\.toml: invalid TOML: .*line 1"),
        ("server = 3\n", r"server must be a \[server\] table"),
    ],
)
def test_errors_name_file_line_key_value_and_allowed(etc, tmp_path, body, message):
    f = tmp_path / "c.toml"
    f.write_text(body)
    with pytest.raises(ConfigError, match=message):
        config.load(f)


def test_error_in_system_dir_names_that_file(etc):
    (etc / "conf.d" / "50-x.toml").write_text("[limits]\nmax_tokens = 0\n")
    with pytest.raises(ConfigError, match=r"conf\.d/50-x\.toml:2: limits\.max_tokens = 0"):
        config.load()


def test_missing_config_file_and_bad_override(etc, tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.toml: no such config file"):
        config.load(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=r"--parallel: server\.parallel = 0 is invalid"):
        config.load(None, {"server.parallel": (0, "--parallel")})


def test_config_is_frozen(etc):
    cfg = config.load()
    with pytest.raises(AttributeError):
        cfg.server.parallel = 3


def _nextn(*args, env=None):
    return subprocess.run([sys.executable, "-m", "nextn", *map(str, args)], capture_output=True, text=True,
                          timeout=60, env=env)


def test_cli_config_show_and_check(etc, tmp_path, monkeypatch):
    import os

    env = dict(os.environ, NEXTN_CONFIG_DIR=str(etc))
    (etc / "nextn.toml").write_text("[server]\nparallel = 3\n")
    r = _nextn("config", "show", "-c", 512, env=env)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^parallel = 3 +# .*nextn\.toml:2$", r.stdout, re.MULTILINE)
    assert re.search(r"^ctx_size = 512 +# --ctx-size$", r.stdout, re.MULTILINE)
    good = tmp_path / "good.toml"
    good.write_text("[log]\nlevel = 'error'\n")
    r = _nextn("config", "check", good, env=env)
    assert r.returncode == 0 and "ok" in r.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[log]\nlevl = 'error'\n")
    r = _nextn("config", "check", bad, env=env)
    assert r.returncode == 78
    assert "bad.toml:2: unknown key log.levl (did you mean 'level'?)" in r.stderr
    r = _nextn("config", "check", SHIPPED, env=env)
    assert r.returncode == 0, r.stderr
