"""Type stub of nextn._launch (pyx/_launch.pyx): the native plan and per-step host I/O.

The plain-pyopencl twin with the same interface is nextn.cl.plan (PyPlan, py_enqueue_write, ...); its
module docstring states the semantics both share.
"""

from collections.abc import Sequence

import numpy as np
import pyopencl as cl

from nextn.cl.launch import Launch

DYN_UNSET: int  # marks a dyn argument no plan has set yet in a kernel's record
DYN_CACHE_ATTR: str  # attribute of a pyopencl Kernel holding that record (np.int64 array, one per argument)

class Plan:
    """Prepared launches of one step, enqueued in order by a C loop with the GIL released."""

    def __init__(self, queue: cl.CommandQueue, launches: Sequence[Launch]) -> None:
        """Snapshots the launches; ValueError for an out-of-order queue or an inconsistent launch."""
    @property
    def n_launches(self) -> int: ...
    def run(self, vars: np.ndarray) -> None:
        """`vars`: C-contiguous np.int32 step variables. Sets changed dyn args, enqueues every launch with
        Launch.global_size(vars); no wait, no flush. IndexError if `vars` is too short; CLCallError (with
        .launch_index and .launch_name) if an OpenCL call fails."""

def enqueue_write(
    queue: cl.CommandQueue, buffer: cl.Buffer, array: np.ndarray, offset_bytes: int = 0
) -> None:
    """Non-blocking write; the module holds `array` until finish() or a blocking read on the queue."""

def enqueue_read(queue: cl.CommandQueue, buffer: cl.Buffer, array: np.ndarray, offset_bytes: int = 0) -> None:
    """Blocking read into a writeable C-contiguous array."""

def finish(queue: cl.CommandQueue) -> None: ...
def _dyn_cache(kernel: cl.Kernel, reset_args: Sequence[int] = ()) -> np.ndarray: ...
def _check_launch(index: int, launch: Launch, num_args: int) -> None: ...
def _check_queue(queue: cl.CommandQueue) -> None: ...
