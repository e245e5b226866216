"""Prompt templates for math evaluation: problem text → model input string.

Built in:

- ``qwen-boxed`` — system message "Please reason step by step, and put your final answer within
  \\boxed{}." and the problem as the user message, rendered with the tokenizer's chat template (the
  prompt of Qwen2.5-Math / simpleRL evaluations). A tokenizer without a chat template gets the same two
  parts as plain text, with a warning.
- ``plain`` — the problem, then "Please reason step by step, and put your final answer within
  \\boxed{}." on its own line; no chat template (for base models and the built-in tiny model).

Anything else is a user template: a string containing ``{problem}``, or the path of a text file that
contains one. ``{problem}`` is substituted literally (other braces, e.g. ``\\boxed{}``, are left alone);
user templates are plain text, never passed through a chat template.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BOXED_INSTRUCTION", "PromptTemplate", "get_template", "render_prompt", "BUILTIN_TEMPLATES"]

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
PLACEHOLDER = "{problem}"


@dataclass(frozen=True)
class PromptTemplate:
    """``user`` holds ``{problem}``; ``system`` (optional) is the system message of a chat template."""

    name: str
    user: str
    system: str | None = None
    use_chat_template: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("PromptTemplate.name must not be empty")
        if PLACEHOLDER not in self.user:
            raise ValueError(f"PromptTemplate.user must contain {PLACEHOLDER!r}, got {self.user[:80]!r}")

    def render(self, problem: str, tokenizer: Any | None = None) -> str:
        """The model input for ``problem`` (a string; tokenise it without adding special tokens)."""
        if not isinstance(problem, str):
            raise TypeError(f"problem must be a str, got {type(problem).__name__}")
        user = self.user.replace(PLACEHOLDER, problem)
        if self.use_chat_template:
            if tokenizer is not None and getattr(tokenizer, "chat_template", None):
                messages = [{"role": "user", "content": user}]
                if self.system:
                    messages.insert(0, {"role": "system", "content": self.system})
                return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            _warn_no_chat_template(self.name)
        if self.system:
            return f"{self.system}\n\n{user}\n"
        return user


_warned: set[str] = set()


def _warn_no_chat_template(name: str) -> None:
    if name not in _warned:
        _warned.add(name)
        warnings.warn(
            f"template {name!r}: the tokenizer has no chat template; using plain text "
            "(system message, blank line, problem)",
            stacklevel=3,
        )


BUILTIN_TEMPLATES: dict[str, PromptTemplate] = {
    "qwen-boxed": PromptTemplate("qwen-boxed", user=PLACEHOLDER, system=BOXED_INSTRUCTION, use_chat_template=True),
    "plain": PromptTemplate("plain", user=f"{PLACEHOLDER}\n{BOXED_INSTRUCTION}\n"),
}


def get_template(spec: str | PromptTemplate) -> PromptTemplate:
    """A built-in name, a template string with ``{problem}``, or a path to a file holding one."""
    if isinstance(spec, PromptTemplate):
        return spec
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"template must be a non-empty string, got {spec!r}")
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    if PLACEHOLDER in spec:
        return PromptTemplate("custom", user=spec)
    path = Path(spec).expanduser()
    if len(spec) < 4096 and path.is_file():
        text = path.read_text(encoding="utf-8")
        if PLACEHOLDER not in text:
            raise ValueError(f"template file {path} does not contain {PLACEHOLDER!r}")
        return PromptTemplate(path.stem, user=text)
    raise ValueError(
        f"unknown template {spec!r}: expected one of {', '.join(BUILTIN_TEMPLATES)}, a string containing "
        f"{PLACEHOLDER!r}, or the path of a file containing it"
    )


def render_prompt(problem: str, template: str | PromptTemplate = "qwen-boxed", tokenizer: Any | None = None) -> str:
    """Shorthand for ``get_template(template).render(problem, tokenizer)``."""
    return get_template(template).render(problem, tokenizer)
