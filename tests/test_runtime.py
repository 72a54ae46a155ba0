"""OpenCL runtime: device choice, the on-disk program cache, build errors, memory accounting."""

import time

import numpy as np
import pyopencl as cl
import pytest

from nextn.cl.runtime import DeviceChoice, Runtime, choose_device, list_devices
from nextn.errors import DeviceError, KernelBuildError, OutOfDeviceMemory

SOURCE = """
__kernel void kernel_scale(__global float *x, const float a) { x[get_global_id(0)] *= a * SCALE; }
"""


@pytest.fixture
def kdir(tmp_path):
    d = tmp_path / "kernels"
    d.mkdir()
    (d / "scale.cl").write_text(SOURCE)
    (d / "broken.cl").write_text("__kernel void kernel_broken(__global float *x) { x[0] = undefined_name; }")
    return d


def test_default_device_and_selection_by_name_and_index():
    dev = choose_device()
    first = list_devices()[0]
    assert choose_device(DeviceChoice(platform=first[0], device=first[2])).int_ptr == first[3].int_ptr
    part = dev.name.split()[0][:6]
    assert choose_device(DeviceChoice(device=part)).name == dev.name


def test_no_matching_device_says_what_exists():
    with pytest.raises(DeviceError) as e:
        choose_device(DeviceChoice(device="no-such-gpu-xyz"))
    assert "no-such-gpu-xyz" in str(e.value) and "available:" in str(e.value)


def test_binary_cache_skips_compilation_on_second_start(kdir, tmp_path):
    cache = tmp_path / "cache"
    t0 = time.perf_counter()
    a = Runtime(cache_dir=cache, kernel_dir=kdir)
    a.build("scale.cl", {"SCALE": 2})
    first = time.perf_counter() - t0
    assert (a.builds_compiled, a.builds_cached) == (1, 0)
    assert len(list(cache.glob("scale-*.bin"))) == 1

    t0 = time.perf_counter()
    b = Runtime(cache_dir=cache, kernel_dir=kdir)
    prg = b.build("scale.cl", {"SCALE": 2})
    second = time.perf_counter() - t0
    assert (b.builds_compiled, b.builds_cached) == (0, 1)
    print(f"first start with compile {first * 1e3:.0f} ms, second from cache {second * 1e3:.0f} ms")

    # the cached binary works
    x = np.arange(8, dtype=np.float32)
    buf = b.upload(x, "x")
    k = b.kernel(prg, "kernel_scale")
    k.set_args(buf, np.float32(1.5))
    cl.enqueue_nd_range_kernel(b.queue, k, (8,), None)
    out = np.empty_like(x)
    cl.enqueue_copy(b.queue, out, buf)
    np.testing.assert_allclose(out, x * 3.0)

    # other -D options are another binary
    b.build("scale.cl", {"SCALE": 3})
    assert b.builds_compiled == 1 and len(list(cache.glob("scale-*.bin"))) == 2


def test_corrupt_cache_entry_is_rebuilt(kdir, tmp_path):
    cache = tmp_path / "cache"
    Runtime(cache_dir=cache, kernel_dir=kdir).build("scale.cl", {"SCALE": 2})
    (entry,) = cache.glob("scale-*.bin")
    entry.write_bytes(b"garbage")
    rt = Runtime(cache_dir=cache, kernel_dir=kdir)
    rt.build("scale.cl", {"SCALE": 2})
    assert rt.builds_compiled == 1


def test_build_error_carries_log(kdir, tmp_path):
    rt = Runtime(cache_dir=tmp_path / "c", kernel_dir=kdir)
    with pytest.raises(KernelBuildError) as e:
        rt.build("broken.cl")
    assert "broken.cl" in str(e.value) and "undefined_name" in e.value.log


def test_memory_that_does_not_fit_says_need_and_have(tmp_path):
    rt = Runtime(cache_dir=tmp_path)
    with pytest.raises(OutOfDeviceMemory) as e:
        rt.check_fits(rt.global_mem_bytes * 2, "model.gguf")
    msg = str(e.value)
    assert "model.gguf needs" in msg and "MiB of device memory but" in msg
    rt.alloc(1 << 20, "probe")
    assert rt.allocated["probe"] == 1 << 20


def test_kernel_cache_is_private_to_its_user_whatever_the_umask(kdir, tmp_path):
    """The cached binaries are native code the service loads: under the unit's UMask=0007 they must still be
    0600 in a 0700 directory, so nobody in the socket's group can replace them."""
    import os
    import stat

    old = os.umask(0o007)
    try:
        rt = Runtime(cache_dir=tmp_path / "cache", kernel_dir=kdir)
        rt.build("scale.cl", {"SCALE": 5})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "cache").stat().st_mode) == 0o700
    (binary,) = (tmp_path / "cache").glob("scale-*.bin")
    assert stat.S_IMODE(binary.stat().st_mode) == 0o600
