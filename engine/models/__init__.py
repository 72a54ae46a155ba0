"""Architectures nextn runs, by `general.architecture`. An explicit table: a name read from an untrusted
file never chooses a module to import. Adding one: docs/architecture.md's checklist."""

from nextn.errors import UnsupportedArchitecture
from nextn.models import glm4moe, llama, qwen2, qwen3, qwen35, step35
from nextn.models.base import Architecture

ARCHITECTURES: dict[str, Architecture] = {
    "qwen3": qwen3.ARCH,
    "llama": llama.ARCH,
    "qwen2": qwen2.ARCH,
    "qwen35": qwen35.ARCH,
    "qwen35moe": qwen35.ARCH_MOE,
    "glm4moe": glm4moe.ARCH,
    "step35": step35.ARCH,
}

# Names other converters or older files use for an architecture nextn runs with the same math.
ALIASES: dict[str, str] = {}


def architecture(name: str, path=None) -> Architecture:
    """The architecture `name`, or UnsupportedArchitecture naming the file and what is supported."""
    arch = ARCHITECTURES.get(ALIASES.get(name, name))
    if arch is None:
        where = f"{path}: " if path else ""
        raise UnsupportedArchitecture(
            f"{where}architecture '{name}' is not supported (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    return arch
