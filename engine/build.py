"""The composition root: from a configuration to a loaded model and its scheduler, the same way for
`nextn serve`, `nextn generate` and `nextn bench`.

Order: the speculative settings decide what the runner loads (the MTP block, rollback state for recurrent
layers), so they are read first; every byte is counted against the device before anything is uploaded
(runner); a draft model shares the device and the context size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from nextn.errors import ConfigError

log = logging.getLogger("nextn.build")


@dataclass
class Engine:
    runner: object  # nextn.runner.ModelRunner
    scheduler: object  # nextn.scheduler.Scheduler (not started)
    spec: object  # nextn.spec.speculator.SpecConfig
    draft: object | None  # the draft model's ModelRunner (draft-simple), or None

    @property
    def model_name(self) -> str:
        return self.runner.file.path.name


def log_progress(step: float = 0.2, also=None):
    """A progress reporter that logs the upload every `step` of the weights (a long load is not silent), and
    passes the percentage to `also` (the server's systemd status line) as well."""
    last = [0.0]

    def report(fraction: float) -> None:
        if fraction >= last[0] + step or fraction >= 1.0 > last[0]:
            last[0] = fraction
            log.info("loading weights: %d%%", round(100 * fraction))
            if also is not None:
                also(round(100 * fraction))

    return report


def build(cfg, *, progress=None, warm_up: bool = True) -> Engine:
    """Load cfg.model.path (and a draft model) onto cfg.device and make the scheduler for cfg.server.parallel
    slots. progress: True for a progress bar, a callable given the fraction of the weights uploaded, or None
    to log it. warm_up: run one token through every kernel first, so the first request does not pay for it."""
    from nextn.cl.runtime import DeviceChoice, Runtime
    from nextn.memory.kv_cache import KVTypes
    from nextn.runner import ModelRunner
    from nextn.scheduler import Scheduler
    from nextn.spec.speculator import from_config as spec_from_config

    if not cfg.model.path:
        raise ConfigError("no model: set [model] path in the configuration or pass --model")
    spec = spec_from_config(cfg.speculative)
    rt = Runtime(DeviceChoice.parse(cfg.device.platform, cfg.device.device))
    log.info("device: %s", rt.describe())  # which device, platform and driver: "is my GPU used?"
    sp = cfg.speculative
    kv = KVTypes(cfg.model.cache_type_k, cfg.model.cache_type_v, sp.draft_type_k, sp.draft_type_v)
    # the MTP block and the rollback state are counted in the memory check before anything is uploaded
    runner = ModelRunner(cfg.model.path, rt=rt, n_ctx=cfg.model.ctx_size or None, n_seq=cfg.server.parallel,
                         n_batch=cfg.model.batch_size, mtp=spec.uses_mtp, speculative=spec.enabled,
                         progress=log_progress() if progress is None else progress, kv_types=kv,
                         batch_invariant=cfg.model.batch_invariant, draft_vocab=sp.draft_vocab)
    log.info("device memory: %s", ", ".join(f"{k.replace('_', ' ')} {v / 2**20:.1f} MiB"
                                            for k, v in runner.memory.items()))
    if spec.enabled:
        log.info("speculative decoding: %s, up to %d drafts%s%s", ",".join(spec.types), spec.n_max,
                 " (adaptive)" if spec.adaptive else "",
                 "; SYNTHETIC ACCEPTANCE: output is not valid" if spec.synthetic else "")
    if warm_up:
        runner.eval(0, [runner.tokenizer.bos_id if runner.tokenizer.bos_id is not None else 0], 0)
        runner.truncate(0, 0)
    draft = None
    if spec.uses_draft_model:
        draft = ModelRunner(spec.draft_model, rt=rt, n_ctx=runner.n_ctx, n_seq=cfg.server.parallel,
                            n_batch=cfg.model.batch_size, kv_types=KVTypes(sp.draft_type_k, sp.draft_type_v),
                            batch_invariant=cfg.model.batch_invariant)
        log.info("draft model %s: %.1f MiB", Path(spec.draft_model).name, draft.memory.total / 2**20)
    scheduler = Scheduler(runner, cfg.server.parallel, cfg.server.max_queue, spec=spec, draft_runner=draft)
    return Engine(runner, scheduler, spec, draft)
