"""Finding a causal LM's backbone and reading its last hidden state: shared by the TRL and verl adapters.

A forward hook on ``causal_lm.base_model`` (e.g. ``Qwen2Model``) sees ``last_hidden_state``, i.e.
``hidden_states[-1]`` after the final norm — the trajectory of METHODS.md section 0 — in whatever forward
the framework runs (fused LM heads included), with its autograd graph when the forward has one.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["find_backbone", "last_hidden_state"]


def find_backbone(model: nn.Module) -> nn.Module:
    """The transformer body of ``model``: unwraps DDP / DeepSpeed / FSDP1 ``.module`` wrappers and
    ``peft.PeftModel.get_base_model()``, then returns ``causal_lm.base_model``.

    PEFT swaps layers *inside* the backbone but keeps the module object, so a hook on it sees the
    adapted forward, with adapters enabled or disabled.
    """
    depth = 0
    while hasattr(model, "module") and isinstance(model.module, nn.Module) and depth < 8:
        model, depth = model.module, depth + 1
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    backbone = getattr(model, "base_model", None)
    if not isinstance(backbone, nn.Module) or backbone is model:
        raise ValueError(
            f"latentx cannot find the backbone of {type(model).__name__}: expected a transformers causal LM "
            "whose `base_model` is the transformer body"
        )
    return backbone


def last_hidden_state(output: Any) -> Tensor:
    """``last_hidden_state`` of a backbone's output (a ModelOutput or a tuple whose first item it is)."""
    state = getattr(output, "last_hidden_state", None)
    if state is None and isinstance(output, (tuple, list)) and output:
        state = output[0]
    if not isinstance(state, Tensor):
        raise TypeError(f"the backbone returned {type(output).__name__} without a last_hidden_state tensor")
    return state
