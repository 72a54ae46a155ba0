"""Chat templates: the Jinja template a GGUF file carries (`tokenizer.chat_template`), rendered the way
Hugging Face transformers renders it, so that templates written for `apply_chat_template` work as is.

The environment matches transformers' (`ImmutableSandboxedEnvironment`, trim_blocks, lstrip_blocks,
loop controls, a `{% generation %}` block that renders its body, `tojson` without HTML escaping,
`raise_exception`, `strftime_now`). A template comes from a model file, so it runs sandboxed: it can
read what it is given and call string methods, never touch the host.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, ClassVar

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from nextn.errors import ModelLoadError, RequestError

# Used when the file has no template: ChatML, which Qwen and many fine-tunes speak.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + render_text(message['content']) + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False
) -> str:
    # transformers' tojson: plain json.dumps (Jinja's own escapes <, >, & and ' for HTML)
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _render_text(content: Any) -> str:
    """Message content as text: a string, or the text parts of an OpenAI-style list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text"
        )
    return str(content)


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant tokens with it): renders
    the body unchanged."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationBlock], autoescape=False
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["render_text"] = _render_text
    return env


class ChatTemplate:
    """A compiled chat template. `source=None` means the file has none: ChatML is used."""

    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = ""):
        self.is_fallback = not source
        self.source = CHATML_TEMPLATE if self.is_fallback else source
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise ModelLoadError(
                f"the chat template does not parse (line {e.lineno}: {e.message}); "
                "give a working template to use this model for chat"
            ) from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The prompt text for `messages`. Errors the template raises (e.g. "System message must be
        at the beginning") and malformed messages become RequestError (HTTP 400)."""
        variables = {
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "tools": None,
            "documents": None,
        }
        variables.update(kwargs)
        try:
            return self._template.render(**variables)
        except jinja2.TemplateError as e:
            raise RequestError(f"chat template: {e.message or type(e).__name__}") from None
        except (TypeError, KeyError, AttributeError, IndexError, ValueError) as e:
            raise RequestError(f"chat template failed on these messages: {type(e).__name__}: {e}") from None
