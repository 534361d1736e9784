"""Chat templates: a checkpoint's jinja template against transformers' own apply_chat_template (a Qwen3-style
template written here: system prompt, tools, multi-turn, image parts, reasoning, an enable_thinking branch); the
ChatML fallback against the Processor's encode_chat; where templates are found; sandbox rules."""

import functools
import json
import os

import jinja2
import pytest
from transformers import AutoTokenizer

from tests.data_utils import random_image
from uhd_jax.config import tiny_config
from uhd_jax.data.processor import Processor, SampleRequest
from uhd_jax.data.tiny_tokenizer import write_tiny_model_dir
from uhd_jax.infer.chat import THINK_OFF_PREFIX, ChatTemplate, load_chat_template, render_jinja

# Qwen3-style: uses namespace, loop.index0, reversed loops with break, raise_exception, tojson, `is defined`,
# a {% generation %} block, the tokenizer's eos_token / image_token, and leading/trailing whitespace control.
TEMPLATE = r"""{%- if tools %}
{{- '<|im_start|>system\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}
{{- "# Tools\n<tools>" }}
{%- for tool in tools %}
{{- "\n" }}{{- tool | tojson }}
{%- endfor %}
{{- "\n</tools><|im_end|>\n" }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}
{%- for message in messages %}
    {%- if message.role not in ['system', 'user', 'assistant', 'tool'] %}
        {{- raise_exception('bad role ' + message.role) }}
    {%- endif %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = namespace(text='') %}
        {%- for part in message.content %}
            {%- if part.type == 'image' %}{% set content.text = content.text + image_token %}
            {%- elif part.type == 'text' %}{% set content.text = content.text + part.text %}{% endif %}
            {%- if not loop.last %}{% set content.text = content.text + '\n' %}{% endif %}
        {%- endfor %}
        {%- set content = content.text %}
    {%- endif %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant\n' }}
        {%- if loop.index0 > ns.last_user and message.reasoning_content is defined %}
            {{- '<think>\n' + message.reasoning_content.strip('\n') + '\n</think>\n\n' }}
        {%- endif %}
        {% generation %}{{- content }}{{ '<|im_end|>' }}{% endgeneration %}
        {{- '\n' }}
    {%- elif message.role == 'tool' %}
        {{- '<|im_start|>user\n<tool_response>\n' + content + '\n</tool_response><|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
{%- if eos_token is defined and messages | length > 5 %}{{ eos_token }}{% endif %}"""

IMG = random_image(60, 80, seed=1)

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hello there."}],
    "multi_turn_images": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "image", "image": IMG}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A gradient.", "reasoning_content": None},
        {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "image", "image": "b.png"}]},
        {"role": "assistant", "content": "Another one.", "reasoning_content": "\nLooking closely.\n"},
        {"role": "user", "content": "Thanks!"},
    ],
    "reasoning_alias": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "thinking": "two and two"},
    ],
    "tool": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Calling."},
        {"role": "tool", "content": '{"temp": 21}'},
    ],
}
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Ünïcode & <html>",
                                           "parameters": {"type": "object", "properties": {}}}}]


@functools.lru_cache(maxsize=None)
def _model_dir(tmp_root, template: str | None):
    path = os.path.join(tmp_root, f"model_{abs(hash(template))}")
    write_tiny_model_dir(path, tiny_config())
    if template is not None:
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write(template)
    return path


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("chat"))


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt,enable_thinking", [(False, None), (True, None), (True, False),
                                                                   (True, True)])
def test_template_matches_transformers(tmp_root, name, add_generation_prompt, enable_thinking):
    d = _model_dir(tmp_root, TEMPLATE)
    tok = AutoTokenizer.from_pretrained(d)
    msgs = CONVERSATIONS[name]
    kw = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    tools = TOOLS if name == "tool" else None
    want = tok.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt,
                                   **kw)
    chat = ChatTemplate.from_pretrained(d)
    got = chat.render(msgs, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking,
                      tools=tools)
    assert got == want
    if add_generation_prompt and enable_thinking is False:
        assert got.removesuffix("<|im_end|>").endswith("<|im_start|>assistant\n" + THINK_OFF_PREFIX)


def test_build_prompt_images_in_order(tmp_root):
    chat = ChatTemplate.from_pretrained(_model_dir(tmp_root, TEMPLATE))
    free = random_image(40, 40, seed=2)
    msgs = [{"role": "user", "content": [{"type": "image", "image": IMG}, "compare with <|image_pad|>"]},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": "and"}, {"type": "image", "image": "c.png"}]}]
    prompt, images = chat.build_prompt(msgs, [free])
    assert images == [IMG, free, "c.png"]
    assert prompt.count("<|image_pad|>") == 3 and prompt.endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="images given"):
        chat.build_prompt(msgs, [])
    other = ChatTemplate(TEMPLATE.replace("image_token", "'<img>'"), chat.special_tokens)
    with pytest.raises(ValueError, match="image tokens"):
        other.build_prompt(msgs, [free])


@pytest.mark.parametrize("enable_thinking", [None, False])
def test_chatml_fallback_matches_processor(tmp_root, enable_thinking):
    """Without a template: build_prompt + Processor.build(text, images) gives the ids of Processor.encode_chat."""
    d = _model_dir(tmp_root, None)
    chat = ChatTemplate.from_pretrained(d)
    assert chat.template is None
    free = random_image(50, 70, seed=3)
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image", "image": IMG}, {"type": "text", "text": "Describe."}]},
            {"role": "assistant", "content": "Colours."},
            {"role": "user", "content": "Now this one: <|image_pad|> and say more."}]
    prompt, images = chat.build_prompt(msgs, [free], enable_thinking=enable_thinking)
    proc = Processor.from_pretrained(d, assistant_prefix=THINK_OFF_PREFIX if enable_thinking is False else "")
    want = proc.encode_chat(msgs, [free], add_generation_prompt=True)
    got = proc.build(SampleRequest(text=prompt, images=images))
    assert got.text == want.text
    assert got.input_ids.tolist() == want.input_ids.tolist()
    assert prompt.endswith("<|im_start|>assistant\n" + (THINK_OFF_PREFIX if enable_thinking is False else ""))


def test_template_sources(tmp_root):
    d = _model_dir(tmp_root, None)
    assert load_chat_template(d) is None
    j = os.path.join(tmp_root, "json_template")
    write_tiny_model_dir(j, tiny_config())
    with open(os.path.join(j, "chat_template.json"), "w") as f:
        json.dump({"chat_template": "A{{ messages[0].content }}"}, f)
    assert load_chat_template(j) == "A{{ messages[0].content }}"
    t = os.path.join(tmp_root, "tokcfg_template")
    write_tiny_model_dir(t, tiny_config())
    cfg_path = os.path.join(t, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ bos_token }}"}]
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    chat = ChatTemplate.from_pretrained(t)
    assert chat.template == "D{{ bos_token }}"
    assert chat.special_tokens["eos_token"] == "<|im_end|>" and chat.special_tokens["image_token"] == "<|image_pad|>"
    assert "bos_token" not in chat.special_tokens  # the tiny tokenizer names none: renders as empty
    assert chat.render([{"role": "user", "content": "x"}]) == "D"


def test_sandbox():
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(jinja2.exceptions.TemplateError, match="nope"):
        render_jinja("{{ raise_exception('nope') }}", msgs)
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_jinja("{{ messages.__class__.__mro__ }}", msgs)
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_jinja("{% set ns = namespace(_x=1) %}", msgs)
    with pytest.raises(jinja2.exceptions.SecurityError):  # immutable: no in-place list changes
        render_jinja("{% set _ = messages.append(1) %}", msgs)
    # objects are replaced by inert placeholders; tojson does not HTML-escape
    assert render_jinja("{{ messages[0].content[0].image }}|{{ '<a>' | tojson }}",
                        [{"role": "user", "content": [{"type": "image", "image": IMG}]}]) == '<Image>|"<a>"'
