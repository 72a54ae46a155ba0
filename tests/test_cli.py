"""The `nextn` command line, run as a user would: a subprocess per command."""

import json
import subprocess
import sys

import pytest

from nextn.devtools.tiny import make_tiny


def nextn(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "nextn", *map(str, args)], capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("cli") / "m.gguf", arch="qwen3", qtype="Q8_0", seed=3)


def test_generate_prints_text_then_speeds(model):
    r = nextn("generate", "-m", model, "-p", "hello there", "-n", 12, "--ignore-eos")
    assert r.stdout.strip()
    assert "prompt:" in r.stderr and "decode: 12 tokens" in r.stderr and "tok/s" in r.stderr


def test_generate_greedy_is_deterministic_and_seeded_sampling_reproduces(model):
    a = nextn("generate", "-m", model, "-p", "abc", "-n", 10, "--ignore-eos").stdout
    b = nextn("generate", "-m", model, "-p", "abc", "-n", 10, "--ignore-eos").stdout
    assert a == b
    s1 = nextn("generate", "-m", model, "-p", "abc", "-n", 10, "--temp", "1", "--seed", "5", "--ignore-eos").stdout
    s2 = nextn("generate", "-m", model, "-p", "abc", "-n", 10, "--temp", "1", "--seed", "5", "--ignore-eos").stdout
    assert s1 == s2


def test_tokenize_prints_json_ids(model):
    ids = json.loads(nextn("tokenize", "-m", model, "the cat").stdout)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids) and ids
    # special tokens written in the text become their ids by default, as llama-tokenize does
    special = json.loads(nextn("tokenize", "-m", model, "<|im_start|>", "--no-bos").stdout)
    assert len(special) == 1
    as_text = json.loads(nextn("tokenize", "-m", model, "<|im_start|>", "--no-bos", "--no-parse-special").stdout)
    assert len(as_text) > 1


def test_generate_parses_special_tokens_in_the_prompt_as_llama_cli(model):
    parsed = nextn("generate", "-m", model, "-p", "<|im_start|>user", "-n", 2, "--ignore-eos").stderr
    as_text = nextn("generate", "-m", model, "-p", "<|im_start|>user", "-n", 2, "--ignore-eos",
                    "--no-parse-special").stderr
    n_parsed = int(parsed.split("prompt: ")[1].split()[0])
    n_text = int(as_text.split("prompt: ")[1].split()[0])
    assert n_parsed < n_text


def test_generate_takes_the_speculative_flags(model):
    """`nextn generate --spec-type ...` as `nextn serve`: same output as without, drafted/accepted on stderr."""
    plain = nextn("generate", "-m", model, "-p", "abc abc abc abc", "-n", 24, "--ignore-eos")
    spec = nextn("generate", "-m", model, "-p", "abc abc abc abc", "-n", 24, "--ignore-eos", "--spec-type",
                 "ngram-simple", "--spec-ngram-simple-size-n", "1", "--spec-draft-n-max", "3")
    assert spec.stdout == plain.stdout
    assert "ngram-simple: drafted" in spec.stderr and "accepted" in spec.stderr
    bad = nextn("generate", "-m", model, "-p", "x", "--spec-type", "nonsense", check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "nonsense" in bad.stderr


def test_inspect_reports_arch_types_and_memory(model):
    out = nextn("inspect", model).stdout
    assert "architecture: qwen3" in out and "Q8_0" in out and "weights" in out and "kv_cache" in out
    js = json.loads(nextn("inspect", model, "--json").stdout)
    assert js["architecture"] == "qwen3" and js["memory_bytes"]["total"] > js["memory_bytes"]["weights"] > 0


def test_make_tiny_command(tmp_path):
    out = tmp_path / "t.gguf"
    nextn("make-tiny", out, "--arch", "llama", "--type", "Q4_K", "--n-embd", 256, "--head-dim", 64, "--n-ff", 512, "--seed", 2)
    assert "llama" in nextn("inspect", out).stdout


def test_make_tiny_refuses_bad_block_multiple(tmp_path):
    r = nextn("make-tiny", tmp_path / "t.gguf", "--type", "Q4_K", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "Q4_K" in r.stderr and "256" in r.stderr and "not a multiple" in r.stderr


def test_missing_model_is_one_line_error(tmp_path):
    r = nextn("generate", "-m", tmp_path / "none.gguf", "-p", "x", check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "no such file" in r.stderr


def test_inspect_reports_the_mtp_block_and_its_memory(tmp_path):
    path = make_tiny(tmp_path / "mtp.gguf", arch="qwen35", qtype="Q8_0", mtp=True)
    out = nextn("inspect", path).stdout
    assert "architecture: qwen35" in out and "recurrent_state" in out
    assert "MTP block:    layer 4" in out and "shares the trunk's embedding and head" in out
    js = json.loads(nextn("inspect", path, "--json").stdout)
    m = js["mtp"]["memory_bytes"]
    assert m["weights"] > 0 and m["kv_cache"] > 0 and m["total"] == m["weights"] + m["kv_cache"] + m["activations"]
    assert "mtp_weights" not in js["memory_bytes"]  # a plain load does not spend it
    plain = make_tiny(tmp_path / "plain.gguf", arch="qwen35", qtype="Q8_0")
    assert json.loads(nextn("inspect", plain, "--json").stdout)["mtp"] is None
    assert "MTP block:    none" in nextn("inspect", plain).stdout


def test_version_help_and_flag_names():
    """`nextn --version`; `make-tiny --help` works; help shows value names, not argparse's CFG:SECTION.KEY."""
    assert nextn("--version").stdout.startswith("nextn ")
    assert "--arch" in nextn("make-tiny", "--help").stdout
    assert "CFG:" not in nextn("serve", "--help").stdout and "--ctx-size CTX_SIZE" in nextn("serve", "--help").stdout
    bad = nextn("tokenize", "-m", "x.gguf", "text", "--bogus", check=False)
    assert bad.returncode == 2 and "unrecognized arguments: --bogus" in bad.stderr


def test_clients_look_for_the_packaged_service_socket_too(tmp_path):
    """Without --socket, nextn chat / complete try the user's `nextn serve` socket, then the packaged
    service's /run/nextn/nextn.sock, and say which they tried when none answers."""
    import os

    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
    env.pop("NOTIFY_SOCKET", None)
    env.pop("INVOCATION_ID", None)  # not "under systemd": the user socket is the first choice
    r = subprocess.run([sys.executable, "-m", "nextn", "complete", "x"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert str(tmp_path / "nextn" / "nextn.sock") in r.stderr and "/run/nextn/nextn.sock" in r.stderr
