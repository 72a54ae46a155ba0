"""Chat templates rendered as transformers' apply_chat_template renders them, then tokenized."""

import json
import re
from datetime import datetime

import pytest
from nextn.chat_template import ChatTemplate
from nextn.errors import ModelLoadError, RequestError
from nextn.tokenizer import Tokenizer
from tokenizer_data import TEMPLATE_DIR, tiny_meta, vocab_meta, vocab_tokenizer

# Qwen3.5's template as llama.cpp keeps it (models/templates/Qwen3.5-4B.jinja, Apache-2.0 like Qwen's
# models); the vocabulary test file itself carries Qwen2's shorter ChatML template.
QWEN35_TEMPLATE = (TEMPLATE_DIR / "Qwen3.5-4B.jinja").read_text()

# A Llama-3-style template in the shape Meta's use: bos_token, a dated default system message
# through strftime_now, and raise_exception on roles it does not know.
LLAMA3_STYLE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "Today Date: " + strftime_now("%d %b %Y") %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" + system_message + "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception("Only user and assistant roles are supported, got " + message['role']) }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\nEasy.\n</think>\n\n4"},
    {"role": "user", "content": "And 3+3?"},
]


@pytest.fixture(scope="module")
def qwen35():
    """The qwen35 vocabulary with Qwen3.5's real template (passed as an override)."""
    return Tokenizer.from_metadata(vocab_meta("qwen35"), chat_template=QWEN35_TEMPLATE)


def test_file_template_qwen35():
    tok = vocab_tokenizer("qwen35")
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    no_prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert no_prompt == text.removesuffix("<|im_start|>assistant\n")
    ids = tok.encode(text, add_special=False, parse_special=True)
    assert ids.count(151644) == 3 and ids.count(151645) == 2
    assert tok.decode(ids) == text


def test_qwen35_thinking_on_and_off(qwen35):
    thinking = qwen35.apply_chat_template(CHAT)
    quiet = qwen35.apply_chat_template(CHAT, enable_thinking=False)
    common = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        # reasoning of turns before the last user message is dropped
        "<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert thinking == common + "<think>\n"
    assert quiet == common + "<think>\n\n</think>\n\n"
    ids = qwen35.encode(quiet, add_special=False, parse_special=True)
    assert ids[0] == 151644 and ids.count(151645) == 4


def test_qwen35_tools_and_tool_calls(qwen35):
    tools = [{"type": "function", "function": {"name": "weather", "description": "Wetter <heute> in Zürich"}}]
    messages = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "weather", "arguments": {"days": [1, 2]}}}
            ],
        },
        {"role": "tool", "content": "sunny"},
    ]
    text = qwen35.apply_chat_template(messages, tools=tools)
    # tojson as transformers has it: no HTML escaping, no ASCII escaping
    assert json.dumps(tools[0], ensure_ascii=False) in text
    assert "<function=weather>\n<parameter=days>\n[1, 2]\n</parameter>" in text
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n" in text


def test_template_errors_are_request_errors(qwen35):
    with pytest.raises(RequestError, match="System message must be at the beginning"):
        qwen35.apply_chat_template([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])
    with pytest.raises(RequestError, match="No messages provided"):
        qwen35.apply_chat_template([])


def test_llama_style_template():
    tok = Tokenizer.from_metadata(vocab_meta("llama-bpe"), chat_template=LLAMA3_STYLE)
    text = tok.apply_chat_template([{"role": "user", "content": "  Hi  "}])
    today = datetime.now().strftime("%d %b %Y")
    assert text == (
        f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nToday Date: {today}<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = tok.encode(text, add_special=False, parse_special=True)
    assert ids[0] == 128000 and ids.count(128009) == 2  # BOS from the template, two <|eot_id|>
    with pytest.raises(RequestError, match="Only user and assistant roles are supported, got tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_llama2_style_template_with_spm_vocab():
    template = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    )
    tok = Tokenizer.from_metadata(vocab_meta("llama-spm"), chat_template=template)
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text = tok.apply_chat_template(chat)
    assert text == "<s>[INST] Hi [/INST] Hello</s>"
    ids = tok.encode(text, add_special=False, parse_special=True)
    assert ids[0] == 1 and ids[-1] == 2


def test_chatml_fallback_without_template():
    tok = Tokenizer.from_metadata(tiny_meta())
    assert tok.chat_template.is_fallback
    parts = [
        {"type": "text", "text": "look: "},
        {"type": "image_url", "image_url": {"url": "x"}},
        {"type": "text", "text": "ok"},
    ]
    text = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": parts}])
    assert (
        text
        == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nlook: ok<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok.encode(text, parse_special=True)
    assert ids.count(257) == 3 and ids.count(258) == 2


def test_template_from_the_file_is_used():
    tok = Tokenizer.from_metadata(tiny_meta(chat_template="{{ messages[0]['content'] | upper }}"))
    assert not tok.chat_template.is_fallback
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "HI"


def test_broken_template_is_a_load_error():
    with pytest.raises(ModelLoadError, match="chat template does not parse"):
        Tokenizer.from_metadata(tiny_meta(chat_template="{% for m in messages %}no end"))


def test_sandbox():
    assert ChatTemplate("{{ ''.__class__ }}").render([]) == ""  # unsafe attributes are undefined
    with pytest.raises(RequestError, match="unsafe"):
        ChatTemplate("{{ messages.__class__.__mro__ }}").render([])  # ... and going further is refused
    with pytest.raises(RequestError, match="unsafe"):
        ChatTemplate("{{ messages.append(1) }}").render([])  # the inputs are immutable to a template


def test_transformers_extensions():
    ct = ChatTemplate(
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% generation %}{{ m['content'] }};{% endgeneration %}{% endfor %}"
        "{{ messages[0] | tojson(indent=1) }}"
    )
    msgs = [
        {"role": "user", "content": "a<b>"},
        {"role": "user", "content": "é"},
        {"role": "user", "content": "c"},
    ]
    assert ct.render(msgs) == 'a<b>;é;{\n "role": "user",\n "content": "a<b>"\n}'


def test_trim_and_lstrip_blocks():
    # transformers renders with trim_blocks and lstrip_blocks: block tags leave no newlines or indent
    ct = ChatTemplate(
        "{% for m in messages %}\n    {% if true %}\n[{{ m['content'] }}]\n    {% endif %}\n{% endfor %}"
    )
    assert ct.render([{"content": "x"}, {"content": "y"}]) == "[x]\n[y]\n"


def test_date_string_default():
    ct = ChatTemplate("{{ strftime_now('%Y') }}")
    assert re.fullmatch(r"\d{4}", ct.render([]))
