"""Rollouts: sample R responses per prompt, then one no-grad forward per micro-batch for log-probs,
token entropies and last-layer hidden states, reduced to per-response signals on the spot.

Token layout (used by the trainer and the objectives): every sequence is ``prompt + response`` with
the prompt left-padded to a common length ``P`` and the response right-padded to ``T``.  Position
``P - 1 + t`` holds the hidden state / logits that predict response token ``t`` (METHODS.md §0), so
``response_slice(P, T)`` selects exactly the rows of the latent trajectory ``H_i``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    # DAPO's dynamic sampling: drop groups whose rewards are all equal (no GRPO signal) and refill the step
    # with fresh prompts, at most `dynamic_sampling_retries` extra sampling rounds (None = off, or the
    # ReLaX `authors` preset's value); see latentx.dynamic_sampling.
    dynamic_sampling: bool | None = None
    dynamic_sampling_retries: int = 3

    def __post_init__(self) -> None:
        from latentx.objectives.base import fill_unset

        fill_unset(self, {"dynamic_sampling": False})
        if self.dynamic_sampling_retries < 0:
            raise ValueError(f"rollout.dynamic_sampling_retries must be >= 0, got {self.dynamic_sampling_retries}")
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
    """Token tensors of N sampled responses (prompt left-padded to P, response right-padded to T).

    ``extra_inputs``: optional, one dict per row of extra model inputs (e.g. ``pixel_values`` of a
    vision-language prompt), each value a tensor whose first dimension is that row's batch dimension (1);
    :func:`sample_responses` passes them to ``generate`` and :func:`policy_forward` to the forward,
    concatenated along dim 0 for the rows of a batch.
    """

    input_ids: torch.Tensor  # [N, P + T]
    attention_mask: torch.Tensor  # [N, P + T]; 0 on padding, including after the response's EOS
    prompt_length: int  # P
    response_mask: torch.Tensor  # [N, T] bool: real response tokens (the EOS token counts)
    texts: list[str] = field(default_factory=list)  # decoded responses, without special tokens
    ended: torch.Tensor | None = None  # [N] bool: the response stopped at a stop token (else: at the length cap)
    extra_inputs: list[dict[str, torch.Tensor]] | None = None  # per row, see the class docstring

    @property
    def response_length(self) -> int:
        return self.response_mask.shape[1]

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_length :]

    def to(self, device: torch.device | str) -> "Sequences":
        """The same sequences with every token tensor on ``device`` (texts and extra inputs are shared)."""
        return Sequences(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            prompt_length=self.prompt_length,
            response_mask=self.response_mask.to(device),
            texts=self.texts,
            ended=self.ended.to(device) if self.ended is not None else None,
            extra_inputs=self.extra_inputs,
        )

    def select(self, index: torch.Tensor | slice) -> "Sequences":
        """The sub-batch ``index`` (trailing all-padding columns trimmed to keep forwards small)."""
        rows = torch.arange(self.input_ids.shape[0], device=self.input_ids.device)[index]
        resp = self.response_mask[rows]
        t = int(resp.sum(1).max().item()) if resp.numel() else 0
        t = max(t, 1)
        p = self.prompt_length
        picked = rows.tolist()
        return Sequences(
            input_ids=self.input_ids[rows, : p + t],
            attention_mask=self.attention_mask[rows, : p + t],
            prompt_length=p,
            response_mask=resp[:, :t],
            texts=[self.texts[i] for i in picked] if self.texts else [],
            ended=self.ended[rows] if self.ended is not None else None,
            extra_inputs=[self.extra_inputs[i] for i in picked] if self.extra_inputs is not None else None,
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


def stop_token_ids(model, tokenizer) -> list[int]:
    """The stop tokens of every sampler: the model's generation-config EOS id(s), else the tokenizer's."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        return []
    return [int(t) for t in configured] if isinstance(configured, (list, tuple)) else [int(configured)]


def _devices_in_use(model) -> list[int]:
    """CUDA device indices whose RNG a seeded sampler must leave as it found them: every initialised one
    (``torch.manual_seed`` reseeds them all, not only the model's)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    return list(range(torch.cuda.device_count()))


def _stack_extra(rows: list[dict[str, torch.Tensor]], device: torch.device, prompt_width: int | None = None,
                 total: int | None = None) -> dict[str, torch.Tensor]:
    """The rows' extra inputs as one batch: concatenated along dim 0.  Per-token fields
    (:data:`latentx.vision.TOKEN_FIELDS`, e.g. ``mm_token_type_ids`` ``[1, L_i]``) are aligned with the
    left-padded prompt (``prompt_width`` columns) and extended with zeros over the response (to ``total``)."""
    from latentx.vision import TOKEN_FIELDS

    if not rows or not rows[0]:
        return {}
    keys = rows[0].keys()
    for i, row in enumerate(rows):
        if row.keys() != keys:
            raise ValueError(f"extra_inputs[{i}] has keys {sorted(row)}, expected {sorted(keys)} like the first prompt")
    out = {}
    for key in keys:
        if key in TOKEN_FIELDS and prompt_width is not None:
            width = total or prompt_width
            out[key] = torch.cat([F.pad(row[key], (prompt_width - row[key].shape[-1], width - prompt_width))
                                  for row in rows]).to(device)
        else:
            out[key] = torch.cat([row[key] for row in rows]).to(device)
    return out


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
    *,
    seed: int | None = None,
    extra_inputs: list[dict[str, torch.Tensor]] | None = None,
    images: list[list] | None = None,
    progress: bool = False,
    desc: str = "generating",
) -> Sequences:
    """The one generation core: ``samples_per_prompt`` responses for each prompt with HF ``generate``.

    Every sampler of latentx goes through here: training rollouts, ``latentx eval`` (through
    :func:`latentx.evaluate.generate_hf`), the trainer's held-out evaluation, the warm start's accuracy
    probe, ``analyze`` and ``study``.

    - Rows ``g*R .. g*R+R-1`` are the responses of prompt ``g`` (group ``g``), whatever the batching:
      jobs are generated longest prompt first (little padding) and put back in prompt order.
    - Stop tokens: :func:`stop_token_ids` (the generation config's EOS list, else the tokenizer's EOS).
      Everything after a response's first stop token is padding; a pad token sampled mid-response is a
      real sampled token and stays valid.  ``ended`` says which responses stopped at a stop token.
    - Temperature 0 is greedy; with ``samples_per_prompt > 1`` it generates once and repeats the response.
    - RNG: ``seed=None`` draws from the global torch RNG (the training stream, which advances);
      ``seed=s`` draws from a stream seeded with ``s`` inside ``torch.random.fork_rng`` over the CPU and
      every initialised CUDA device, so the caller's random state is left exactly as it was.
    - ``extra_inputs``: optional, one dict per *prompt* of extra ``generate`` / forward keyword inputs
      (e.g. ``{"pixel_values": [1, ...], "image_grid_thw": [1, 3]}``), each tensor with a leading
      dimension of 1; rows of a batch are concatenated along dim 0.  They are kept per row in
      ``Sequences.extra_inputs`` so that :func:`policy_forward` scores the responses with them.
    - ``images``: optional, prompt g's images (a vision-language policy, :mod:`latentx.vision`): the
      prompts are encoded by the model's processor (placeholders expanded), the vision tensors become the
      rows' extra inputs (``pixel_values`` rows, ``image_grid_thw``, per-token ``mm_token_type_ids``), and
      the image placeholder ids are never sampled (:func:`latentx.vision.suppressed_token_ids`).
    - The model's training flag is restored.
    """
    if not prompts:
        raise ValueError("prompts must not be empty")
    if samples_per_prompt < 1 or max_new_tokens < 1 or generation_batch_size < 1:
        raise ValueError(
            "samples_per_prompt, max_new_tokens and generation_batch_size must be >= 1, got "
            f"{samples_per_prompt}, {max_new_tokens}, {generation_batch_size}"
        )
    if extra_inputs is not None and len(extra_inputs) != len(prompts):
        raise ValueError(f"extra_inputs must have one dict per prompt ({len(prompts)}), got {len(extra_inputs)}")
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    special = adds_bos(tokenizer, prompts)
    suppress: list[int] = []
    if images is not None and any(images):
        from latentx.vision import encode_images, suppressed_token_ids

        encoded, vision_rows = encode_images(tokenizer, prompts, images, add_special_tokens=special)
        extra_inputs = [{**(extra_inputs[i] if extra_inputs else {}), **row} for i, row in enumerate(vision_rows)]
        suppress = list(suppressed_token_ids(model))
    else:
        encoded = [tokenizer(p, add_special_tokens=special)["input_ids"] for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {i} tokenises to nothing: {prompts[i][:80]!r}; check the task's prompt format")
    greedy = temperature == 0
    copies = 1 if greedy else samples_per_prompt
    jobs = sorted(((i, c) for i in range(len(prompts)) for c in range(copies)), key=lambda job: -len(encoded[job[0]]))
    gen_kwargs: dict = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=stops or None,
                            do_sample=not greedy)
    if not greedy:
        gen_kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    if suppress:
        gen_kwargs["suppress_tokens"] = suppress
    outputs: dict[tuple[int, int], list[int]] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=_devices_in_use(model), enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            bar = tqdm(total=len(jobs), desc=desc, unit="sample", disable=not progress, leave=False)
            for start in range(0, len(jobs), generation_batch_size):
                batch = jobs[start : start + generation_batch_size]
                width = max(len(encoded[i]) for i, _ in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                for row, (i, _) in enumerate(batch):
                    input_ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i], dtype=torch.long)
                    attention[row, width - len(encoded[i]) :] = 1
                extra = _stack_extra([extra_inputs[i] for i, _ in batch], device, width) if extra_inputs else {}
                out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                     **extra, **gen_kwargs)
                for job, tokens in zip(batch, out[:, width:].cpu().tolist()):
                    outputs[job] = tokens
                bar.update(len(batch))
            bar.close()
    finally:
        model.train(was_training)

    # Back in prompt order, prompts left-padded to P, responses right-padded to T.
    order = [(i, c if copies > 1 else 0) for i in range(len(prompts)) for c in range(samples_per_prompt)]
    p_len = max(len(ids) for ids in encoded)
    t_len = max(1, max(len(tokens) for tokens in outputs.values()))
    n = len(order)
    prompt_ids = torch.full((n, p_len), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((n, p_len), dtype=torch.long)
    response = torch.full((n, t_len), pad_id, dtype=torch.long)
    for row, (i, c) in enumerate(order):
        ids, tokens = encoded[i], outputs[(i, c)]
        prompt_ids[row, p_len - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        prompt_mask[row, p_len - len(ids) :] = 1
        if tokens:
            response[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    lengths = torch.tensor([len(outputs[job]) for job in order], dtype=torch.long)
    within = torch.arange(t_len)[None, :] < lengths[:, None]
    if stops:  # valid: up to and including the first stop token
        is_stop = torch.isin(response, torch.tensor(stops, dtype=torch.long)) & within
        before_stop = (is_stop.long().cumsum(1) - is_stop.long()) == 0
        response_mask = within & before_stop
        ended = is_stop.any(1)
    else:  # no stop token: ``generate`` pads rows after the length cap only; strip trailing padding
        real = (response != pad_id) & within
        response_mask = real.long().flip(1).cummax(1).values.flip(1).bool()
        ended = torch.zeros(n, dtype=torch.bool)
    texts = tokenizer.batch_decode(response.masked_fill(~response_mask, pad_id), skip_special_tokens=True)
    return Sequences(
        input_ids=torch.cat([prompt_ids, response], dim=1),
        attention_mask=torch.cat([prompt_mask, response_mask.long()], dim=1),
        prompt_length=p_len,
        response_mask=response_mask,
        texts=texts,
        ended=ended,
        extra_inputs=[extra_inputs[i] for i, _ in order] if extra_inputs is not None else None,
    )


@dataclass
class ForwardOutput:
    """Per-token quantities of the response positions of one forward."""

    logp: torch.Tensor  # [N, T] log-prob of the sampled token
    entropy: torch.Tensor  # [N, T] token entropy of the predictive distribution
    hidden: torch.Tensor | None  # [N, T, d] last-layer hidden states (after the final norm)


def _model_inputs(seqs: Sequences, device: torch.device) -> dict:
    ids = seqs.input_ids.to(device)
    mask = seqs.attention_mask.to(device)
    inputs = dict(input_ids=ids, attention_mask=mask, use_cache=False)
    if seqs.extra_inputs:  # e.g. a VLM: the model derives its (3-D rope) positions from mm_token_type_ids
        inputs.update(_stack_extra(seqs.extra_inputs, device, seqs.prompt_length, ids.shape[1]))
    else:
        inputs["position_ids"] = position_ids_from_mask(mask)
    return inputs


def _suppressed(model, seqs: Sequences) -> tuple[int, ...]:
    """Token ids the sampler never draws for these sequences (a VLM's image placeholders)."""
    if not seqs.extra_inputs:
        return ()
    from latentx.vision import suppressed_token_ids

    return tuple(suppressed_token_ids(model))


def _response_scores(logits: torch.Tensor, targets: torch.Tensor, want_entropy: bool,
                     suppressed: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """log π of ``targets`` and the token entropies from response-position ``logits [N, T, V]`` (float32);
    ``suppressed`` ids get logit -1e30 (the sampler's distribution: they are never sampled)."""
    from latentx.dynamics import token_entropies

    logits = logits.float()
    if suppressed:
        logits = logits.index_fill(-1, torch.tensor(suppressed, device=logits.device), -1e30)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    entropy = token_entropies(logits) if want_entropy else torch.zeros_like(logp)
    return logp, entropy


def _keeps_logits(model) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


#: Config fields of causal LMs whose logits are more than ``lm_head(h)`` (scaled or soft-capped): for
#: them the LM head is applied by the model itself (``logits_to_keep``), not chunk by chunk here.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale",
                     "logit_softcapping")

#: Elements of one chunk of response-position logits (``rows × positions × vocabulary``): 2^24 float32
#: values = 64 MiB, whatever the vocabulary and response length.
SCORE_CHUNK_ELEMENTS = 2**24


def _plain_head(model):
    """The LM head when the logits are exactly ``head(last_hidden_state)``, else None."""
    config = getattr(model, "config", None)
    if config is None or any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head if isinstance(head, torch.nn.Linear) else None


def _chunked_scores(head, hidden: torch.Tensor, targets: torch.Tensor, want_entropy: bool,
                    suppressed: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_response_scores` of ``head(hidden)``, a few positions at a time: never more than
    :data:`SCORE_CHUNK_ELEMENTS` logits alive.  With grad, each chunk is checkpointed (its logits are
    recomputed in the backward pass instead of kept), so the graph holds only the hidden states; when
    one chunk holds every position nothing is checkpointed (no recomputation for small vocabularies)."""
    from torch.utils.checkpoint import checkpoint

    n, t = targets.shape
    step = max(1, SCORE_CHUNK_ELEMENTS // max(1, n * head.out_features))

    def score(h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _response_scores(head(h), y, want_entropy, suppressed)

    parts = []
    for lo in range(0, t, step):
        h, y = hidden[:, lo : lo + step], targets[:, lo : lo + step]
        if step < t and torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters())):
            parts.append(checkpoint(score, h, y, use_reentrant=False))
        else:
            parts.append(score(h, y))
    return torch.cat([lp for lp, _ in parts], dim=1), torch.cat([e for _, e in parts], dim=1)


def policy_forward(model, seqs: Sequences, want_hidden: bool, want_entropy: bool = True) -> ForwardOutput:
    """One forward of ``model`` over ``seqs``: log-probs, entropies and hidden states of the response.

    Lean: the backbone's ``last_hidden_state`` is read by a forward hook, as the TRL and verl adapters
    read it (:mod:`latentx.integrations.backbone`; ``hidden_states[-1]`` after the final norm, METHODS.md
    §0), the model's own LM head runs on one position only (``logits_to_keep=1``), and the head is then
    applied to the ``T`` positions that predict response tokens, a chunk at a time
    (:func:`_chunked_scores`), so neither every layer's states nor full-sequence logits are ever
    materialised.  A model whose logits are scaled / soft-capped gets its head from the model
    (``logits_to_keep=T + 1``); one without a findable backbone or ``logits_to_keep`` goes through
    :func:`policy_forward_reference`.  Runs with or without grad, as the caller decides.
    """
    from latentx.integrations.backbone import find_backbone, last_hidden_state

    try:
        backbone = find_backbone(model)
    except ValueError:
        return policy_forward_reference(model, seqs, want_hidden, want_entropy)
    if not _keeps_logits(model):
        return policy_forward_reference(model, seqs, want_hidden, want_entropy)
    device = next(model.parameters()).device
    inputs = _model_inputs(seqs, device)
    p, t = seqs.prompt_length, seqs.response_length
    head = _plain_head(model)
    captured: list[torch.Tensor] = []
    handle = backbone.register_forward_hook(lambda m, a, o: captured.append(last_hidden_state(o)))
    try:
        out = model(**inputs, logits_to_keep=1 if head is not None else t + 1)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise ValueError(f"the backbone of {type(model).__name__} ran {len(captured)} times in one forward; expected once")
    states = captured[0][:, p - 1 : p - 1 + t]
    targets = inputs["input_ids"][:, p : p + t]
    suppressed = _suppressed(model, seqs)
    if head is not None:
        logp, entropy = _chunked_scores(head, states, targets, want_entropy, suppressed)
    else:
        logp, entropy = _response_scores(out.logits[:, :t], targets, want_entropy, suppressed)
    return ForwardOutput(logp=logp, entropy=entropy, hidden=states if want_hidden else None)


def policy_forward_reference(model, seqs: Sequences, want_hidden: bool, want_entropy: bool = True) -> ForwardOutput:
    """The plain forward :func:`policy_forward` must equal: ``output_hidden_states=True`` and full-sequence
    logits, then the last layer and the response positions sliced out (what it computes and throws away
    is what ``bench/forward.py`` measures)."""
    device = next(model.parameters()).device
    inputs = _model_inputs(seqs, device)
    out = model(**inputs, output_hidden_states=want_hidden)
    p, t = seqs.prompt_length, seqs.response_length
    logp, entropy = _response_scores(out.logits[:, p - 1 : p - 1 + t], inputs["input_ids"][:, p : p + t], want_entropy,
                                     _suppressed(model, seqs))
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
