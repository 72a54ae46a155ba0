"""The training corpus: the Python standard library's own source (*.py under sysconfig's stdlib path), which
every machine with Python has offline. Licensed under the PSF License Agreement (CPython's LICENSE).

Left out: site-packages / dist-packages (not the stdlib), the test suites (test/, tests/, idle_test/: much
of them is data rather than code), pydoc_data (one 750 kB string of documentation) and the generated codec
tables of encodings/ (cp*.py, mac_*.py ...). HELD_OUT is a fixed list of modules that are never trained on,
neither by the vocabulary nor by the model: acceptance and loss are measured on them.
"""

import os
import sys
import sysconfig
from pathlib import Path

SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "pydoc_data", "encodings", "__pycache__"}
HELD_OUT = (
    "bisect.py", "calendar.py", "colorsys.py", "csv.py", "fractions.py", "graphlib.py", "heapq.py",
    "json/encoder.py", "shlex.py", "statistics.py", "string.py", "textwrap.py",
)
EOT = "<|endoftext|>"  # between files


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def python_version() -> str:
    return f"CPython {sys.version.split()[0]}"


def stdlib_files(root: Path | None = None) -> list[str]:
    """Relative paths of the corpus files, sorted (so every run sees the same list)."""
    root = stdlib_root() if root is None else root
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS)
        for f in files:
            if f.endswith(".py"):
                out.append(Path(d, f).relative_to(root).as_posix())
    return sorted(out)


def read(rel: str, root: Path | None = None) -> str:
    root = stdlib_root() if root is None else root
    return (root / rel).read_text(encoding="utf-8", errors="replace")


def split(root: Path | None = None) -> tuple[list[str], list[str]]:
    """(training files, held-out files); every HELD_OUT file must exist."""
    files = stdlib_files(root)
    missing = [f for f in HELD_OUT if f not in files]
    if missing:
        raise SystemExit(f"train: held-out files missing from {stdlib_root()}: {', '.join(missing)}")
    return [f for f in files if f not in HELD_OUT], list(HELD_OUT)
