"""Chat templates: a checkpoint's jinja template turned into prompt text exactly as HF transformers
renders it (`apply_chat_template(..., tokenize=False)`), with jinja2 only (no transformers at run time).

The template comes from `chat_template.jinja` (what transformers >= 4.43 saves) or from the
`chat_template` entry of `tokenizer_config.json` (a string, or a list of named templates of which
"default" is used). The environment is transformers': a sandbox, trim_blocks / lstrip_blocks, the
loopcontrols extension, `raise_exception`, `strftime_now` and a `tojson` that does not escape HTML;
the tokenizer's special tokens (bos_token, eos_token, ...) are variables.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from moejax.engine.sampling import RequestError

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        try:
            import jinja2
            import jinja2.ext
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise ImportError("chat templates need jinja2: pip install 'moejax[serve]'") from None

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self._template = env.from_string(source)
        self._errors = (jinja2.exceptions.TemplateError,)

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True, tools: list | None = None,
               **kwargs) -> str:
        """The prompt text of a conversation; a template that rejects it (raise_exception) is a
        RequestError naming `messages`."""
        try:
            return self._template.render(messages=messages, tools=tools, documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         **{**self.special_tokens, **kwargs})
        except self._errors as e:
            raise RequestError(f"the chat template rejected the messages: {e}", param="messages") from None


def load_chat_template(directory: str | Path) -> ChatTemplate | None:
    """The chat template of a checkpoint directory, or None when it has none."""
    directory = Path(directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    jinja_path = directory / "chat_template.jinja"
    source = jinja_path.read_text() if jinja_path.is_file() else config.get("chat_template")
    if isinstance(source, list):  # [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if not source:
        return None
    if not isinstance(source, str):
        raise ValueError(f"{config_path}: chat_template must be a string or a list of named templates")
    special = {}
    for name in SPECIAL_TOKENS:
        token = config.get(name)
        if isinstance(token, dict):  # an AddedToken as transformers < 5 saved it
            token = token.get("content")
        if isinstance(token, str):
            special[name] = token
    return ChatTemplate(source, special)
