"""Capture the policy's last-layer hidden states inside the forwards TRL already runs.

TRL 1.16 scores completions with a *fused* LM head (``model(..., fused_lm_head=True)``) whose output
carries log-probabilities but no hidden states.  The fused forward calls the backbone
(``causal_lm.base_model``, e.g. ``Qwen2Model``) and projects its ``last_hidden_state``; a forward hook on
that backbone therefore sees exactly ``hidden_states[-1]`` (after the final norm), the trajectory of
METHODS.md section 0, with its autograd graph when the forward runs with gradient.

Row t of a response's trajectory is the state that *predicts* response token t, i.e. the state at the
position just before it: for a batch ``[prompt | completion]`` of width ``P + C`` the completion
trajectory is ``last_hidden_state[:, P - 1 : P + C - 1]`` = ``[:, -(C + 1):-1]``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from latentx.integrations.backbone import find_backbone, last_hidden_state

__all__ = ["find_backbone", "completion_states", "capture_completion_states"]

#: ``on_chunk(H [b, C, d], mask [b, C] bool)`` for every backbone call while capturing.
ChunkCallback = Callable[[Tensor, Tensor], None]


def completion_states(last_hidden_state: Tensor, logits_to_keep: int) -> Tensor:
    """``[B, P + C, d] -> [B, C, d]``: the states that predict the C completion tokens (module docstring)."""
    if logits_to_keep < 1 or last_hidden_state.shape[1] < logits_to_keep + 1:
        raise ValueError(
            f"logits_to_keep={logits_to_keep} needs a sequence of at least {logits_to_keep + 1} positions, "
            f"got {last_hidden_state.shape[1]}"
        )
    return last_hidden_state[:, -(logits_to_keep + 1) : -1]


@contextmanager
def capture_completion_states(backbone: nn.Module, logits_to_keep: int, on_chunk: ChunkCallback) -> Iterator[None]:
    """Call ``on_chunk(H, mask)`` for every forward of ``backbone`` inside the block.

    ``H`` is ``[b, C, d]`` (:func:`completion_states`, still attached to the graph when the forward has
    gradient) and ``mask`` the bool ``[b, C]`` completion part of the call's ``attention_mask`` (TRL passes
    ``cat(prompt_mask, completion_mask)``), so chunked forwards (TRL scores ``batch_size`` rows at a time)
    each arrive with their own mask.  The hook is removed on exit, also on error.
    """

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is None or attention_mask.dim() != 2:
            raise ValueError("latentx needs the 2-D attention_mask TRL passes to the backbone to mask the completion")
        states = completion_states(last_hidden_state(output), logits_to_keep)
        on_chunk(states, attention_mask[:, -logits_to_keep:].to(torch.bool))

    handle = backbone.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
