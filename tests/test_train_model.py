"""tools/train/model.py, the torch forward the embedded default model is trained with, against the numpy
reference (tests/reference.py) on make-tiny files: gated attention, the Gated DeltaNet layers (in the chunked
form used for training), the MTP block and its second draft step. Skipped without torch (a development-only
dependency)."""

import sys
from pathlib import Path

import numpy as np
import pytest
from reference import ReferenceModel

from nextn.devtools.tiny import make_tiny

torch = pytest.importorskip("torch", reason="torch is not installed (a development dependency: "
                                             "pip install torch==2.13.0)")
TRAIN_DIR = Path(__file__).resolve().parent.parent / "tools" / "train"
if not (TRAIN_DIR / "model.py").is_file():  # the Arch package's check() runs the tests without tools/
    pytest.skip(f"{TRAIN_DIR} is not here (a source checkout has it)", allow_module_level=True)
sys.path.insert(0, str(TRAIN_DIR))
import model as tm  # noqa: E402

PROMPT = [5, 17, 99, 3, 42, 250, 7, 61, 13, 200, 11, 8, 140, 77, 9, 31, 150, 2, 66, 101]


def test_chunked_delta_rule_is_the_recurrence():
    g = torch.Generator().manual_seed(0)
    B, H, T, dk, dv = 2, 3, 150, 16, 8
    q = torch.randn(B, H, T, dk, generator=g, dtype=torch.float64)
    k = torch.nn.functional.normalize(torch.randn(B, H, T, dk, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(B, H, T, dv, generator=g, dtype=torch.float64)
    decay = -torch.rand(B, H, T, generator=g, dtype=torch.float64)
    beta = torch.rand(B, H, T, generator=g, dtype=torch.float64)
    want, _ = tm.delta_rule_recurrent(q, k, v, decay, beta)
    for chunk in (16, 64):
        assert torch.allclose(tm.delta_rule_chunked(q, k, v, decay, beta, chunk=chunk), want, atol=1e-10)


@pytest.mark.parametrize("interval", [4, 1])
def test_torch_forward_matches_the_reference(tmp_path, interval):
    path = make_tiny(tmp_path / "m.gguf", arch="qwen35", qtype="F32", seed=1, n_layer=4, mtp=True,
                     full_attention_interval=interval, rope_freq_base=10000.0)
    ref = ReferenceModel(path)
    m = tm.from_gguf(path).double()
    want = ref.forward(PROMPT, 0)
    with torch.no_grad():
        h, logits = m.trunk(torch.tensor([PROMPT]))
    assert np.abs(logits[0].numpy() - want).max() < 1e-6 * np.abs(want).max()

    hidden = np.vstack([np.zeros((1, ref.n_embd)), ref.h_nextn[:-1]])
    want1 = ref.mtp_forward(hidden, PROMPT, 0)
    draft = int(want1[-1].argmax())
    want2 = ref.mtp_forward(ref.mtp_h_nextn[-1], [draft], len(PROMPT))
    with torch.no_grad():
        tokens = torch.tensor([PROMPT + [draft]])
        keep = []
        m1 = m.mtp_hidden(tokens, torch.cat([h, torch.zeros_like(h[:, :1])], dim=1), keep=keep)
        m2 = m.mtp_hidden(tokens, m1, kv_prev=keep[0])
        head = m.w("output.weight")
        got1, got2 = (m1 @ head.T)[0, :-1].numpy(), (m2 @ head.T)[0, -1].numpy()
    assert np.abs(got1 - want1).max() < 1e-6 * np.abs(want1).max()
    assert np.abs(got2 - want2[0]).max() < 1e-6 * np.abs(want2).max()
