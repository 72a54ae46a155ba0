"""What a kernel factory hands to the plan: one prepared kernel launch.

A model step is a list of `Launch` records. Static arguments (buffers, shapes, constants) are set on
the kernel once, when the step is built. What changes from step to step is only the number of tokens
in the batch (`n_tokens`, step variable 0); per-token data (token ids, positions, slot of each token)
lives in device buffers that the host writes before running the plan.

The global size of dimension d is `round_up(global_const[d] + global_per_token[d] * vars[scale_var],
local[d])` (at least local[d], or 1 without a local size), so one prepared kernel serves every batch size
up to the maximum the step was built for. `scale_var` is usually VAR_N_TOKENS; kernels that only touch
the rows whose logits are wanted scale with VAR_N_OUTPUTS. Arguments listed in `dyn_args` as
`(arg_index, var_index)` are set to the int32 step variable before each launch.

Two refinements for kernels whose grid follows more than the batch size (attention split over the KV,
ops/attention.py): `grid_vars` names the step variable of each dimension instead of `scale_var` for all,
and `run_if` = (var, n) enqueues the launch only when vars[var] >= n (the split's combine launch).
"""

from dataclasses import dataclass, field

import pyopencl as cl

VAR_N_TOKENS = 0  # tokens in this batch
VAR_N_OUTPUTS = 1  # rows of the batch whose logits are computed (last token of a prompt, every draft)
VAR_N_SAVED = 2  # leading rows of the batch whose recurrent-layer inputs are kept for a rollback (drafts)
VAR_N_SPLITS = 3  # parts each sequence's KV is split into for attention (flash-decoding; 1: not split)
N_VARS = 4


@dataclass
class Launch:
    kernel: cl.Kernel
    global_const: tuple[int, ...]
    global_per_token: tuple[int, ...]
    local: tuple[int, ...] | None = None
    dyn_args: list[tuple[int, int]] = field(default_factory=list)
    scale_var: int = VAR_N_TOKENS
    name: str = ""  # for profiling and error messages; llama.cpp-style tensor name when it has one
    weight_bytes: int = 0  # bytes of weights one token's run reads (the per-kernel profile's bytes)
    grid_vars: tuple[int, ...] | None = None  # the step variable of each dimension (default: scale_var)
    run_if: tuple[int, int] | None = None  # (var, n): enqueued only when vars[var] >= n

    def runs(self, vars) -> bool:
        return self.run_if is None or int(vars[self.run_if[0]]) >= self.run_if[1]

    def grid_var(self, d: int) -> int:
        return self.scale_var if self.grid_vars is None else self.grid_vars[d]

    def global_size(self, vars) -> tuple[int, ...]:
        out = []
        for d, (c, m) in enumerate(zip(self.global_const, self.global_per_token)):
            g = c + m * int(vars[self.grid_var(d)])
            if self.local is not None and self.local[d]:
                g = -(-g // self.local[d]) * self.local[d]
            out.append(max(g, 1) if self.local is None else max(g, self.local[d]))
        return tuple(out)
