"""Architectures nextn runs, by `general.architecture`. An explicit table: a name read from an untrusted
file never chooses a module to import."""

from nextn.errors import UnsupportedArchitecture
from nextn.models import llama, qwen3

ARCHITECTURES = {
    "qwen3": qwen3,
    "llama": llama,
}

# Names other converters or older files use for an architecture nextn runs with the same math.
ALIASES: dict[str, str] = {}


def architecture(name: str, path=None):
    """The module of architecture `name`, or UnsupportedArchitecture naming the file and what is supported."""
    mod = ARCHITECTURES.get(ALIASES.get(name, name))
    if mod is None:
        where = f"{path}: " if path else ""
        raise UnsupportedArchitecture(
            f"{where}architecture '{name}' is not supported (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    return mod
