"""Long texts are tokenized in a worker process, so that the event loop keeps running.

The tokenizers library (BPE vocabularies) holds the GIL for a whole text: 1 MB took 3.5 s and a 4 MB prompt
(the largest body) 14 s, during which /health and every stream stood still, although tokenizing runs in a
thread. `Encoder.encode` sends texts of LONG_TEXT characters or more to one worker process with the loaded
model's vocabulary (started on the first such text; the thread that waits for it holds no lock) and
encodes shorter ones in place. If the worker cannot be used, the text is encoded in place as before.
"""

from __future__ import annotations

import array
import logging
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

log = logging.getLogger("nextn.server")

LONG_TEXT = 16384  # characters; below it the GIL is held for under ~50 ms
_TEMPLATE = "{{ '' }}"  # the worker only encodes: it needs no chat template (nor to compile the file's)

_worker_tokenizer = None


def _init(meta: dict[str, Any]) -> None:
    global _worker_tokenizer
    from nextn.tokenizer import Tokenizer

    _worker_tokenizer = Tokenizer.from_metadata(meta, _TEMPLATE)


def _encode(text: str, add_special: bool, parse_special: bool) -> bytes:
    # 4 bytes an id: a pickled list of millions of ints would hold the server's GIL while it is unpickled
    return array.array("i", _worker_tokenizer.encode(text, add_special, parse_special)).tobytes()


class Encoder:
    """The model's tokenizer for request texts: `encode` as Tokenizer.encode, long texts in the worker."""

    def __init__(self, tokenizer, meta: dict[str, Any]):
        self.tokenizer = tokenizer
        self._meta = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}  # what the vocabulary is
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **kwargs) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        if len(text) < LONG_TEXT:
            return self.tokenizer.encode(text, add_special, parse_special)
        try:
            data = self._worker().submit(_encode, text, add_special, parse_special).result()
        except (BrokenProcessPool, OSError) as e:  # a worker killed or that cannot start: encode here
            log.warning("the tokenizer process failed (%s); encoding in the server", e)
            self.close()
            return self.tokenizer.encode(text, add_special, parse_special)
        ids = array.array("i")
        ids.frombytes(data)
        return ids.tolist()

    def _worker(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                # spawn, not fork: the server has threads and an OpenCL context a forked child must not inherit
                self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_init, initargs=(self._meta,))
            return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
