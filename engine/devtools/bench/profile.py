"""`nextn bench --profile`: device time of each kernel of one decode step, with the bytes it reads and its
bandwidth (where the remaining decode time goes), and of one prompt step (time only).

The step's launches run one at a time on a profiling queue (each timed by its OpenCL event, median of
repeats); launches with the same name (the same kernel on the same shape, one per layer) are summed into one
row. Bytes: the weights a launch reads for one token (Launch.weight_bytes; routed experts: the n_used a token
picks) and, for attention, the KV cache it reads (SequenceCache.attention_read_bytes, shared evenly over the
attention launches). Kernels without a byte count (norms, rope, small elementwise ops) show their time only.
Replaying the step advances recurrent state again, so this runs last, on a runner nothing else uses.
"""

from dataclasses import dataclass

import numpy as np
import pyopencl as cl


@dataclass
class KernelRow:
    name: str
    launches: int
    seconds: float  # per step, all its launches
    bytes: int  # per step, all its launches; 0: not counted


def profile_decode_step(runner, prompt: list[int], repeats: int = 5) -> list[KernelRow]:
    """Rows of one decode step after `prompt` in sequence 0, largest time first."""
    runner.eval(0, prompt, 0, want_logits=False)
    runner.step([int(prompt[-1])], [len(prompt)], [0], [0])  # writes the one-token batch inputs
    return _profile(runner, runner.launches[min(runner.launches)], repeats,
                    kv_bytes=runner.cache.attention_read_bytes(len(prompt) + 1))


def profile_prompt_step(runner, prompt: list[int], repeats: int = 3) -> list[KernelRow]:
    """Rows of one step over `prompt` (at most n_batch tokens) from position 0 of sequence 0; time only (a
    prompt step is bound by arithmetic, not bytes)."""
    n = len(prompt)
    runner.step(prompt, list(range(n)), [0] * n, [n - 1])
    return _profile(runner, next(launches for m, launches in sorted(runner.launches.items()) if n <= m), repeats)


def _profile(runner, launches, repeats: int, kv_bytes: int | None = None) -> list[KernelRow]:
    """kv_bytes None: time only; else the bytes of one token's run, attention reading kv_bytes of KV. Launches
    the step does not enqueue (a split attention's combine launch, unsplit) are left out."""
    rt, vars_ = runner.rt, runner._vars
    launches = [launch for launch in launches if launch.runs(vars_)]
    attention = [i for i, launch in enumerate(launches) if launch.name == "attention"]
    experts = [i for i, launch in enumerate(launches) if launch.name.startswith("matmul_id")]
    n_used = runner.hp.n_expert_used if experts else 0  # a MoE architecture's hparams have it
    queue = cl.CommandQueue(rt.ctx, rt.device, properties=cl.command_queue_properties.PROFILING_ENABLE)
    times = np.zeros((repeats, len(launches)))
    for r in range(repeats):
        for i, launch in enumerate(launches):
            for arg, var in launch.dyn_args:
                launch.kernel.set_arg(arg, np.int32(vars_[var]))
            ev = cl.enqueue_nd_range_kernel(queue, launch.kernel, launch.global_size(vars_), launch.local)
            ev.wait()
            times[r, i] = (ev.profile.end - ev.profile.start) * 1e-9
    median = np.median(times, axis=0)
    rows: dict[str, KernelRow] = {}
    for i, launch in enumerate(launches):
        if kv_bytes is None:
            n_bytes = 0
        elif i in attention:
            n_bytes = kv_bytes // len(attention)
        else:
            n_bytes = launch.weight_bytes * (n_used if i in experts else 1)
        row = rows.setdefault(launch.name or "unnamed", KernelRow(launch.name or "unnamed", 0, 0.0, 0))
        row.launches += 1
        row.seconds += float(median[i])
        row.bytes += n_bytes
    return sorted(rows.values(), key=lambda row: -row.seconds)


def print_profile(rows: list[KernelRow], bandwidth_gbs: float, step_seconds: float, what: str = "decode step") -> None:
    total = sum(row.seconds for row in rows)
    print(f"\nper-kernel profile of one {what} ({sum(r.launches for r in rows)} launches, one at a time on a "
          f"profiling queue; device time {total * 1e3:.2f} ms, the plan's step {step_seconds * 1e3:.2f} ms); "
          f"of bw: against the copy kernel's {bandwidth_gbs:.1f} GB/s, which reads and writes (a read-only "
          f"stream can pass 100%)")
    print(f"{'kernel':<40}{'launches':>9}{'us':>9}{'share':>7}{'MiB':>9}{'GB/s':>7}{'of bw':>7}")
    for row in rows:
        mib = f"{row.bytes / 2**20:.2f}" if row.bytes else "-"
        gbs = row.bytes / row.seconds / 1e9 if row.bytes and row.seconds else 0.0
        rate = f"{gbs:.1f}" if gbs else "-"
        of_bw = f"{gbs / bandwidth_gbs:.0%}" if gbs else "-"
        print(f"{row.name[:39]:<40}{row.launches:>9}{row.seconds * 1e6:>9.0f}{row.seconds / total:>7.0%}"
              f"{mib:>9}{rate:>7}{of_bw:>7}")
    counted = [r for r in rows if r.bytes]
    if counted:
        b, s = sum(r.bytes for r in counted), sum(r.seconds for r in counted)
        print(f"{'kernels with a byte count':<40}{sum(r.launches for r in counted):>9}{s * 1e6:>9.0f}"
              f"{s / total:>7.0%}{b / 2**20:>9.2f}{b / s / 1e9:>7.1f}{b / s / 1e9 / bandwidth_gbs:>7.0%}")
