"""`nextn serve` with speculative decoding on models with an MTP block (qwen35: hybrid, glm4moe: MoE): 4 slots,
MTP drafts, the prompt cache on, requests arriving while others are mid-prompt, a client that disconnects mid-stream; nothing
crashes and every output equals the same request served alone without speculation."""

import concurrent.futures
import json
import shutil

import httpx
import pytest

from nextn.devtools.tiny import make_tiny
from test_server import _short_dir, http, start, stop


@pytest.fixture(scope="module", params=["qwen35", "glm4moe"])
def model(request, tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("srvspec") / "m.gguf", arch=request.param, qtype="Q8_0", seed=2,
                     mtp=True)


def complete(sock, prompt, n=24, **extra):
    r = http(sock).post("/v1/completions", json={"prompt": prompt, "max_tokens": n, "temperature": 0,
                                                 "ignore_eos": True, **extra})
    assert r.status_code == 200, r.text
    return r.json()


PROMPTS = ["The quick brown fox " * 6, "Once upon a time " * 9, "hello", "1 2 3 4 5 6 7 8 9 10 " * 5]


def test_mtp_speculation_with_four_slots_and_prompt_cache(model):
    d = _short_dir()
    plain_sock, spec_sock = d / "plain.sock", d / "spec.sock"
    plain = start(model, plain_sock, "-np", "1")
    spec = start(model, spec_sock, "--spec-type", "draft-mtp", "--spec-draft-n-max", "4")
    try:
        want = {p: complete(plain_sock, p)["choices"][0]["text"] for p in PROMPTS}
        # all at once (prompts processed while other slots verify drafts), twice (prompt-cache hits)
        for _ in range(2):
            with concurrent.futures.ThreadPoolExecutor(8) as ex:
                results = list(ex.map(lambda p: (p, complete(spec_sock, p)), PROMPTS * 2))
            for p, body in results:
                assert body["choices"][0]["text"] == want[p]
        t = results[0][1]["timings"]
        assert t["draft_n"] > 0 and 0 <= t["draft_n_accepted"] <= t["draft_n"]
        # a client that goes away mid-stream: the others are unaffected
        with http(spec_sock).stream("POST", "/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 200,
                                                                       "stream": True, "ignore_eos": True}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 3:
                    break
        assert complete(spec_sock, PROMPTS[0])["choices"][0]["text"] == want[PROMPTS[0]]
        # per-request speculative parameters, and a bad one
        body = complete(spec_sock, PROMPTS[3], **{"speculative.n_max": 2})
        assert body["choices"][0]["text"] == want[PROMPTS[3]]
        bad = http(spec_sock).post("/v1/completions", json={"prompt": "x", "speculative.n_max": "many"})
        assert bad.status_code == 400 and "speculative" in bad.json()["error"]["message"]
        metrics = http(spec_sock).get("/metrics").text
        drafted = [line for line in metrics.splitlines() if line.startswith("nextn_tokens_drafted_total")]
        assert drafted and float(drafted[0].split()[-1]) > 0
    finally:
        for p, sock in ((plain, plain_sock), (spec, spec_sock)):
            rc, err = stop(p)
            assert rc == 0, err
        shutil.rmtree(d, ignore_errors=True)


def test_draft_mtp_refused_on_a_model_without_the_block(tmp_path):
    path = make_tiny(tmp_path / "plain.gguf", arch="qwen3", qtype="Q8_0", seed=2)
    d = _short_dir()
    p = start(path, d / "s.sock", "--spec-type", "draft-mtp", wait=False)
    out, err = p.communicate(timeout=60)
    assert p.returncode != 0 and "no MTP" in err and "plain.gguf" in err and "Traceback" not in err
    shutil.rmtree(d, ignore_errors=True)
