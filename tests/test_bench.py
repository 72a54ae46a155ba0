"""`nextn bench throughput | spec | parallel` on tiny models (fast: a few seconds each): the shape of the
tables and the JSON, accepted <= drafted, rates in [0, 1], every ratio computed from the same run's numbers,
the --config parser's errors, and --compare-llama-server against a fake llama-server (a small HTTP server
started as the binary would be). The old `nextn bench` and `nextn bench --spec` still run."""

import json
import os
import re
import shutil
import stat
import sys
import threading

import pytest

from nextn.cli import main
from nextn.devtools.bench import configs as bc
from nextn.devtools.bench.llama_server import LlamaClient, find_binary, parse_timings
from nextn.devtools.tiny import make_tiny
from nextn.errors import NextnError


@pytest.fixture(scope="module")
def mtp_model(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("bench") / "q35.gguf", arch="qwen35", qtype="Q8_0", seed=1, mtp=True)


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("bench") / "q3.gguf", arch="qwen3", qtype="Q8_0", seed=2)


def bench(capsys, *argv):
    rc = main(["bench", *map(str, argv), "--no-progress"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


def close(a, b):
    return a == pytest.approx(b, rel=1e-12)


# ---- the --config syntax


def test_config_syntax():
    labels = [c.label for t in ("none", "draft-mtp", "draft-mtp:n_max=1..3,adaptive=off", "ngram-mod,draft-mtp:n_max=2/4",
                                "draft-mtp:n_max=2,synth_rates=0.9/0.5") for c in bc.parse_config(t)]
    assert labels == ["none", "draft-mtp", "draft-mtp:n_max=1,adaptive=off", "draft-mtp:n_max=2,adaptive=off",
                      "draft-mtp:n_max=3,adaptive=off", "ngram-mod,draft-mtp:n_max=2", "ngram-mod,draft-mtp:n_max=4",
                      "draft-mtp:n_max=2,synth_rates=0.9/0.5"]
    c = bc.parse_config("ngram-mod,draft-mtp:n_max=2,adaptive=off,ngram_mod_n_match=8")[0]
    spec = c.spec(bc.SpecConfig())
    assert spec.types == ("ngram-mod", "draft-mtp") and spec.n_max == 2 and not spec.adaptive
    assert spec.ngram.ngram_mod_n_match == 8
    # llama-server gets the same settings as flags, less the ones it has no flag for (adaptive)
    assert c.llama_server_args() == ["--spec-type", "ngram-mod,draft-mtp", "--spec-draft-n-max", "2",
                                     "--spec-ngram-mod-n-match", "8"]
    assert c.llama_server_ignores() == ["adaptive"]
    assert bc.parse_config("draft-mtp:n_max=2,synth_rates=0.9/0.5")[0].llama_server_args()[-2:] == [
        "--spec-synth-rates", "0.9,0.5"]
    # draft_vocab is a load setting (a runner of its own), not a scheduler one, and llama-server has no flag
    c = bc.parse_config("draft-mtp:n_max=3,draft_vocab=32768")[0]
    assert c.load_settings() == (("speculative.draft_vocab", 32768),)
    assert c.spec(bc.SpecConfig()).n_max == 3 and c.llama_server_ignores() == ["draft_vocab"]
    # none comes first, added when not given
    assert [c.label for c in bc.parse_configs(["draft-mtp", "none"])] == ["none", "draft-mtp"]
    assert [c.label for c in bc.parse_configs(None)] == ["none"]


@pytest.mark.parametrize("text, message", [
    ("", "empty configuration"),
    ("n_max=3", "the speculative types come first"),
    ("draft-mtx", "unknown speculative type(s) draft-mtx"),
    ("none,draft-mtp", "cannot be combined"),
    ("draft-mtp:", "nothing after ':'"),
    ("draft-mtp:n_max", "expected KEY=VALUE"),
    ("draft-mtp:n_mx=3", "did you mean n_max?"),
    ("draft-mtp:n_max=x", "expected an integer"),
    ("draft-mtp:n_max=64", "out of range [0, 63]"),
    ("draft-mtp:n_max=4..2", "empty range"),
    ("draft-mtp:n_max=2,n_max=3", "n_max given twice"),
    ("draft-mtp:p_min=1.5", "out of range [0.0, 1.0]"),
    ("draft-mtp:adaptive=maybe", "expected on or off"),
    ("draft-mtp:synth_rates=0.5/x", "expected a number"),
    ("none:n_max=2", "'none' takes no settings"),
    ("draft-mtp:draft_vocab=-1", "out of range"),
])
def test_config_errors(text, message):
    with pytest.raises(ValueError) as e:
        bc.parse_config(text)
    assert message in str(e.value)


@pytest.mark.parametrize("texts, message", [
    (["draft-mtp:n_min=3,n_max=2"], "draft_n_min <= draft_n_max"),
    (["draft-mtp:n_max=3,synth_rates=0.5/0.5"], "must contain 3 values"),
    (["draft-simple"], "needs a draft model"),
    (["draft-mtp:n_max=2", "draft-mtp:n_max=1..2"], "draft-mtp:n_max=2 given twice"),
])
def test_config_errors_checked_as_serve_would(texts, message):
    with pytest.raises(NextnError) as e:
        bc.parse_configs(texts)
    assert message in str(e.value)


def test_config_error_from_the_command_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "spec", "--config", "draft-mtp:n_mx=3"])
    assert e.value.code == 2
    assert "argument --config: unknown key 'n_mx'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "throughput", "--depth", "0,x"])
    assert "argument -d/--depth: expected comma-separated integers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "spec", "--prompts", "code_python,haiku"])
    assert "unknown prompt(s) haiku" in capsys.readouterr().err


# ---- the subcommands


def test_throughput(capsys, tmp_path, mtp_model):
    out = bench(capsys, "throughput", "-m", mtp_model, "-p", "16,32", "-n", 8, "-d", "0,24", "-r", 2,
                "--config", "draft-mtp:n_max=2,adaptive=off", "--json", tmp_path / "t.json")
    doc = json.loads((tmp_path / "t.json").read_text())
    assert doc["kind"] == "throughput" and doc["nextn_bench"] == 1 and doc["model"]["arch"] == "qwen35"
    tests = ["pp16", "pp32", "tg8", "tg8 @ d24"]
    assert [(r["test"], r["config"]) for r in doc["results"]] == [
        (t, c) for t in tests for c in ("none", "draft-mtp:n_max=2,adaptive=off")]
    none = {r["test"]: r for r in doc["results"] if r["config"] == "none"}
    for r in doc["results"]:
        s = r["tok_s"]
        assert s["n"] == 2 and len(s["values"]) == 2 and s["min"] <= s["median"] <= s["max"] and s["min"] > 0
        assert close(r["vs_none"], s["median"] / none[r["test"]]["tok_s"]["median"])
    assert [r["depth"] for r in doc["results"]] == [0, 0, 0, 0, 0, 0, 24, 24]
    # the table: a header, a separator, one row per (test, configuration)
    lines = [ln for ln in out.splitlines() if ln.startswith("|")]
    assert [c.strip() for c in lines[0].split("|")[1:-1]] == ["model", "size", "params", "config", "test", "t/s",
                                                              "min", "max", "vs none"]
    assert re.match(r"\| -+ \|", lines[1]) and len(lines) == 2 + 8
    assert "tg8 @ d24" in lines[-1] and doc["llama_server"] == {}


def _check_spec_doc(doc, prompts, n_predict):
    assert doc["kind"] == "spec"
    none = doc["results"][0]
    assert none["config"] == "none" and none["n_max"] == 0
    for e in doc["results"]:
        assert [r["name"] for r in e["prompts"]] == prompts
        for r in e["prompts"]:
            assert 1 <= r["pred"] <= n_predict and 0 <= r["acc"] <= r["draft"]
            assert (r["rate"] is None) == (r["draft"] == 0)
            assert r["rate"] is None or (0.0 <= r["rate"] <= 1.0 and close(r["rate"], r["acc"] / r["draft"]))
            assert r["tok_s"] > 0
        a = e["aggregate"]
        assert a["n_requests"] == len(prompts)
        assert a["total_predicted"] == sum(r["pred"] for r in e["prompts"])
        assert a["total_draft"] == sum(r["draft"] for r in e["prompts"])
        assert a["total_draft_accepted"] == sum(r["acc"] for r in e["prompts"]) <= a["total_draft"]
        assert a["aggregate_accept_rate"] is None or 0.0 <= a["aggregate_accept_rate"] <= 1.0
        # the aggregate speed and the speed-up come from this run's own numbers
        assert close(a["tok_s"], a["decode_steps"] / a["decode_s"])
        assert a["decode_steps"] == sum(r["pred"] - 1 for r in e["prompts"])
        assert close(e["speedup_vs_none"], a["tok_s"] / none["aggregate"]["tok_s"])
    assert none["aggregate"]["total_draft"] == 0 and none["speedup_vs_none"] == 1.0


def test_spec(capsys, tmp_path, mtp_model):
    prompts = ["code_python", "translation", "summarize"]
    out = bench(capsys, "spec", "-m", mtp_model, "--prompts", ",".join(prompts), "-n", 12,
                "--config", "draft-mtp:n_max=1..2,adaptive=off", "--config", "ngram-simple:ngram_simple_size_n=2",
                "--json", tmp_path / "s.json")
    doc = json.loads((tmp_path / "s.json").read_text())
    assert [e["config"] for e in doc["results"]] == [
        "none", "draft-mtp:n_max=1,adaptive=off", "draft-mtp:n_max=2,adaptive=off", "ngram-simple:ngram_simple_size_n=2"]
    assert [e["n_max"] for e in doc["results"]] == [0, 1, 2, 3]
    _check_spec_doc(doc, prompts, 12)
    mtp = doc["results"][2]
    assert mtp["aggregate"]["total_draft"] > 0  # fixed draft length: the MTP head drafted
    for e in doc["results"][1:]:  # greedy speculation is lossless
        assert e["same_output_as_none"] is True
    # the per-prompt lines as llama.cpp's benchmark prints them, an aggregate per configuration, a summary table
    lines = re.findall(r"^  (\w+) +pred= *(\d+) draft= *(\d+) acc= *(\d+) rate=(n/a|[01]\.\d{3}) tok/s=[\d.]+$",
                       out, re.MULTILINE)
    assert len(lines) == 4 * 3 and [ln[0] for ln in lines[:3]] == prompts
    assert out.count("Aggregate: {") == 4 and '"aggregate_accept_rate"' in out
    assert re.search(r"^\| draft-mtp:n_max=2,adaptive=off +\| +2 \| +[\d.]+ \| +[01]\.\d{3} \| +[\d.]+x \|$", out, re.MULTILINE)


def test_one_load(capsys, tmp_path, mtp_model):
    """By default none runs on a model loaded as `--spec-type none` would load it, draft-mtp on one with the
    MTP block; --one-load shares one load (the same tokens come out)."""
    docs = []
    for extra in ((), ("--one-load",)):
        bench(capsys, "spec", "-m", mtp_model, "--prompts", "creative_short", "-n", 8, "--config", "draft-mtp",
              *extra, "--json", tmp_path / "s.json")
        docs.append(json.loads((tmp_path / "s.json").read_text()))
    assert [d["model"]["loads"] for d in docs] == [2, 1]
    assert all(d["results"][1]["same_output_as_none"] for d in docs)


def test_spec_synthetic_acceptance(capsys, tmp_path, mtp_model):
    bench(capsys, "spec", "-m", mtp_model, "--prompts", "qa_factual", "-n", 16, "--ignore-eos",
          "--config", "draft-mtp:n_max=2,adaptive=off,synth_rates=0.5/0.25", "--json", tmp_path / "s.json")
    doc = json.loads((tmp_path / "s.json").read_text())
    _check_spec_doc(doc, ["qa_factual"], 16)
    e = doc["results"][1]
    assert "same_output_as_none" not in e  # synthetic acceptance: output not valid, not compared
    assert e["prompts"][0]["pred"] == 16 and e["aggregate"]["total_draft"] > 0


def test_spec_with_a_reduced_draft_vocabulary(capsys, tmp_path, mtp_model):
    """draft_vocab loads a runner of its own; greedy output stays that of --spec-type none."""
    bench(capsys, "spec", "-m", mtp_model, "--prompts", "qa_factual", "-n", 16, "--ignore-eos", "--config",
          "draft-mtp:n_max=2,adaptive=off", "--config", "draft-mtp:n_max=2,adaptive=off,draft_vocab=100",
          "--json", tmp_path / "s.json")
    doc = json.loads((tmp_path / "s.json").read_text())
    _check_spec_doc(doc, ["qa_factual"], 16)
    assert doc["model"]["loads"] == 3  # none, draft-mtp, draft-mtp with the reduced head
    assert [e["aggregate"]["total_draft"] > 0 and e["same_output_as_none"] for e in doc["results"][1:]] == [True] * 2


def test_parallel(capsys, tmp_path, plain_model):
    out = bench(capsys, "parallel", "-m", plain_model, "-c", "1,2,4", "-n", 6, "-r", 1, "--json", tmp_path / "p.json")
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["kind"] == "parallel" and doc["model"]["n_slots"] == 4
    rows = doc["results"]
    assert [r["concurrency"] for r in rows] == [1, 2, 4]
    for r in rows:
        assert r["n_requests"] == r["concurrency"] and r["total_predicted"] == 6 * r["concurrency"]
        assert close(r["aggregate_tok_s"], r["total_predicted"] / r["wall_s"])
        assert close(r["speedup_vs_first"], r["aggregate_tok_s"] / rows[0]["aggregate_tok_s"])
        p = r["per_request_tok_s"]
        assert p["n"] == r["concurrency"] and 0 < p["min"] <= p["median"] <= p["max"]
        assert r["drafted"] == r["accepted"] == 0 and r["vs_none"] == 1.0
    table = [ln for ln in out.splitlines() if ln.startswith("|")]
    assert "agg tok/s" in table[0] and "per-request tok/s" in table[0] and len(table) == 2 + 3


# ---- --compare-llama-server

FAKE_SERVER = """\
#!{python}
# A fake llama-server: the flags it is started with, /health, and /completion answering with timings made
# from the request (100 tok/s plain, 200 with --spec-type; 1000 prompt tok/s), logging each request.
import json, sys, http.server
args = sys.argv[1:]
if "--version" in args:
    print("version: 0 (fake)", file=sys.stderr)
    sys.exit(0)
port = int(args[args.index("--port") + 1])
spec = "--spec-type" in args
log = open({log!r}, "a")

class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _send(self, code, doc):
        body = json.dumps(doc).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(200, {{"status": "ok"}}) if self.path == "/health" else self._send(404, {{}})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        log.write(json.dumps({{"args": args, "body": req}}) + "\\n")
        log.flush()
        n, p = req["n_predict"], len(req["prompt"])
        t = {{"prompt_n": p, "prompt_ms": p * 1.0, "prompt_per_second": 1000.0, "predicted_n": n,
             "predicted_ms": (n - 1) * (5.0 if spec else 10.0),
             "predicted_per_second": 200.0 if spec else 100.0}}
        if spec:
            t.update(draft_n=2 * n, draft_n_accepted=n)
        self._send(200, {{"content": "", "tokens": list(range(n)), "timings": t}})

http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"""


@pytest.fixture
def fake_llama_server(tmp_path):
    log = tmp_path / "requests.jsonl"
    path = tmp_path / "llama-server"
    path.write_text(FAKE_SERVER.format(python=sys.executable, log=str(log)))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path, log


def test_compare_llama_server_spec(capsys, tmp_path, mtp_model, fake_llama_server):
    binary, log = fake_llama_server
    out = bench(capsys, "spec", "-m", mtp_model, "--prompts", "code_cpp,stepwise_math", "-n", 10,
                "--config", "draft-mtp:n_max=2,adaptive=off", "--compare-llama-server", binary,
                "--llama-server-args", "-t 2", "--json", tmp_path / "s.json")
    doc = json.loads((tmp_path / "s.json").read_text())
    _check_spec_doc(doc, ["code_cpp", "stepwise_math"], 10)
    none, mtp = doc["results"]
    # llama-server's side is its own timings, parsed: 100 tok/s plain, 200 with drafts, half accepted
    assert none["llama_server"]["aggregate"]["tok_s"] == pytest.approx(100.0)
    assert mtp["llama_server"]["aggregate"]["tok_s"] == pytest.approx(200.0)
    assert mtp["llama_server"]["aggregate"]["aggregate_accept_rate"] == pytest.approx(0.5)
    assert close(mtp["llama_server"]["speedup_vs_none"], 2.0)
    for e in doc["results"]:  # the ratio is nextn's aggregate over llama-server's, both from this run
        assert close(e["ratio_vs_llama_server"], e["aggregate"]["tok_s"] / e["llama_server"]["aggregate"]["tok_s"])
    assert "nextn/llama" in out and "llama-server tok/s" in out
    # each configuration's prompts and aggregate from both servers
    assert "\ndraft-mtp:n_max=2,adaptive=off (llama-server)  (speed-up over none: 2.00x)\n" in out
    assert re.search(r"^  code_cpp +pred=  10 draft=  20 acc=  10 rate=0\.500 tok/s=200\.0$", out, re.MULTILINE)
    assert out.count("Aggregate: {") == 4
    # one server per configuration, with the configuration as flags; the same token ids as nextn's
    info = doc["llama_server"]
    assert info["version"] == "version: 0 (fake)" and info["ignored_settings"] == {
        "draft-mtp:n_max=2,adaptive=off": ["adaptive"]}
    assert "--spec-type draft-mtp --spec-draft-n-max 2 -t 2" in info["commands"]["draft-mtp:n_max=2,adaptive=off"]
    assert "--spec-type" not in info["commands"]["none"]
    reqs = [json.loads(ln) for ln in log.read_text().splitlines()]
    reqs = reqs[2:]  # after one untimed warm-up request per configuration
    assert len(reqs) == 4 and all(r["body"]["n_predict"] == 10 and r["body"]["temperature"] == 0.0 for r in reqs)
    from nextn.devtools.bench.common import chat_ids, file_tokenizer
    from nextn.devtools.bench.spec import load_prompts

    tok = file_tokenizer(mtp_model)
    want = [chat_ids(tok, p["prompt"]) for p in load_prompts("code_cpp,stepwise_math")]
    assert [r["body"]["prompt"] for r in reqs] == [want[0], want[0], want[1], want[1]]


def test_compare_llama_server_throughput_and_parallel(capsys, tmp_path, plain_model, fake_llama_server):
    binary, _ = fake_llama_server
    bench(capsys, "throughput", "-m", plain_model, "-p", 16, "-n", 4, "-r", 1, "--compare-llama-server", binary,
          "--json", tmp_path / "t.json")
    doc = json.loads((tmp_path / "t.json").read_text())
    pp, tg = doc["results"]
    assert pp["llama_server"]["tok_s"]["median"] == 1000.0 and tg["llama_server"]["tok_s"]["median"] == 100.0
    for r in (pp, tg):
        assert close(r["llama_server"]["ratio"], r["tok_s"]["median"] / r["llama_server"]["tok_s"]["median"])
    bench(capsys, "parallel", "-m", plain_model, "-c", "1,3", "-n", 5, "-r", 1, "--compare-llama-server", binary,
          "--json", tmp_path / "p.json")
    rows = json.loads((tmp_path / "p.json").read_text())["results"]
    for r in rows:
        ls = r["llama_server"]
        assert ls["n_requests"] == r["concurrency"] and ls["total_predicted"] == 5 * r["concurrency"]
        assert close(r["ratio_vs_llama_server"], r["aggregate_tok_s"] / ls["aggregate_tok_s"])
        assert ls["per_request_tok_s"]["median"] == 100.0


def test_compare_llama_server_missing_binary(capsys, tmp_path, plain_model):
    out = bench(capsys, "throughput", "-m", plain_model, "-p", 8, "-n", 2, "-r", 1,
                "--compare-llama-server", tmp_path / "no-such-llama-server", "--json", tmp_path / "t.json")
    assert "llama-server comparison skipped: " in out and "no such file" in out
    doc = json.loads((tmp_path / "t.json").read_text())
    assert "no such file" in doc["llama_server"]["skipped"] and "llama_server" not in doc["results"][0]


def test_parallel_configurations(capsys, tmp_path, mtp_model):
    out = bench(capsys, "parallel", "-m", mtp_model, "-c", "1,2", "-n", 6, "-r", 1, "--config", "draft-mtp:n_max=2",
                "--json", tmp_path / "p.json")
    rows = json.loads((tmp_path / "p.json").read_text())["results"]
    assert [(r["config"], r["concurrency"]) for r in rows] == [("none", 1), ("none", 2), ("draft-mtp:n_max=2", 1),
                                                               ("draft-mtp:n_max=2", 2)]
    for r in rows:
        base = next(b for b in rows if b["config"] == "none" and b["concurrency"] == r["concurrency"])
        assert close(r["vs_none"], r["aggregate_tok_s"] / base["aggregate_tok_s"])
        assert 0 <= r["accepted"] <= r["drafted"]
    assert "vs none" in out


def test_compare_llama_server_that_fails_to_start(capsys, tmp_path, plain_model):
    """A llama-server that exits at start: the command fails with its status, command line and output."""
    binary = tmp_path / "llama-server"
    binary.write_text(f"#!{sys.executable}\nimport sys\nprint('error: invalid argument: -m', file=sys.stderr)\n"
                      "sys.exit(1)\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    rc = main(["bench", "throughput", "-m", str(plain_model), "-p", "8", "-n", "2", "-r", "1", "--no-progress",
               "--compare-llama-server", str(binary)])
    err = capsys.readouterr().err
    assert rc == 1 and "llama-server exited with status 1 at start" in err and "error: invalid argument" in err
    assert f"{binary} -m {plain_model} -c " in err


def test_parse_timings():
    t = {"prompt_n": 5, "prompt_ms": 10.0, "prompt_per_second": 500.0, "predicted_n": 9, "predicted_ms": 80.0,
         "predicted_per_second": 100.0}
    got = parse_timings({"timings": t, "tokens": [1, 2]})
    assert got["draft_n"] == got["draft_n_accepted"] == 0 and got["predicted_n"] == 9 and got["tokens"] == [1, 2]
    assert parse_timings({"timings": {**t, "draft_n": 4, "draft_n_accepted": 3}})["draft_n_accepted"] == 3
    with pytest.raises(NextnError, match="lack predicted_ms"):
        parse_timings({"timings": {k: v for k, v in t.items() if k != "predicted_ms"}})
    with pytest.raises(NextnError, match="no timings"):
        parse_timings({"content": ""})
    with pytest.raises(NextnError, match="5 drafts accepted of 4"):
        parse_timings({"timings": {**t, "draft_n": 4, "draft_n_accepted": 5}})
    assert find_binary("/no/such/llama-server")[0] is None


def test_real_llama_server(capsys, tmp_path, plain_model):
    """Only where a llama-server binary exists (NEXTN_LLAMA_SERVER or PATH): CI has none."""
    binary = os.environ.get("NEXTN_LLAMA_SERVER") or shutil.which("llama-server")
    if not binary:
        pytest.skip("no llama-server binary (set NEXTN_LLAMA_SERVER=/path/to/llama-server or put it on PATH)")
    bench(capsys, "throughput", "-m", plain_model, "-p", 16, "-n", 8, "-r", 1, "--compare-llama-server", binary,
          "--json", tmp_path / "t.json")
    for r in json.loads((tmp_path / "t.json").read_text())["results"]:
        assert r["llama_server"]["tok_s"]["median"] > 0


def test_client_errors():
    """A non-200 answer is an error naming the status and llama-server's message; no server: not healthy."""
    import http.server

    class H(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.dumps({"error": {"code": 503, "message": "Loading model"}}).encode()
            self.send_response(503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with pytest.raises(NextnError, match="answered 503: Loading model"):
            LlamaClient("127.0.0.1", srv.server_address[1]).complete([1, 2, 3], 4)
    finally:
        srv.shutdown()
        srv.server_close()
    assert not LlamaClient("127.0.0.1", 9).healthy()  # the discard port: nothing listens


# ---- --plot, and the old bench


def test_plot(capsys, tmp_path, mtp_model):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        rc = main(["bench", "spec", "-m", str(mtp_model), "--prompts", "translation", "-n", "4", "--plot",
                   str(tmp_path / "p.png"), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 1 and "--plot needs matplotlib" in err and "pip install matplotlib" in err
        assert not (tmp_path / "p.png").exists()
        return
    bench(capsys, "spec", "-m", mtp_model, "--prompts", "translation", "-n", 6, "--config", "draft-mtp:n_max=1..2",
          "--plot", tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_old_bench_still_runs(capsys, mtp_model):
    """`nextn bench` and `nextn bench --spec` as the README shows them (with a tiny model)."""
    out = bench_old(capsys, "-m", mtp_model, "--n-prompt", 16, "--n-decode", 4, "--repeats", 1, "--profile")
    assert "decode bound" in out and "cython" in out and "pyopencl" in out
    # the per-kernel profile: every launch of the step in some row, the head's matmul with its bytes
    profile = out[out.index("per-kernel profile"):out.index("\nper-kernel profile of one 16-token")].splitlines()
    n_launches = int(re.search(r"\((\d+) launches", profile[0]).group(1))
    rows = [line.split() for line in profile[2:] if line and not line.startswith("kernels with")]
    assert sum(int(r[1]) for r in rows) == n_launches
    head = next(r for r in rows if r[0].startswith("matmul_q8_0[") and r[1] == "1")
    assert float(head[4]) > 0 and float(head[5]) > 0
    assert any(r[0] == "attention" and r[4] != "-" for r in rows)
    # then the prompt step's, time only, with as many launches as the decode step
    prompt = out[out.index("profile of one 16-token prompt step"):].splitlines()
    assert int(re.search(r"\((\d+) launches", prompt[0]).group(1)) == n_launches
    assert all(line.split()[4] == "-" for line in prompt[2:] if line)
    out = bench_old(capsys, "--spec", "-m", mtp_model, "--n-prompt", 16, "--n-decode", 4, "--repeats", 1)
    assert "MTP on / off" in out and "ngram-mod,draft-mtp" in out


@pytest.mark.parametrize("arch", ["step35", "glm4moe"])
def test_old_bench_on_every_architecture(capsys, tmp_path, arch):
    """Per-layer KV heads and sliding windows (step35) count in the decode bound: a sliding layer reads its
    window only."""
    path = make_tiny(tmp_path / f"{arch}.gguf", arch=arch, qtype="Q8_0", seed=3, mtp=True)
    out = bench_old(capsys, "-m", path, "--n-prompt", 16, "--n-decode", 4, "--repeats", 1, "--profile")
    assert "decode bound" in out and "cython" in out
    # routed experts: the bytes of the ones a token uses
    assert re.search(r"^matmul_id_q8_0\[\S+\]\s+\d+\s+\d+\s+\d+%\s+\d+\.\d+", out, re.M)


def test_attention_read_bytes_counts_windows_and_heads(rt):
    from nextn.memory.kv_cache import KVCache

    cache = KVCache(rt, 1, 64, 2, 32, [("f16", "f16"), ("q8_0", "f16")], layer_heads=[2, 4], layer_window=[0, 8])
    # rows of 32 values: 64 bytes in f16, 34 in q8_0; the second layer reads at most its 8-position window
    assert cache.attention_read_bytes(20) == 20 * 2 * (64 + 64) + 8 * 4 * (34 + 64)
    assert cache.attention_read_bytes(5) == 5 * 2 * (64 + 64) + 5 * 4 * (34 + 64)


def bench_old(capsys, *argv):
    rc = main(["bench", *map(str, argv)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out



def test_bench_arch_choices_are_the_bench_models():
    """`nextn bench --arch` offers exactly the random bench models (the CLI keeps its own list so that it
    starts without loading pyopencl)."""
    from nextn import cli
    from nextn.devtools.bench import BENCH_ARCHS

    assert cli.BENCH_ARCHS == BENCH_ARCHS
