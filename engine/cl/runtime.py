"""OpenCL runtime: device choice, program builds with an on-disk binary cache, memory accounting.

pyopencl owns every OpenCL object; this module decides which device to use, builds each program once
(compiled binaries are cached on disk keyed by device, driver, source and options, so a second start
skips compilation), and counts the device memory the model asks for before it asks.
"""

import hashlib
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pyopencl as cl

from nextn.errors import DeviceError, KernelBuildError, OutOfDeviceMemory

KERNEL_DIR = Path(str(resources.files("nextn") / "kernels"))


def default_cache_dir() -> Path:
    """$CACHE_DIRECTORY under systemd (CacheDirectory=), else $XDG_CACHE_HOME/nextn/kernels."""
    if os.environ.get("NEXTN_KERNEL_CACHE"):
        return Path(os.environ["NEXTN_KERNEL_CACHE"])
    if os.environ.get("CACHE_DIRECTORY"):
        return Path(os.environ["CACHE_DIRECTORY"].split(":")[0]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "nextn" / "kernels"


@dataclass(frozen=True)
class DeviceChoice:
    """Which device to use: by index or by case-insensitive name substring; None = default."""

    platform: int | str | None = None
    device: int | str | None = None

    @classmethod
    def parse(cls, platform: str | None, device: str | None) -> "DeviceChoice":
        """From flag or configuration text: digits are an index, other text a name substring; None or ""
        is the default."""

        def one(v):
            if v is None or str(v) == "":
                return None
            return int(v) if str(v).isdigit() else str(v)

        return cls(platform=one(platform), device=one(device))


def _matches(obj, sel, index: int) -> bool:
    if sel is None:
        return True
    if isinstance(sel, int):
        return index == sel
    return str(sel).lower() in obj.name.lower()


def list_devices() -> list[tuple[int, cl.Platform, int, cl.Device]]:
    try:
        platforms = cl.get_platforms()
    except cl.Error as e:  # no ICD installed at all
        raise DeviceError(f"no OpenCL platform found ({e}); install an OpenCL driver (for the CPU: pocl)") from e
    out = []
    for pi, p in enumerate(platforms):
        try:
            devs = p.get_devices()
        except cl.Error:
            continue
        for di, d in enumerate(devs):
            out.append((pi, p, di, d))
    return out


def choose_device(choice: DeviceChoice = DeviceChoice()) -> cl.Device:
    """The chosen device; by default the first GPU, else the first device of any type (PoCL's CPU)."""
    candidates = [
        d
        for pi, p, di, d in list_devices()
        if _matches(p, choice.platform, pi) and _matches(d, choice.device, di)
    ]
    if not candidates:
        have = "; ".join(f"platform {pi} '{p.name}' device {di} '{d.name}'" for pi, p, di, d in list_devices())
        raise DeviceError(
            f"no OpenCL device matches platform={choice.platform!r} device={choice.device!r} "
            f"(available: {have or 'none'})"
        )
    gpus = [d for d in candidates if d.type & cl.device_type.GPU]
    return (gpus or candidates)[0]


class Runtime:
    """One device, its context and in-order queue, built programs and a memory ledger."""

    def __init__(self, choice: DeviceChoice = DeviceChoice(), cache_dir: Path | None = None, kernel_dir: Path | None = None):
        self.device = choose_device(choice)
        self.kernel_dir = Path(kernel_dir) if kernel_dir is not None else KERNEL_DIR
        self.ctx = cl.Context([self.device])
        self.queue = cl.CommandQueue(self.ctx, self.device)
        self.cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
        self._programs: dict[tuple, cl.Program] = {}
        self.allocated: dict[str, int] = {}  # label -> bytes, for `inspect` and error messages
        self.builds_compiled = 0  # programs compiled from source in this process (vs loaded from cache)
        self.builds_cached = 0

    # -- identity -----------------------------------------------------------------------------------

    @property
    def device_key(self) -> str:
        d = self.device
        return f"{d.platform.name}|{d.platform.version}|{d.name}|{d.driver_version}|{d.version}"

    @property
    def global_mem_bytes(self) -> int:
        return int(self.device.global_mem_size)

    @property
    def max_alloc_bytes(self) -> int:
        return int(self.device.max_mem_alloc_size)

    def describe(self) -> str:
        d = self.device
        return f"{d.name.strip()} ({d.platform.name.strip()}, {d.driver_version}, {self.global_mem_bytes / 2**30:.1f} GiB)"

    # -- programs -----------------------------------------------------------------------------------

    def build(self, filename: str, defines: dict | None = None, extra_options: tuple[str, ...] = (),
              directory: Path | None = None) -> cl.Program:
        """Build engine/kernels/<filename> (or <directory>/<filename>: the tests' own kernels) with -D defines,
        once per process, cached on disk."""
        defines = defines or {}
        where = self.kernel_dir if directory is None else Path(directory)
        options = [f"-I{self.kernel_dir}", "-cl-std=CL1.2", "-cl-mad-enable", *extra_options]
        options += [f"-D{k}={v}" for k, v in sorted(defines.items())]
        source = (where / filename).read_text()
        # Included headers take part in the key: a changed header must rebuild every program.
        headers = "".join(p.read_text() for p in sorted(self.kernel_dir.glob("*.h")))
        key = (str(where / filename), tuple(options))
        if key in self._programs:
            return self._programs[key]
        digest = hashlib.sha256("\0".join([self.device_key, source, headers, *options]).encode()).hexdigest()[:32]
        cache_file = self.cache_dir / f"{Path(filename).stem}-{digest}.bin"
        prg = None
        if cache_file.exists():
            try:
                prg = cl.Program(self.ctx, [self.device], [cache_file.read_bytes()]).build(options=options)
                self.builds_cached += 1
            except (cl.Error, OSError):
                prg = None  # a stale or foreign binary: rebuild from source
        if prg is None:
            try:
                prg = cl.Program(self.ctx, source).build(options=options)
            except cl.RuntimeError as e:
                raise KernelBuildError(f"building kernels/{filename} for {self.device.name} failed", str(e)) from e
            self.builds_compiled += 1
            try:
                # the binaries are native code the service loads: only its user may write them, whatever the
                # umask (the unit's UMask=0007 would make them group-writable)
                self.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(prg.get_info(cl.program_info.BINARIES)[0])
                os.chmod(tmp, 0o600)  # O_CREAT's mode is masked by the umask; this is not
                tmp.replace(cache_file)
            except OSError:
                pass  # a read-only cache is not an error, only a slower next start
        self._programs[key] = prg
        return prg

    def kernel(self, program: cl.Program, name: str) -> cl.Kernel:
        """A fresh kernel object (each launch in a plan owns one, with its own bound arguments)."""
        return cl.Kernel(program, name)

    # -- memory -------------------------------------------------------------------------------------

    def check_fits(self, need_bytes: int, what: str) -> None:
        have = self.global_mem_bytes
        if need_bytes > have:
            raise OutOfDeviceMemory(
                f"{what} needs {need_bytes / 2**20:.1f} MiB of device memory but {self.device.name.strip()} "
                f"has {have / 2**20:.1f} MiB"
            )

    def alloc(self, nbytes: int, label: str, flags=cl.mem_flags.READ_WRITE) -> cl.Buffer:
        nbytes = max(int(nbytes), 4)
        if nbytes > self.max_alloc_bytes:
            raise OutOfDeviceMemory(
                f"{label} needs one buffer of {nbytes / 2**20:.1f} MiB; {self.device.name.strip()} allows at "
                f"most {self.max_alloc_bytes / 2**20:.1f} MiB per buffer"
            )
        try:
            buf = cl.Buffer(self.ctx, flags, nbytes)
        except cl.Error as e:
            raise OutOfDeviceMemory(f"allocating {label} ({nbytes / 2**20:.1f} MiB) failed: {e}") from e
        self.allocated[label] = self.allocated.get(label, 0) + nbytes
        return buf

    def upload(self, array: np.ndarray, label: str) -> cl.Buffer:
        array = np.ascontiguousarray(array)
        buf = self.alloc(array.nbytes, label, cl.mem_flags.READ_WRITE)
        cl.enqueue_copy(self.queue, buf, array, is_blocking=True)
        return buf

    @property
    def allocated_bytes(self) -> int:
        return sum(self.allocated.values())
