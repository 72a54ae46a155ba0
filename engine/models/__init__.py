"""Architectures nextn runs, by `general.architecture`. An explicit table: a name read from an untrusted
file never chooses a module to import."""

from nextn.errors import UnsupportedArchitecture
from nextn.models import llama, qwen3, qwen35

ARCHITECTURES = {
    "qwen3": qwen3,
    "llama": llama,
    "qwen35": qwen35,
    "qwen35moe": qwen35,
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


def family(mod):
    """The module holding an architecture's tensors, cache and step: its FAMILY (the dense decoder shared by
    qwen3 and llama), or the architecture module itself (qwen35)."""
    return getattr(mod, "FAMILY", mod)
