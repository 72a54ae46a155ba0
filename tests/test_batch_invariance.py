"""Batch invariance (issue 15): a request's logprobs are bit-identical whether it is served alone, among 7
concurrent requests, or with speculation (its tokens then go through verify steps of several rows). The
matmul kernels run one arithmetic for every token group size (kernels/quants.h, MM_BATCH_INVARIANT); this
test is what fails if any kernel's reduction order comes to depend on the batch again."""

import concurrent.futures
import shutil

import pytest

from nextn.devtools.tiny import make_tiny
from test_server import _short_dir, http, start, stop

TARGET = "def fibonacci(n):\n    return fibonacci(n - 1) + fibonacci(n - 2)\n" * 3  # repeats: n-gram drafts
OTHERS = ["The quick brown fox " * 5, "Once upon a time", "1 2 3 4 5 6 7 8 " * 4, "hello", "import os\n" * 6,
          "a b c d e f g", "Lorem ipsum dolor sit amet " * 3]
GREEDY = {"temperature": 0}
SEEDED = {"temperature": 0.9, "top_k": 20, "top_p": 0.95, "min_p": 0.0, "seed": 1234}


@pytest.fixture(scope="module", params=[("qwen3", "ngram-simple"), ("qwen35", "draft-mtp")], ids=lambda p: p[0])
def model(request, tmp_path_factory):
    arch, spec_type = request.param
    path = make_tiny(tmp_path_factory.mktemp("bi") / "m.gguf", arch=arch, qtype="Q8_0", seed=5,
                     mtp=spec_type == "draft-mtp")
    return path, spec_type


def complete(sock, prompt, sampling, n=24):
    r = http(sock, timeout=120).post("/v1/completions", json={
        "prompt": prompt, "max_tokens": n, "ignore_eos": True, "logprobs": 5, **sampling})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["text"], choice["logprobs"]["token_logprobs"], choice["logprobs"]["top_logprobs"]


def alone_and_batched(sock, sampling):
    """(the target alone, the target among 7 concurrent others) - each as complete() returns it"""
    alone = complete(sock, TARGET, sampling)
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        others = [ex.submit(complete, sock, p, sampling) for p in OTHERS]
        batched = ex.submit(complete, sock, TARGET, sampling).result()
        for f in others:
            f.result()
    return alone, batched


def test_logprobs_alone_batched_and_speculative_are_bit_identical(model):
    model, spec_type = model
    d = _short_dir()
    plain_sock, spec_sock = d / "plain.sock", d / "spec.sock"
    plain = start(model, plain_sock, "-np", "8", "--spec-type", "none")
    spec = start(model, spec_sock, "-np", "8", "--spec-type", spec_type, "--spec-draft-n-max", "3")
    try:
        for sampling in (GREEDY, SEEDED):
            alone, batched = alone_and_batched(plain_sock, sampling)
            # JSON floats round-trip exactly: == on them is a bit-for-bit comparison
            assert batched == alone, f"{sampling}: logprobs differ between alone and batched"
            spec_alone, spec_batched = alone_and_batched(spec_sock, sampling)
            assert spec_batched == spec_alone, f"{sampling}: logprobs differ batched under speculation"
            if sampling is GREEDY:  # sampled speculation draws its randoms differently: the same only greedy
                assert spec_alone == alone, "greedy logprobs differ with speculation"
    finally:
        for p in (plain, spec):
            rc, err = stop(p)
            assert rc == 0, err
        shutil.rmtree(d, ignore_errors=True)

