"""Chat templates rendered with jinja2 alone equal transformers' `apply_chat_template` (reference
renderings of the shipped stdlib-moe template, tests/fixtures/make_chat_template_reference.py); a
model without a template, or messages the template rejects, are request errors naming `messages`."""

import json
from pathlib import Path

import pytest

from moejax import LLM
from moejax.assets import shipped_checkpoint
from moejax.chat_template import ChatTemplate, load_chat_template
from moejax.engine.sampling import RequestError

REFERENCE = Path(__file__).parent / "fixtures" / "reference" / "stdlib_moe_chat.json"


@pytest.mark.parametrize("case", json.loads(REFERENCE.read_text())["cases"], ids=lambda c: str(len(c["messages"])))
def test_renders_as_transformers(case):
    template = load_chat_template(shipped_checkpoint("stdlib-moe"))
    assert template.render(case["messages"], add_generation_prompt=case["add_generation_prompt"]) == case["text"]


def test_transformers_environment():
    """What transformers' environment adds to jinja's: trim_blocks / lstrip_blocks, a tojson that
    keeps non-ASCII and HTML as is, loop controls, special tokens as variables, raise_exception."""
    source = ("{% for m in messages %}\n  {% if m.role == 'skip' %}{% continue %}{% endif %}\n"
              "{{ m | tojson }}{{ eos_token }}\n{% endfor %}")
    template = ChatTemplate(source, {"eos_token": "</s>"})
    messages = [{"role": "user", "content": "<é>"}, {"role": "skip", "content": "x"}]
    assert template.render(messages) == '{"role": "user", "content": "<é>"}</s>\n'
    with pytest.raises(RequestError, match="rejected the messages: no") as e:
        ChatTemplate("{{ raise_exception('no') }}").render(messages)
    assert e.value.param == "messages"


def test_template_from_a_jinja_file_wins(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "config", "bos_token": "<s>"}))
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}file")
    assert load_chat_template(tmp_path).render([]) == "<s>file"
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "tools"}, {"name": "default", "template": "named"}]}))
    assert load_chat_template(tmp_path).render([]) == "named"
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert load_chat_template(tmp_path) is None


def test_model_without_template_is_a_request_error():
    llm = LLM("tiny-qwen3-moe", max_model_len=64, num_blocks=8)
    with pytest.raises(RequestError, match="has no chat template") as e:
        llm.apply_chat_template([{"role": "user", "content": "hi"}])
    assert e.value.param == "messages"
