"""Device copy bandwidth (kernels/copy.cl): the roof that kernel figures are measured against."""

import numpy as np
import pyopencl as cl

from nextn.ops.norm import check_buffer

VECTORS = {"f4": 16, "f16": 64}  # kernel variant -> bytes per work-item
LOCAL = 64


def copy_launch(rt, src, dst, nbytes: int, variant: str = "f16") -> tuple[cl.Kernel, tuple[int], tuple[int]]:
    """A prepared copy of nbytes (a multiple of LOCAL * vector bytes): (kernel, global, local)."""
    step = VECTORS[variant] * LOCAL
    if nbytes <= 0 or nbytes % step:
        raise ValueError(f"copy: nbytes={nbytes} must be a positive multiple of {step}")
    check_buffer(src, nbytes, "copy src")
    check_buffer(dst, nbytes, "copy dst")
    k = rt.kernel(rt.build("copy.cl"), f"kernel_copy_{variant}")
    k.set_args(src, dst)
    return k, (nbytes // VECTORS[variant],), (LOCAL,)


def copy_bandwidths(rt, nbytes: int = 256 << 20, repeats: int = 5) -> dict[str, float]:
    """variant -> median GB/s (bytes read + bytes written per second) over `repeats` timed copies."""
    step = max(VECTORS.values()) * LOCAL
    # two buffers must fit; a device with little memory measures a smaller copy
    nbytes = min(int(nbytes), rt.max_alloc_bytes, rt.global_mem_bytes // 4)
    nbytes -= nbytes % step
    if nbytes <= 0:
        raise ValueError("measure_bandwidth: nbytes too small")
    # scratch buffers, freed on return: made directly rather than through rt.alloc so that they do not
    # enter the runtime's ledger of the model's memory
    src = cl.Buffer(rt.ctx, cl.mem_flags.READ_WRITE, nbytes)
    dst = cl.Buffer(rt.ctx, cl.mem_flags.READ_WRITE, nbytes)
    queue = cl.CommandQueue(rt.ctx, rt.device, properties=cl.command_queue_properties.PROFILING_ENABLE)
    try:
        # touch every page first: a first-touch page fault is not bandwidth
        cl.enqueue_fill_buffer(queue, src, np.float32(1.0), 0, nbytes)
        cl.enqueue_fill_buffer(queue, dst, np.float32(0.0), 0, nbytes)
        out = {}
        for variant in VECTORS:
            k, gsize, lsize = copy_launch(rt, src, dst, nbytes, variant)
            cl.enqueue_nd_range_kernel(queue, k, gsize, lsize).wait()  # warm-up (PoCL compiles at first use)
            times = []
            for _ in range(max(1, repeats)):
                ev = cl.enqueue_nd_range_kernel(queue, k, gsize, lsize)
                ev.wait()
                times.append((ev.profile.end - ev.profile.start) * 1e-9)
            out[variant] = 2 * nbytes / float(np.median(times)) / 1e9
        return out
    finally:
        queue.finish()
        src.release()
        dst.release()


def measure_bandwidth(rt, nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Device copy bandwidth in GB/s: the better of the float4 and float16 copies (median of repeats)."""
    return max(copy_bandwidths(rt, nbytes, repeats).values())
