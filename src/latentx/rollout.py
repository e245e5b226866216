"""Rollouts: sample R responses per prompt, then one no-grad forward per micro-batch for log-probs,
token entropies and last-layer hidden states, reduced to per-response signals on the spot.

Token layout (used by the trainer and the objectives): every sequence is ``prompt + response`` with
the prompt left-padded to a common length ``P`` and the response right-padded to ``T``.  Position
``P - 1 + t`` holds the hidden state / logits that predict response token ``t`` (METHODS.md §0), so
``response_slice(P, T)`` selects exactly the rows of the latent trajectory ``H_i``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class RolloutConfig:
    """Sampling settings for one RL step."""

    prompts_per_step: int = 16
    samples_per_prompt: int = 8  # R, the group size
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    micro_batch_size: int = 64  # responses per forward / backward (rounded to whole groups)
    generation_batch_size: int = 256  # responses per `generate` call

    def __post_init__(self) -> None:
        for name in ("prompts_per_step", "max_new_tokens", "micro_batch_size", "generation_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"rollout.{name} must be >= 1, got {getattr(self, name)}")
        if self.samples_per_prompt < 1:
            raise ValueError(f"rollout.samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        if self.temperature < 0:
            raise ValueError(f"rollout.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Sequences:
    """Token tensors of N sampled responses (prompt left-padded to P, response right-padded to T)."""

    input_ids: torch.Tensor  # [N, P + T]
    attention_mask: torch.Tensor  # [N, P + T]; 0 on padding, including after the response's EOS
    prompt_length: int  # P
    response_mask: torch.Tensor  # [N, T] bool: real response tokens (the EOS token counts)
    texts: list[str] = field(default_factory=list)  # decoded responses, without special tokens
    vision: Any = None  # latentx.vision.VisionBatch of a VLM's prompts (row-aligned), None for text

    @property
    def response_length(self) -> int:
        return self.response_mask.shape[1]

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_length :]

    def to(self, device: torch.device | str) -> "Sequences":
        """The same sequences with every tensor on ``device`` (texts are shared)."""
        return Sequences(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            prompt_length=self.prompt_length,
            response_mask=self.response_mask.to(device),
            texts=self.texts,
            vision=self.vision,  # moved per forward (VisionBatch.model_inputs)
        )

    def select(self, index: torch.Tensor | slice) -> "Sequences":
        """The sub-batch ``index`` (trailing all-padding columns trimmed to keep forwards small)."""
        rows = torch.arange(self.input_ids.shape[0], device=self.input_ids.device)[index]
        resp = self.response_mask[rows]
        t = int(resp.sum(1).max().item()) if resp.numel() else 0
        t = max(t, 1)
        p = self.prompt_length
        return Sequences(
            input_ids=self.input_ids[rows, : p + t],
            attention_mask=self.attention_mask[rows, : p + t],
            prompt_length=p,
            response_mask=resp[:, :t],
            texts=[self.texts[i] for i in rows.tolist()] if self.texts else [],
            vision=self.vision.select(rows.cpu()) if self.vision is not None else None,
        )


def adds_bos(tokenizer, prompts: list[str]) -> bool:
    """Whether prompts should be encoded with the tokenizer's special tokens.

    Plain-text prompts get them (the warm start trains with ``tokenizer(prompt)``, BOS included); prompts
    rendered by a chat template already carry their BOS text, so adding it again would double it.
    """
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and prompts and all(p.startswith(bos) for p in prompts))


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (what ``generate`` uses), so forwards match the sampler."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def sample_responses(
    model,
    tokenizer,
    prompts: list[str],
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generation_batch_size: int = 256,
    images: list[list] | None = None,
) -> Sequences:
    """Sample ``samples_per_prompt`` responses for each prompt with HF ``generate``.

    Responses of one prompt are contiguous (rows ``g*R .. g*R+R-1`` form group ``g``).  Temperature 0
    means greedy decoding.  Everything after a response's first EOS is padding.  ``images[g]`` are
    prompt g's images for a vision-language policy (:mod:`latentx.vision`); its image placeholder ids
    are never sampled.
    """
    if not prompts:
        raise ValueError("prompts must not be empty")
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_id = tokenizer.eos_token_id
    from latentx.vision import encode_prompts

    enc_ids, enc_mask, vision = encode_prompts(tokenizer, prompts, images, add_special_tokens=adds_bos(tokenizer, prompts))
    prompt_ids = enc_ids.repeat_interleave(samples_per_prompt, dim=0)
    prompt_mask = enc_mask.repeat_interleave(samples_per_prompt, dim=0)
    vision = vision.repeat_interleave(samples_per_prompt) if vision is not None else None
    if prompt_ids.shape[1] == 0:
        raise ValueError("every prompt tokenized to nothing; check the task's prompt format")
    chunks = []
    gen_kwargs = dict(
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        do_sample=temperature > 0,
    )
    if temperature > 0:
        gen_kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    if vision is not None and vision.suppress_ids:
        gen_kwargs["suppress_tokens"] = list(vision.suppress_ids)
    for start in range(0, prompt_ids.shape[0], generation_batch_size):
        ids = prompt_ids[start : start + generation_batch_size].to(device)
        mask = prompt_mask[start : start + generation_batch_size].to(device)
        extra = {} if vision is None else vision.select(slice(start, start + generation_batch_size)).model_inputs(device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, **extra, **gen_kwargs)
        chunks.append(out[:, ids.shape[1] :].cpu())
    width = max(c.shape[1] for c in chunks)
    width = max(width, 1)
    response = torch.cat([F.pad(c, (0, width - c.shape[1]), value=pad_id) for c in chunks])

    # Valid response tokens: everything up to and including the first EOS (``generate`` pads finished
    # rows after it).  A pad token sampled mid-response is a real sampled token and stays valid.
    if eos_id is not None:
        is_eos = response == eos_id
        response_mask = ~((is_eos.long().cumsum(1) - is_eos.long()) > 0)
    else:  # no EOS: padding can only come from ``generate`` finishing a row by length elsewhere
        response_mask = response != pad_id
    texts = tokenizer.batch_decode(response.masked_fill(~response_mask, pad_id), skip_special_tokens=True)
    return Sequences(
        input_ids=torch.cat([prompt_ids, response], dim=1),
        attention_mask=torch.cat([prompt_mask, response_mask.long()], dim=1),
        prompt_length=prompt_ids.shape[1],
        response_mask=response_mask,
        texts=texts,
        vision=vision,
    )


@dataclass
class ForwardOutput:
    """Per-token quantities of the response positions of one forward."""

    logp: torch.Tensor  # [N, T] log-prob of the sampled token
    entropy: torch.Tensor  # [N, T] token entropy of the predictive distribution
    hidden: torch.Tensor | None  # [N, T, d] last-layer hidden states (after the final norm)


def policy_forward(model, seqs: Sequences, want_hidden: bool, want_entropy: bool = True) -> ForwardOutput:
    """One forward of ``model`` over ``seqs``: log-probs, entropies and hidden states of the response.

    Uses ``output_hidden_states=True``; ``hidden_states[-1]`` is the final-layer state after the final
    norm in Hugging Face causal LMs (METHODS.md §0).  Runs with or without grad, as the caller decides.
    """
    device = next(model.parameters()).device
    ids = seqs.input_ids.to(device)
    mask = seqs.attention_mask.to(device)
    if seqs.vision is None:
        extra = {"position_ids": position_ids_from_mask(mask)}
    else:  # the model derives its multimodal (3-D rope) positions from mm_token_type_ids, as in generate
        extra = seqs.vision.model_inputs(ids.shape[1], device=device)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        output_hidden_states=want_hidden,
        use_cache=False,
        **extra,
    )
    p, t = seqs.prompt_length, seqs.response_length
    logits = out.logits[:, p - 1 : p - 1 + t].float()
    if seqs.vision is not None and seqs.vision.suppress_ids:  # the sampler's distribution: no image tokens
        suppressed = torch.tensor(seqs.vision.suppress_ids, device=logits.device)
        logits = logits.index_fill(-1, suppressed, -1e30)
    targets = ids[:, p : p + t]
    logprobs = torch.log_softmax(logits, dim=-1)
    logp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1) if want_entropy else torch.zeros_like(logp)
    hidden = None
    if want_hidden:
        states = getattr(out, "hidden_states", None)
        if not states:
            raise ValueError(
                f"{type(model).__name__} returned no hidden states with output_hidden_states=True; "
                "latentx needs a causal LM that exposes its last-layer hidden states"
            )
        hidden = states[-1][:, p - 1 : p - 1 + t]
    return ForwardOutput(logp=logp, entropy=entropy, hidden=hidden)
