"""The embedded default model: a small qwen35 (Qwen3.5 architecture) code model with its MTP block, trained by
nextn itself on the Python standard library's source (tools/train/, README "The embedded default model").
It ships as package data, so `nextn serve`, `nextn generate` and the service run with no model configured and
no download; config.load fills model.path with it when neither a file nor a flag sets one."""

from pathlib import Path

NAME = "nextn-stdlib-qwen35-mtp.gguf"
SOURCE = "embedded default model"  # config.Config.sources["model.path"] when model.path was filled with it


def path() -> Path:
    return Path(__file__).resolve().parent / "data" / NAME


def describe(cfg) -> str:
    """cfg.model.path, saying so when it is the embedded default (for the first log line)."""
    if cfg.sources.get("model.path") == SOURCE:
        return f"the embedded default model {cfg.model.path} (no model configured: set [model] path or pass -m)"
    return str(cfg.model.path)
