"""ModelRunner: a GGUF model loaded onto an OpenCL device, with prepared step plans, ready to evaluate.

Loading checks everything before spending device memory: the file, the architecture, every tensor's shape
and type, and whether weights + KV cache + activations fit on the device. Then it uploads the weights,
builds the kernels and compiles one plan per batch-size bucket (decode: 1 token; verify: a few; prompt:
n_batch). Evaluating a batch is: write token ids / positions / sequences / wanted rows (a few bytes),
run the plan from Cython, read back argmax ids (and full logits only when a sampler needs them).

The runner owns each sequence's state: how many positions it holds (a step advances it, `rollback` and
`truncate` cut it back), its recurrent state and snapshots (`snapshot`, `save_for_rollback`), the MTP
block's positions, and the prefix reuse of the prompt cache (`reuse`, `copy_prefix`). Others read
`seq_length`; nobody else writes it.
"""

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from nextn.cl import plan as planmod
from nextn.cl.launch import N_VARS, VAR_N_OUTPUTS, VAR_N_SAVED, VAR_N_SPLITS, VAR_N_TOKENS
from nextn.cl.runtime import Runtime
from nextn.errors import RequestError
from nextn.gguf.model_file import ModelFile
from nextn.memory.kv_cache import F16_KV, KVTypes
from nextn.memory.plan import MemoryPlan
from nextn.models import architecture, blocks
from nextn.ops import attention as attn_ops
from nextn.ops.matmul import XSUM_COLS, MatmulOps, xsum_scratch_bytes
from nextn.ops.weights import upload_weight
from nextn.spec.draft_vocab import draft_vocab_ids
from nextn.tokenizer import Tokenizer

VERIFY_TOKENS = 16  # largest batch served by the "few tokens" plan (speculative drafts, several slots)
MAX_OUTPUTS = 64  # rows of one step whose logits can be computed (drafts of all slots, or a chunk of a prompt)


class ModelRunner:
    def __init__(
        self,
        path: str | Path,
        *,
        rt: Runtime | None = None,
        n_ctx: int | None = None,
        n_seq: int = 1,
        n_batch: int = 512,
        native_plan: bool = True,
        progress: bool | Callable[[float], None] = False,
        mtp: bool = False,
        speculative: bool = False,
        kv_types: KVTypes = F16_KV,
        batch_invariant: bool = True,
        draft_vocab: int = 0,
    ):
        t0 = time.perf_counter()
        self.file = mf = ModelFile(path)
        self.arch = arch = architecture(mf.arch, mf.path)
        self.hp = hp = arch.hparams(mf)
        infos = arch.check_tensors(hp, mf, mtp)
        self.tokenizer = Tokenizer.from_metadata(mf.meta)
        self.n_ctx = int(n_ctx or min(hp.n_ctx_train, 4096))
        self.n_seq = n_seq
        self.n_batch = max(1, min(n_batch, self.n_ctx))
        self.max_outputs = min(MAX_OUTPUTS, self.n_batch)
        self.has_mtp = mtp
        # speculation verifies drafts among the first max_outputs rows of a step; recurrent layers keep what
        # rolling back to any of them takes
        self.rollback_rows = self.max_outputs if speculative else 0
        kv_types.check(hp.head_dim, mf.path.name)
        self.kv_types = kv_types
        self.memory: MemoryPlan = arch.memory_plan(hp, infos, n_seq, self.n_ctx, self.n_batch, self.max_outputs, mtp,
                                                  self.rollback_rows, kv_types)
        # FR-Spec: the MTP heads draft over the draft_vocab most frequent tokens (spec/draft_vocab.py)
        self.draft_ids = None
        draft_heads = []  # (block prefix, source tensor) of each MTP head that gets a reduced copy
        if mtp and 0 < draft_vocab < hp.n_vocab:
            self.draft_ids = draft_vocab_ids(self.tokenizer, hp.n_vocab, draft_vocab)
            for head in range(arch.mtp_draft_heads(hp)):
                b = f"blk.{hp.n_layer + head}."
                draft_heads.append((b, infos[blocks.mtp_head_source(mf, b)]))
            self.memory = dataclasses.replace(self.memory, mtp_weights=self.memory.mtp_weights + sum(
                info.nbytes // info.n_rows * draft_vocab for _, info in draft_heads))
        self.rt = rt or Runtime()
        split_tokens, split_heads = min(VERIFY_TOKENS, self.n_batch), int(np.max(hp.n_head))
        self.memory = dataclasses.replace(self.memory, attention_splits=attn_ops.KvSplit.bytes_needed(
            self.n_ctx, split_tokens, split_heads, hp.head_dim))
        max_cols = max((info.n_cols for info in infos.values() if len(info.ne) >= 2 and info.qtype in XSUM_COLS),
                       default=0)
        self.memory = dataclasses.replace(self.memory, matmul_scratch=xsum_scratch_bytes(
            self.n_batch, max_cols, max(1, getattr(hp, "n_expert_used", 1))))
        parts = " + ".join(name.replace("_", " ") for name, _ in self.memory.items())
        self.rt.check_fits(self.memory.total, f"{mf.path.name} ({parts}; {n_seq} x {self.n_ctx} context)")

        total = sum(i.nbytes for i in infos.values())
        bar = None
        if callable(progress):  # a reporter of the fraction uploaded (the server's log and status line)
            done = [0]

            def on_bytes(n):
                done[0] += n
                progress(done[0] / total)
        elif progress:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading")
            on_bytes = bar.update
        else:
            on_bytes = None
        self.weights = arch.upload(self.rt, hp, mf, infos, progress=on_bytes, mtp=mtp)
        for b, info in draft_heads:
            self.weights[b + blocks.DRAFT_HEAD] = upload_weight(self.rt, mf.raw(info)[self.draft_ids], info.qtype,
                                                                len(self.draft_ids), info.n_cols, b + "draft_head")
        if bar:
            bar.close()
        self.cache = arch.make_cache(self.rt, hp, n_seq, self.n_ctx, mtp, self.rollback_rows, kv_types,
                                     n_batch=self.n_batch)
        self.cache.kv_split = attn_ops.KvSplit(self.rt, self.n_ctx, split_tokens, split_heads, hp.head_dim)
        self._prefixes = self.cache.prefix_store()
        self.buffers = arch.step_buffers(self.rt, hp, self.n_batch, self.max_outputs)
        self.mm = MatmulOps(self.rt, batch_invariant=batch_invariant, xsum_bytes=self.memory.matmul_scratch)
        buckets = sorted({1, min(VERIFY_TOKENS, self.n_batch), self.n_batch})
        self.plans = []  # (max_tokens, plan), smallest first
        self.launches = {}  # max_tokens -> the plan's Launch list (bench swaps plan kinds over the same launches)
        for max_tokens in buckets:
            launches = arch.build_step(
                self.rt, self.mm, hp, self.weights, self.buffers, self.cache, max_tokens, self.max_outputs
            )
            self.plans.append((max_tokens, planmod.make_plan(self.rt.queue, launches, native=native_plan)))
            self.launches[max_tokens] = launches
        self.replay_plan = None
        replay = arch.build_replay(self.rt, hp, self.weights, self.buffers, self.cache) if self.rollback_rows \
            else None
        if replay:
            self.replay_plan = planmod.make_plan(self.rt.queue, replay, native=native_plan)
        self.mtp_plans = {}  # (max_tokens, hidden source, head) -> plan of the MTP block
        # MTP heads drafting in a chain, one per draft (step35's nextn_predict_layers), else 1 (or 0: no MTP)
        self.mtp_heads = arch.mtp_draft_heads(hp) if mtp else 0
        if mtp:
            self.mtp_buffers = arch.mtp_buffers(self.rt, hp, self.n_batch)
            for head in range(self.mtp_heads):
                for max_tokens in buckets:
                    for source, hidden in (("trunk", self.buffers.hidden), ("mtp", self.mtp_buffers.h)):
                        launches = arch.build_mtp_step(self.rt, self.mm, hp, self.weights, self.buffers,
                                                      self.mtp_buffers, self.cache, max_tokens, self.max_outputs,
                                                      hidden, **({"head": head} if head else {}))
                        self.mtp_plans[max_tokens, source, head] = planmod.make_plan(self.rt.queue, launches,
                                                                                     native=native_plan)
        self.load_seconds = time.perf_counter() - t0
        # Host staging arrays, alive for the runner's life (writes are non-blocking).
        self._vars = np.zeros(N_VARS, np.int32)
        self._ids = np.zeros(self.n_batch, np.int32)
        self._pos = np.zeros(self.n_batch, np.int32)
        self._seq = np.zeros(self.n_batch, np.int32)
        self._out_idx = np.zeros(self.n_batch, np.int32)
        self._hid = np.zeros(self.n_batch, np.int32)

    @property
    def kv_split(self) -> "attn_ops.KvSplit":
        """Attention's flash-decoding splits (held by the cache, which the step builders read it from)."""
        return self.cache.kv_split

    @property
    def n_vocab(self) -> int:
        return self.hp.n_vocab

    def use_native_plans(self, native: bool) -> None:
        """Rebuild every plan as native (Cython) or pyopencl over the same prepared kernels."""
        self.plans = [(m, planmod.make_plan(self.rt.queue, self.launches[m], native=native)) for m, _ in self.plans]

    def _plan(self, n_tokens: int):
        for max_tokens, plan in self.plans:
            if n_tokens <= max_tokens:
                return plan
        raise ValueError(f"batch of {n_tokens} tokens exceeds n_batch={self.n_batch}")

    @property
    def holds_recurrent_state(self) -> bool:
        """Whether a sequence can only go back to a snapshot or to 0 (recurrent layers)."""
        return self.cache.holds_recurrent_state

    def step(self, ids, pos, seq, out_rows, want_logits: bool = False):
        """One forward pass over a batch (at most n_batch tokens; each sequence's tokens in position order).
        Returns (argmax ids, logits or None) of the rows listed in `out_rows`. Each sequence in the batch then
        holds the positions up to its last token's."""
        n = len(ids)
        b = self.buffers
        self._write_batch((b.ids, b.pos, b.seq, b.out_idx), ids, pos, seq, out_rows)
        self._plan(n).run(self._vars)
        for s, last in self._last_positions(n):
            self.cache.set_length(s, last + 1)
        return self._read_head(len(out_rows), want_logits)

    def mtp_step(self, ids, pos, seq, hidden_rows, out_rows, source: str = "trunk", want_logits: bool = False,
                 head: int = 0):
        """The MTP block over (token, hidden) pairs: ids[i] at pos[i] of sequence seq[i], paired with row
        hidden_rows[i] of the last trunk step's final hidden states (source "trunk") or of the last MTP step's
        own output (source "mtp"; with several heads, of each head's last step: mtp_hidden_row); a row of -1
        gives the zero hidden state (what position 0 is paired with). head: which of mtp_heads runs.
        Returns (argmax, logits or None) of the draft for the token after each out row."""
        if not self.has_mtp:
            raise ValueError("the MTP block is not loaded (load with mtp=True)")
        n = len(ids)
        m = self.mtp_buffers
        self._hid[:n] = hidden_rows
        self._hid[:n][self._hid[:n] < 0] = self.buffers.zero_row  # both hidden sources keep that row zero
        planmod.enqueue_write(self.rt.queue, m.hid_idx, self._hid[:n])
        self._write_batch((m.ids, m.pos, m.seq, m.out_idx), ids, pos, seq, out_rows)
        max_tokens = next(mt for mt, _ in self.plans if n <= mt)
        self.mtp_plans[max_tokens, source, head].run(self._vars)
        for s, last in self._last_positions(n):  # the MTP block's KV now holds these positions
            self.cache.mtp_lengths[s] = max(self.cache.mtp_lengths[s], last + 1)
        top, logits = self._read_head(len(out_rows), want_logits,
                                      self.n_vocab if self.draft_ids is None else len(self.draft_ids))
        if self.draft_ids is not None:  # rows of the reduced head -> token ids; other tokens' logits -inf
            top = self.draft_ids[top]
            if logits is not None:
                full = np.full((len(out_rows), self.n_vocab), -np.inf, np.float32)
                full[:, self.draft_ids] = logits
                logits = full
        return top, logits

    def mtp_hidden_row(self, head: int, row: int) -> int:
        """The "mtp" source's row holding head `head`'s output of row `row` of its last step."""
        return head * self.mtp_buffers.head_rows + row

    def _last_positions(self, n: int):
        """(sequence, its highest position) of each sequence in the batch just written (a loop per
        sequence, not per token)."""
        seq_a, pos_a = self._seq[:n], self._pos[:n]
        if n == 1:
            return [(int(seq_a[0]), int(pos_a[0]))]
        return [(int(s), int(pos_a[seq_a == s].max())) for s in np.unique(seq_a)]

    # -- sequence state -------------------------------------------------------------------------------

    def seq_length(self, seq: int) -> int:
        """Positions of seq whose state is held."""
        return self.cache.lengths[seq]

    def mtp_length(self, seq: int) -> int:
        """Positions of seq held in the MTP block's own KV."""
        return self.cache.mtp_lengths[seq]

    def truncate(self, seq: int, length: int) -> None:
        """Forget positions >= length (a recurrent state goes back to its snapshot or to 0; see seek)."""
        self.cache.truncate(seq, length)

    def snapshot(self, seq: int) -> None:
        """Keep seq's state at its current length, for a later prompt that shares that prefix."""
        self.cache.snapshot(seq)

    def reuse(self, seq: int, n: int) -> int:
        """Prompt cache: keep the first n positions of seq (as far as the state allows); returns those kept."""
        return self._prefixes.reuse(seq, n)

    def copy_prefix(self, src: int, dst: int, n: int) -> int:
        """Prompt cache: dst starts with the first n positions of src (device copies); returns those copied."""
        return self._prefixes.copy_prefix(src, dst, n)

    # -- speculative rollback -------------------------------------------------------------------------

    def save_for_rollback(self, seq: int) -> None:
        """Call before a step that verifies drafts of seq (queued in order, before the step)."""
        if self.replay_plan is not None:
            self.cache.save_for_rollback(seq)

    def rollback(self, seq: int, rows, n_keep: int) -> None:
        """After such a step, keep only the first n_keep of seq's rows (batch rows `rows`: all of seq's, in
        order): KV positions past them are forgotten, and recurrent layers are brought to the state after row
        rows[n_keep - 1] by restoring the saved state and replaying those rows' saved inputs through the
        conv and delta rule (no matmuls)."""
        if n_keep > len(rows) or n_keep < 1:
            raise ValueError(f"rollback: keep {n_keep} of {len(rows)} rows")
        if n_keep == len(rows):
            return
        if self.replay_plan is not None and max(rows) >= self.rollback_rows:
            raise ValueError(f"rollback: row {max(rows)} was not saved (only the first {self.rollback_rows})")
        self.cache.set_length(seq, self.cache.lengths[seq] - (len(rows) - n_keep))
        if self.replay_plan is None:
            return
        self.cache.restore_for_rollback(seq)
        q, b = self.rt.queue, self.buffers
        # fresh host arrays: the writes are non-blocking and the staging arrays belong to the next step
        planmod.enqueue_write(q, b.replay_idx, np.asarray(rows[:n_keep], np.int32))
        planmod.enqueue_write(q, b.replay_seq, np.full(n_keep, seq, np.int32))
        self._vars[VAR_N_TOKENS] = n_keep
        self.replay_plan.run(self._vars)

    def _write_batch(self, bufs, ids, pos, seq, out_rows) -> None:
        n, n_out = len(ids), len(out_rows)
        if n > self.n_batch or n_out > self.max_outputs:
            raise ValueError(f"step of {n} tokens / {n_out} outputs exceeds {self.n_batch} / {self.max_outputs}")
        q = self.rt.queue
        self._ids[:n] = ids
        self._pos[:n] = pos
        self._seq[:n] = seq
        self._out_idx[:n_out] = out_rows
        for buf, host in zip(bufs, (self._ids[:n], self._pos[:n], self._seq[:n], self._out_idx[:n_out])):
            planmod.enqueue_write(q, buf, host)
        self._vars[VAR_N_TOKENS] = n
        self._vars[VAR_N_OUTPUTS] = n_out
        self._vars[VAR_N_SAVED] = min(n, self.rollback_rows)
        self._vars[VAR_N_SPLITS] = self.cache.kv_split.count(n, int(self._pos[:n].max()) if n else 0)

    def _read_head(self, n_out: int, want_logits: bool, n_cols: int | None = None):
        """Argmax and (if wanted) logits of the last step's n_out output rows, n_cols logits each (default
        n_vocab; fewer from a reduced MTP head)."""
        q, b = self.rt.queue, self.buffers
        top = np.empty(n_out, np.int32)
        if n_out == 0:  # a mid-prompt chunk: the head's kernels see zero rows and do nothing
            planmod.finish(q)
            return top, None
        planmod.enqueue_read(q, b.argmax, top)
        logits = None
        if want_logits:
            logits = np.empty((n_out, n_cols or self.n_vocab), np.float32)
            planmod.enqueue_read(q, b.logits, logits)
        return top, logits

    def eval(self, seq: int, tokens, start_pos: int, all_logits: bool = False, want_logits: bool = True):
        """Evaluate `tokens` of sequence `seq` at positions start_pos.. in chunks of n_batch.

        Returns (argmax, logits) for the last token, or for every token with all_logits=True.
        """
        tokens = list(tokens)
        if not tokens:
            raise RequestError("nothing to evaluate: the prompt is empty")
        if start_pos + len(tokens) > self.n_ctx:
            raise RequestError(
                f"{start_pos + len(tokens)} tokens do not fit the context of {self.n_ctx} tokens (--ctx-size)"
            )
        self.cache.seek(seq, start_pos)  # a recurrent state continues only from where it is, its snapshot or 0
        tops, logits = [], []
        chunk_size = self.max_outputs if all_logits else self.n_batch
        for i in range(0, len(tokens), chunk_size):
            chunk = tokens[i : i + chunk_size]
            n = len(chunk)
            last = i + n == len(tokens)
            rows = list(range(n)) if all_logits else ([n - 1] if last else [])
            pos = np.arange(start_pos + i, start_pos + i + n, dtype=np.int32)
            t, lg = self.step(chunk, pos, [seq] * n, rows, want_logits)
            tops.append(t)
            if lg is not None:
                logits.append(lg)
        top = np.concatenate(tops)
        return top, (np.concatenate(logits) if logits else None)
