"""The embedded default model (issue 13): nextn-stdlib-qwen35-mtp.gguf ships as package data, loads, is what
`nextn generate` runs without -m, drafts with its MTP block without changing greedy output, and the engine's
logits on it are the torch forward's of the same weights (tools/train/model.py, the forward it was trained
with; skipped without torch, a development-only dependency)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

import nextn
from nextn import default_model
from nextn.gguf.metadata import read_metadata
from nextn.runner import ModelRunner

TRAIN_DIR = Path(__file__).resolve().parent.parent / "tools" / "train"
# Python the model never saw (written for this test, not from the standard library)
SOURCE = '''import os


def count_lines(path, skip_blank=True):
    """Return the number of lines in the file at path."""
    total = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if skip_blank and not line.strip():
                continue
            total += 1
    return total


class Counter:
    def __init__(self, name):
        self.name = name
        self.count = 0

    def add(self, n=1):
        self.count += n
        return self.count
'''


def spread_error(got, want):
    return float((np.abs(got - want) / want.std(axis=-1, keepdims=True)).max())


def clear_argmax_agrees(got, want, margin):
    """Rows whose top-2 gap in `want` is above margin (in units of the row's spread) have the same argmax."""
    top2 = np.sort(want, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > margin * want.std(axis=-1)
    return bool((got.argmax(-1)[clear] == want.argmax(-1)[clear]).all()), int(clear.sum())


def run_nextn(*args):
    return subprocess.run([sys.executable, "-m", "nextn", *args], capture_output=True, text=True, timeout=300,
                          check=False)


def test_shipped_small_and_a_qwen35_with_mtp():
    path = default_model.path()
    assert path.is_file(), f"{path} missing: the package ships it (setup.py package_data data/*)"
    assert path.stat().st_size <= 30_000_000
    meta = read_metadata(str(path))
    assert meta["general.architecture"] == "qwen35" and meta["qwen35.nextn_predict_layers"] == 1
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "qwen2"
    assert 4096 <= len(meta["tokenizer.ggml.tokens"]) <= 16384


def test_the_package_ships_it():
    """setup.py's package_data takes nextn/data/* (the wheel, so the Arch package, installs it)."""
    assert default_model.path().relative_to(Path(nextn.__file__).resolve().parent) == Path("data", default_model.NAME)
    setup = (Path(__file__).resolve().parent.parent / "setup.py").read_text()
    assert '"data/*"' in setup


def test_engine_logits_match_the_torch_forward(rt):
    try:
        import torch
    except ImportError:
        pytest.skip("torch is not installed (a development dependency: pip install torch==2.13.0); "
                    "the numpy reference tests cover the engine's qwen35 math without it")
    if not (TRAIN_DIR / "model.py").is_file():
        pytest.skip(f"{TRAIN_DIR} is not here (the Arch package's check() runs the tests without tools/)")
    sys.path.insert(0, str(TRAIN_DIR))
    try:
        from model import from_gguf
    finally:
        sys.path.remove(str(TRAIN_DIR))
    path = default_model.path()
    model = from_gguf(path)
    runner = ModelRunner(path, rt=rt, n_ctx=256, n_batch=64, mtp=True)
    ids = runner.tokenizer.encode(SOURCE, add_special=False)[:64]  # one step's outputs
    n = len(ids)
    assert n == 64
    _, logits = runner.eval(0, ids, 0, all_logits=True)
    with torch.no_grad():
        h, want = model.trunk(torch.tensor([ids]))
    want = want[0].double().numpy()
    assert spread_error(logits, want) < 1e-2
    ok, clear = clear_argmax_agrees(logits, want, 1e-2)
    assert ok and clear > n // 2

    # the MTP block over the prompt (token p with the trunk's h of p - 1), then a draft step fed its own output
    mtop, mlogits = runner.mtp_step(ids, np.arange(n, dtype=np.int32), [0] * n, [-1] + list(range(n - 1)),
                                    list(range(n)), want_logits=True)
    draft = int(mtop[-1])
    _, mlogits2 = runner.mtp_step([draft], np.array([n], np.int32), [0], [n - 1], [0], source="mtp",
                                  want_logits=True)
    with torch.no_grad():
        tokens = torch.tensor([ids + [draft]])
        h1 = torch.cat([h, torch.zeros_like(h[:, :1])], dim=1)
        keep = []
        m1 = model.mtp_hidden(tokens, h1, keep=keep)
        m2 = model.mtp_hidden(tokens, m1, kv_prev=keep[0])
        head = model.w("output.weight")
        want1 = (m1 @ head.T)[0, :n].double().numpy()
        want2 = (m2 @ head.T)[0, n:].double().numpy()
    assert spread_error(mlogits, want1) < 1e-2
    assert clear_argmax_agrees(mlogits, want1, 1e-2)[0]
    assert spread_error(mlogits2, want2) < 1e-2


def test_generate_without_a_model_runs_the_default_and_says_so():
    r = run_nextn("generate", "-p", "def ", "-n", "16")
    assert r.returncode == 0, r.stderr
    first = r.stderr.splitlines()[0]
    assert "embedded default model" in first and str(default_model.path()) in first
    # a prompt ending in a space (its last token a lone " ") still gets a function name and its arguments:
    # the training text was cut at such places (tools/train/train.py encode_with_cuts)
    assert re.match(r"[A-Za-z_]\w*\(", r.stdout), r.stdout
    t = run_nextn("tokenize", "def ")
    assert t.returncode == 0 and json.loads(t.stdout) == [314, 220], t.stdout + t.stderr  # "def", " "


def test_greedy_output_is_the_same_with_mtp_drafts():
    prompt = SOURCE[:200]
    plain = run_nextn("generate", "-p", prompt, "-n", "48")
    for n_max in ("1", "3"):
        spec = run_nextn("generate", "-p", prompt, "-n", "48", "--spec-type", "draft-mtp", "--spec-draft-n-max", n_max)
        assert plain.returncode == 0 and spec.returncode == 0, plain.stderr + spec.stderr
        assert spec.stdout == plain.stdout
        assert "draft-mtp: drafted" in spec.stderr and "accepted 0 " not in spec.stderr


def test_serve_without_a_model_answers_completions_with_it():
    d = Path(tempfile.mkdtemp(prefix="nx", dir="/tmp"))  # Unix socket paths are limited to 108 bytes
    sock = d / "s.sock"
    env = dict(os.environ, NEXTN_CONFIG_DIR=str(d))  # no system configuration: no model configured
    p = subprocess.Popen([sys.executable, "-m", "nextn", "serve", "--socket", str(sock), "--spec-type", "draft-mtp"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        client = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://nextn", timeout=60)
        deadline = time.time() + 180
        while True:
            assert p.poll() is None, p.stderr.read()
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not become ready"
            time.sleep(0.1)
        r = client.post("/v1/completions", json={"prompt": "def ", "max_tokens": 16, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == default_model.NAME and body["usage"]["completion_tokens"] > 0
    finally:
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
        shutil.rmtree(d, ignore_errors=True)
    first = err.splitlines()[0]
    assert "embedded default model" in first, err
