"""Chat messages -> the prompt string the Processor expands (one `<|image_pad|>` per image), plus its images.

A checkpoint directory's own chat template is rendered the way transformers' `apply_chat_template` renders it
(`transformers.utils.chat_template_utils`): jinja2's ImmutableSandboxedEnvironment with trim_blocks and
lstrip_blocks, the loop-control extension, a `{% generation %}` block that renders its body, the `tojson` filter
without HTML escaping, the globals `raise_exception`, `strftime_now`, `dict`, `namespace` (no underscore names);
the variables `messages`, `tools`, `documents`, `add_generation_prompt`, the tokenizer's named special tokens
(`bos_token`, `eos_token`, ..., and the named extra special tokens of tokenizer_config.json, e.g. `image_token`),
`enable_thinking` only when given (templates test `enable_thinking is defined`), and any other keyword. As there,
message keys whose value is None are dropped, a message's reasoning under `thinking` / `reasoning` is also
offered as `reasoning_content` (and the other way round), and everything the template sees is rebuilt from plain
JSON types (an image object in a content part becomes the string "<Image>"). A plain string inside a content list
is passed as a {"type": "text"} part (the Processor reads it so; HF templates expect typed parts).

Where the template comes from (as transformers looks for it): `chat_template.jinja`, else `chat_template.json`
({"chat_template": ...}), else the "chat_template" entry of tokenizer_config.json (a string, or a list of
{"name", "template"} where "default" is taken). Without one, the ChatML layout of
`uhd_jax.data.processor.Processor.encode_chat` is used: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per
message, list contents joined by "\\n" with each image part as the image token, and the generation prompt
`<|im_start|>assistant\\n` (+ "<think>\\n\\n</think>\\n\\n" when enable_thinking is False, as Qwen3-style
templates do).

Content is a string (image tokens written in it take the caller's `images` in order, as in the Processor) or a list
of parts {"type": "text", "text": ...} / {"type": "image", "image": path | bytes | PIL} (plain strings count as
text parts). `build_prompt` returns the rendered prompt and the images in the order their tokens appear;
then `processor(prompt, images)` (or `Processor.build(SampleRequest(text=prompt, images=images))`) expands them.

    chat = ChatTemplate.from_pretrained(model_dir)
    prompt, images = chat.build_prompt(messages, add_generation_prompt=True, enable_thinking=False)
"""

from __future__ import annotations

import dataclasses
import json
import os
from datetime import datetime
from typing import Any, Mapping, Sequence

import numpy as np

from uhd_jax.data.processor import DEFAULT_SPECIAL_TOKENS

ROLES = ("system", "user", "assistant", "tool")
THINK_OFF_PREFIX = "<think>\n\n</think>\n\n"
_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


# ------------------------------------------------------------------------------------------ finding a template
def _read_json(path: str):
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_chat_template(model_dir: str | os.PathLike) -> str | None:
    """The checkpoint's chat template source, or None (see the module doc for where it is looked for)."""
    d = os.fspath(model_dir)
    path = os.path.join(d, "chat_template.jinja")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    j = _read_json(os.path.join(d, "chat_template.json"))
    if isinstance(j, dict) and isinstance(j.get("chat_template"), str):
        return j["chat_template"]
    tc = _read_json(os.path.join(d, "tokenizer_config.json")) or {}
    t = tc.get("chat_template")
    if isinstance(t, str):
        return t
    if isinstance(t, list):
        named = {e.get("name"): e.get("template") for e in t if isinstance(e, dict)}
        return named.get("default")
    return None


def _token_str(v) -> str | None:
    if v is None:
        return None
    return v.get("content") if isinstance(v, dict) else str(v)


def load_special_tokens(model_dir: str | os.PathLike) -> dict[str, str]:
    """Named special tokens a template sees: bos/eos/unk/sep/pad/cls/mask_token and the named extra special tokens
    (tokenizer_config.json, with a legacy special_tokens_map.json merged in), None values left out."""
    d = os.fspath(model_dir)
    out: dict[str, str] = {}
    for cfg in (_read_json(os.path.join(d, "special_tokens_map.json")) or {},
                _read_json(os.path.join(d, "tokenizer_config.json")) or {}):
        for k in _NAMED_SPECIAL:
            if _token_str(cfg.get(k)) is not None:
                out[k] = _token_str(cfg[k])
        extra = cfg.get("extra_special_tokens")
        if isinstance(extra, dict):
            out.update({k: _token_str(v) for k, v in extra.items() if _token_str(v) is not None})
    return out


# ------------------------------------------------------------------------------------------------ jinja side
def _plain(value: Any) -> Any:
    """JSON-typed copy of what the template may see; other objects become "<TypeName>" (transformers'
    `_plain_template_data`)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning(messages: list[dict]) -> list[dict]:
    out = []
    for m in messages:
        r = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if r is not None:
            m = {"thinking": r, **m, "reasoning_content": r}
        out.append(m)
    return out


_ENV = None


def _environment():
    global _ENV
    if _ENV is not None:
        return _ENV
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): renders its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore names ({name!r})")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                       extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    _ENV = env
    return env


_COMPILED: dict[str, Any] = {}


def render_jinja(template: str, messages: Sequence[dict], *, add_generation_prompt: bool = False,
                 enable_thinking: bool | None = None, tools: list | None = None, documents: list | None = None,
                 special_tokens: Mapping[str, str] | None = None, **kwargs) -> str:
    """`template` rendered as transformers' `tokenizer.apply_chat_template(messages, tokenize=False, ...)` does.
    One addition: a plain string inside a content list becomes a {"type": "text"} part (as the Processor reads it;
    transformers passes it through and templates then usually drop it)."""
    if not messages:
        raise ValueError("cannot render an empty conversation")
    compiled = _COMPILED.get(template)
    if compiled is None:
        compiled = _COMPILED[template] = _environment().from_string(template)
    msgs = [{k: (_parts(v) if k == "content" and isinstance(v, (list, tuple)) else v) for k, v in m.items()
             if v is not None} for m in messages]
    msgs = _alias_reasoning(_plain(msgs))
    if enable_thinking is not None:
        kwargs["enable_thinking"] = enable_thinking
    variables = {**(special_tokens or {}), **kwargs}
    return compiled.render(messages=msgs, tools=_plain(tools), documents=_plain(documents),
                           add_generation_prompt=add_generation_prompt, **_plain(variables))


# ---------------------------------------------------------------------------------------------- ChatML side
def _parts(content) -> list[dict]:
    return [{"type": "text", "text": p} if isinstance(p, str) else p for p in content]


def render_chatml(messages: Sequence[dict], *, add_generation_prompt: bool = False,
                  enable_thinking: bool | None = None, image_token: str = DEFAULT_SPECIAL_TOKENS["image_token"],
                  im_start: str = DEFAULT_SPECIAL_TOKENS["im_start_token"],
                  im_end: str = DEFAULT_SPECIAL_TOKENS["im_end_token"], assistant_prefix: str | None = None) -> str:
    """The Processor's ChatML layout (`Processor.encode_chat`) as one string. assistant_prefix (default: the empty
    think block when enable_thinking is False, else nothing) follows the generation prompt."""
    out = []
    for m in messages:
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"unknown chat role {role!r}")
        content = m.get("content", "")
        if content is None:
            content = ""
        if isinstance(content, str):
            body = content
        else:
            chunks = []
            for part in _parts(content):
                typ = part.get("type")
                if typ == "text":
                    chunks.append(part.get("text", ""))
                elif typ == "image":
                    chunks.append(image_token)
                else:
                    raise ValueError(f"unknown content part type {typ!r}")
            body = "\n".join(chunks)
        out.append(f"{im_start}{role}\n{body}{im_end}\n")
    if add_generation_prompt:
        prefix = assistant_prefix if assistant_prefix is not None else \
            (THINK_OFF_PREFIX if enable_thinking is False else "")
        out.append(f"{im_start}assistant\n{prefix}")
    return "".join(out)


def ordered_images(messages: Sequence[dict], images: Sequence[Any] = (),
                   image_token: str = DEFAULT_SPECIAL_TOKENS["image_token"]) -> list:
    """Images in the order their tokens appear: image tokens written in text take `images` in order, image parts
    bring their own (as the Processor orders them)."""
    free = list(images)
    used, out = 0, []
    for m in messages:
        content = m.get("content") or ""
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else _parts(content)
        for part in parts:
            if part.get("type") == "text":
                for _ in range(part.get("text", "").count(image_token)):
                    if used >= len(free):
                        raise ValueError(f"more image tokens in the messages than the {len(free)} images given")
                    out.append(free[used])
                    used += 1
            elif part.get("type") == "image":
                src = part.get("image", part.get("path", part.get("url")))
                if src is None:
                    raise ValueError("image part without an 'image' entry")
                out.append(src)
    if used != len(free):
        raise ValueError(f"{used} image tokens in the message texts but {len(free)} images given")
    return out


# ------------------------------------------------------------------------------------------------- front end
@dataclasses.dataclass
class ChatTemplate:
    """A checkpoint's chat formatting: its jinja template (None: the Processor's ChatML) and special tokens."""

    template: str | None = None
    special_tokens: dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> "ChatTemplate":
        return cls(load_chat_template(model_dir), load_special_tokens(model_dir))

    @property
    def image_token(self) -> str:
        return self.special_tokens.get("image_token", DEFAULT_SPECIAL_TOKENS["image_token"])

    def render(self, messages: Sequence[dict], *, add_generation_prompt: bool = False,
               enable_thinking: bool | None = None, tools: list | None = None, **kwargs) -> str:
        """The prompt string (image tokens unexpanded)."""
        if self.template is not None:
            return render_jinja(self.template, messages, add_generation_prompt=add_generation_prompt,
                                enable_thinking=enable_thinking, tools=tools, special_tokens=self.special_tokens,
                                **kwargs)
        if tools:
            raise ValueError("the ChatML fallback has no tool format; the checkpoint needs a chat template")
        st = self.special_tokens
        return render_chatml(messages, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking,
                             image_token=self.image_token,
                             im_start=st.get("im_start_token", DEFAULT_SPECIAL_TOKENS["im_start_token"]),
                             im_end=st.get("im_end_token", DEFAULT_SPECIAL_TOKENS["im_end_token"]), **kwargs)

    def build_prompt(self, messages: Sequence[dict], images: Sequence[Any] = (), *,
                     add_generation_prompt: bool = True, enable_thinking: bool | None = None,
                     **kwargs) -> tuple[str, list]:
        """(prompt, images in token order) for the Processor. Raises if the rendered prompt's image tokens do not
        match the images (a template that writes images some other way than the image token)."""
        imgs = ordered_images(messages, images, self.image_token)
        prompt = self.render(messages, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking,
                             **kwargs)
        n = prompt.count(self.image_token)
        if n != len(imgs):
            raise ValueError(f"the rendered prompt has {n} image tokens ({self.image_token}) for {len(imgs)} images; "
                             "the chat template must write each image as that token")
        return prompt, imgs


__all__ = ["ChatTemplate", "load_chat_template", "load_special_tokens", "render_jinja", "render_chatml",
           "ordered_images", "ROLES", "THINK_OFF_PREFIX"]
