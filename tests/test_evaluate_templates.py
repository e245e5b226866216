from __future__ import annotations

import pytest

from latentx.templates import BOXED_INSTRUCTION, PromptTemplate, get_template, render_prompt

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture
def chat_tokenizer():
    from latentx.models import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def test_qwen_boxed_uses_the_chat_template(chat_tokenizer):
    prompt = render_prompt("What is $1+1$?", "qwen-boxed", chat_tokenizer)
    assert prompt == f"<|system|>{BOXED_INSTRUCTION}<|end|><|user|>What is $1+1$?<|end|><|assistant|>"


def test_qwen_boxed_falls_back_to_plain_text_with_a_warning():
    from latentx.models import build_char_tokenizer

    import latentx.templates as templates

    templates._warned.clear()
    with pytest.warns(UserWarning, match="no chat template"):
        prompt = render_prompt("2+2?", "qwen-boxed", build_char_tokenizer())
    assert prompt == f"{BOXED_INSTRUCTION}\n\n2+2?\n"


def test_plain_and_user_templates(tmp_path, chat_tokenizer):
    assert render_prompt("2+2?", "plain", chat_tokenizer) == f"2+2?\n{BOXED_INSTRUCTION}\n"
    custom = "Q: {problem}\nPut the answer in \\boxed{}.\nA:"
    assert render_prompt("x^{2}=4, x>0?", custom) == "Q: x^{2}=4, x>0?\nPut the answer in \\boxed{}.\nA:"
    path = tmp_path / "mine.txt"
    path.write_text("Solve: {problem}\n")
    template = get_template(str(path))
    assert template.name == "mine"
    assert template.render("1+1", chat_tokenizer) == "Solve: 1+1\n"  # user templates never use chat


def test_template_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown template 'qwen'"):
        get_template("qwen")
    bad = tmp_path / "bad.txt"
    bad.write_text("no placeholder")
    with pytest.raises(ValueError, match="does not contain"):
        get_template(str(bad))
    with pytest.raises(ValueError, match="user"):
        PromptTemplate("x", user="no placeholder")
    with pytest.raises(TypeError, match="problem"):
        get_template("plain").render(None)  # type: ignore[arg-type]
