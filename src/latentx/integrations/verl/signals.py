"""From the FSDP engine's forward to per-response trajectories and signals (METHODS.md sections 0-2).

verl 0.9.1's FSDP engine (``verl/workers/engine/fsdp/transformer_impl.py``, ``FSDPEngineWithLMHead``) runs
one forward per micro-batch on *nested* (no-padding) sequences ``[prompt | response]``:

* ``use_remove_padding=True`` (padding-free packing): the backbone sees ``[1, total_nnz (+pad), d]``; with
  Ulysses sequence parallelism each rank holds a slice of that packed sequence, plus a right pad
  (``output_args["pad_size"]``).  The engine's ``_gather_and_unpad_packed`` all-gathers the slices
  (an autograd-aware gather) and strips the pad; we pass the hidden states through the *same* call, so
  the trajectories are the full, global ones and their gradient is split back exactly like verl's
  log-prob gradient.
* ``use_remove_padding=False``: the backbone sees ``[bsz, max_len, d]`` right-padded; each row's first
  ``len_b`` positions are real.

Either way we get ``[total_nnz, d]`` in the nested layout, and verl's own ``no_padding_2_padding`` (the
function ``ppo_loss`` uses on log-probs) slices the states that *predict* the response tokens into
``[B, W, d]``: row t of response b is the state at position ``prompt_len + t − 1``, i.e. ``hidden_states[-1]``
of METHODS.md §0.  The per-response reductions then call :mod:`latentx.dynamics`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from latentx.integrations.backbone import find_backbone, last_hidden_state

from latentx.dynamics import rank_dynamics
from latentx.objectives import VerlConfig

__all__ = [
    "SIGNAL_KEYS",
    "find_backbone",
    "HiddenStateCapture",
    "packed_hidden_states",
    "response_trajectories",
    "rank_signals",
    "per_response_nested",
    "padded_field",
    "response_layout",
    "per_response_values",
]

#: Per-response fields the plugin writes into the batch (each a nested ``[B, 1]`` tensor).
SIGNAL_KEYS = ("latentx_er", "latentx_erv", "latentx_era", "latentx_dsd")


class HiddenStateCapture:
    """Forward hook on the backbone that keeps the last ``last_hidden_state`` while :attr:`mode` is set.

    ``mode`` is ``None`` (nothing kept: rollout, reference forwards), ``"infer"`` (old-log-prob forward,
    no gradient) or ``"train"`` (actor update, the tensor keeps its autograd graph).  :meth:`pop` hands the
    tensor over and forgets it, so nothing outlives its micro-batch.
    """

    def __init__(self, backbone: nn.Module) -> None:
        self.mode: str | None = None
        self._state: Tensor | None = None
        self._handle = backbone.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.mode is not None:
            self._state = last_hidden_state(output)

    def pop(self) -> Tensor:
        state, self._state = self._state, None
        if state is None:
            raise RuntimeError("latentx: no hidden states were captured in this forward (is the backbone hooked?)")
        return state

    def remove(self) -> None:
        self._handle.remove()


def packed_hidden_states(
    hidden: Tensor,
    micro_batch: Any,
    use_remove_padding: bool,
    pad_size: int,
    gather_and_unpad: Callable[[Tensor, int], Tensor] | None,
) -> Tensor:
    """The backbone output of one micro-batch as ``[total_nnz, d]`` in verl's nested (no-padding) layout.

    Args:
        hidden: ``[1, L, d]`` (padding-free packing; L = this rank's slice with Ulysses SP) or ``[bsz, S, d]``.
        micro_batch: the engine's micro-batch TensorDict (its nested ``input_ids`` give the sequence lengths).
        use_remove_padding: which of the two layouts ``hidden`` is in.
        pad_size: ``output_args["pad_size"]`` of the engine (SP alignment + static pad), packed layout only.
        gather_and_unpad: the engine's ``_gather_and_unpad_packed`` (all-gather over the Ulysses group and
            strip the pad); ``None`` = no SP, just strip the pad.
    """
    input_ids = micro_batch["input_ids"]
    if not getattr(input_ids, "is_nested", False):
        raise ValueError("latentx expects the micro-batch's input_ids as a nested tensor (verl's NO_PADDING mode)")
    lengths = input_ids.offsets().diff().to(hidden.device)
    if use_remove_padding:
        if hidden.dim() != 3 or hidden.shape[0] != 1:
            raise ValueError(f"packed hidden states must be [1, L, d], got {list(hidden.shape)}")
        flat = hidden[0]
        if gather_and_unpad is not None:
            flat = gather_and_unpad(flat, pad_size)
        elif pad_size:
            flat = flat[:-pad_size]
    else:
        if hidden.dim() != 3 or hidden.shape[0] != lengths.shape[0]:
            raise ValueError(f"padded hidden states must be [bsz={lengths.shape[0]}, S, d], got {list(hidden.shape)}")
        keep = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]
        flat = hidden[keep]
    total = int(lengths.sum())
    if flat.shape[0] != total:
        raise ValueError(f"hidden states hold {flat.shape[0]} positions but the micro-batch has {total} tokens")
    return flat


def _response_mask(micro_batch: Any, batch: int, width: int, device: torch.device) -> Tensor:
    mask = micro_batch["response_mask"]
    if getattr(mask, "is_nested", False):
        mask = torch.nested.to_padded_tensor(mask.to(torch.int64), 0, output_size=(batch, width))
    else:
        mask = mask[:, :width]
        if mask.shape[1] < width:
            mask = torch.nn.functional.pad(mask, (0, width - mask.shape[1]))
    return mask.to(device=device).bool()


def response_trajectories(packed: Tensor, micro_batch: Any) -> tuple[Tensor, Tensor]:
    """``[total_nnz, d]`` -> ``(H [B, W, d], mask [B, W] bool)``: the response trajectories (METHODS.md §0).

    Slicing is verl's ``no_padding_2_padding`` (row t = the state predicting response token t); ``mask`` is the
    micro-batch's ``response_mask`` (so tokens that verl does not train on, e.g. tool outputs in multi-turn
    rollouts, are not part of the trajectory either).
    """
    from verl.workers.utils.padding import no_padding_2_padding

    H = no_padding_2_padding(packed, micro_batch)
    mask = _response_mask(micro_batch, H.shape[0], H.shape[1], H.device)
    return H, mask


def rank_signals(H: Tensor, mask: Tensor, cfg: VerlConfig) -> dict[str, Tensor]:
    """ER / ERV / ERA of each response (METHODS.md §1) via :func:`latentx.dynamics.rank_dynamics`, float32 [B]."""
    with torch.no_grad():
        out = rank_dynamics(H.detach(), mask, stride=cfg.stride, window=cfg.window)
    return {"latentx_er": out.er.float(), "latentx_erv": out.erv.float(), "latentx_era": out.era.float()}


def padded_field(field: Tensor, batch: int, width: int) -> Tensor:
    """A driver-side token field (nested ``[B, j]`` or padded ``[B, W']``) as a padded ``[B, width]`` tensor."""
    if getattr(field, "is_nested", False):
        return torch.nested.to_padded_tensor(field, 0.0, output_size=(batch, width))
    field = field[:, :width]
    return torch.nn.functional.pad(field, (0, width - field.shape[1])) if field.shape[1] < width else field


def response_layout(data: Any, fields: tuple[str, ...], what: str) -> tuple[int, int, Tensor]:
    """``(B, W, mask [B, W] bool)`` of a driver batch read from TransferQueue, after checking that it holds
    ``fields`` (the error names the missing ones and ``what`` needs them); W is the longest response."""
    missing = [key for key in fields if key not in data.keys()]
    if missing:
        raise ValueError(
            f"{what} needs the batch fields {', '.join(missing)} (latentx_* come from the actor's "
            "old-log-prob forward: is the latentx worker in use, and algorithm.rollout_correction.bypass_mode off?)"
        )
    mask_field = data["response_mask"]
    if getattr(mask_field, "is_nested", False):
        lengths = mask_field.offsets().diff()
        B, W = int(lengths.shape[0]), int(lengths.max()) if lengths.numel() else 0
    else:
        B, W = int(mask_field.shape[0]), int(mask_field.shape[1])
    return B, W, padded_field(mask_field, B, W).bool()


def per_response_nested(values: Tensor) -> Tensor:
    """``[B]`` -> nested jagged ``[B, 1]``: the shape verl's engine outputs and TransferQueue fields take."""
    values = values.detach().float().reshape(-1)
    offsets = torch.arange(values.shape[0] + 1, device=values.device, dtype=torch.int64)
    return torch.nested.nested_tensor_from_jagged(values, offsets)


def per_response_values(field: Tensor, name: str = "field") -> Tensor:
    """The inverse of :func:`per_response_nested`: a nested ``[B, 1]`` or dense ``[B, 1]`` / ``[B]`` -> ``[B]``."""
    if getattr(field, "is_nested", False):
        lengths = field.offsets().diff()
        if bool((lengths != 1).any()):
            raise ValueError(f"{name} must hold one value per response, got lengths {lengths.tolist()}")
        return field.values().reshape(-1).float()
    if field.dim() == 2 and field.shape[1] == 1:
        return field[:, 0].float()
    if field.dim() == 1:
        return field.float()
    raise ValueError(f"{name} must be [B], [B, 1] or nested [B, 1], got shape {list(field.shape)}")
