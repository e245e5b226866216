"""Dynamic sampling (DAPO, Yu et al. 2025; the ReLaX authors' code, METHODS.md §3a): a prompt group whose
rewards are all equal has zero GRPO advantage everywhere and carries no policy-gradient signal, so it is
dropped and replaced by a group of a fresh prompt; sampling repeats up to a retry limit.

``rollout.dynamic_sampling: true`` turns it on for any objective; ``rollout.dynamic_sampling_retries`` bounds
the extra sampling rounds.  When the limit is reached before the step is full, the remaining places are
filled with dropped groups (zero advantage, as plain GRPO would have them), so every step has the same
number of groups; the shortfall is logged (``dynamic_sampling_short``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from latentx.rollout import Sequences

__all__ = ["concat_sequences", "informative_groups", "fill_informative"]

#: ``draw(n_groups) -> (instances, seqs, rewards, correct)``: sample and score n fresh prompt groups.
Draw = Callable[[int], tuple[list, Sequences, torch.Tensor, torch.Tensor]]


def concat_sequences(parts: list[Sequences], pad_id: int) -> Sequences:
    """Stack sampled batches: prompts left-padded to the longest prompt, responses right-padded."""
    P = max(p.prompt_length for p in parts)
    T = max(p.response_length for p in parts)
    ids, att, resp = [], [], []
    for p in parts:
        left, right = P - p.prompt_length, T - p.response_length
        prompt_ids, response_ids = p.input_ids[:, : p.prompt_length], p.input_ids[:, p.prompt_length :]
        prompt_att, response_att = p.attention_mask[:, : p.prompt_length], p.attention_mask[:, p.prompt_length :]
        ids.append(torch.cat([F.pad(prompt_ids, (left, 0), value=pad_id), F.pad(response_ids, (0, right), value=pad_id)], 1))
        att.append(torch.cat([F.pad(prompt_att, (left, 0)), F.pad(response_att, (0, right))], 1))
        resp.append(F.pad(p.response_mask, (0, right), value=False))
    texts = [t for p in parts for t in p.texts]
    ended = torch.cat([p.ended for p in parts]) if all(p.ended is not None for p in parts) else None
    extra = None
    if any(p.extra_inputs is not None for p in parts):
        if any(p.prompt_length != P or p.extra_inputs is None for p in parts):
            raise ValueError(
                "rollout.dynamic_sampling: refilled image prompts are padded to different lengths; "
                "turn rollout.dynamic_sampling off for this task"
            )
        extra = [row for p in parts for row in p.extra_inputs]
    return Sequences(torch.cat(ids), torch.cat(att), P, torch.cat(resp), texts, ended=ended, extra_inputs=extra)


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[G]`` bool: the groups (consecutive ``group_size`` rows) whose rewards are not all equal."""
    r = rewards.detach().float().view(-1, group_size)
    return (r.max(1).values - r.min(1).values) > 0


def fill_informative(draw: Draw, n_groups: int, group_size: int, retries: int, pad_id: int):
    """Sample ``n_groups`` groups, keeping only informative ones, with at most ``retries`` refill rounds.

    Returns ``(instances, seqs, rewards, correct, info)``; ``info``: ``dynamic_sampling_rounds`` (extra
    rounds used), ``dynamic_sampling_dropped`` (groups dropped), ``dynamic_sampling_short`` (places filled
    with dropped groups because the retry limit was reached).
    """
    kept: list[tuple[list, Sequences, torch.Tensor, torch.Tensor]] = []
    dropped: list[tuple[list, Sequences, torch.Tensor, torch.Tensor]] = []
    have, rounds, n_dropped = 0, 0, 0
    need = n_groups
    while True:
        instances, seqs, rewards, correct = draw(need)
        good = informative_groups(rewards, group_size)
        for g in range(len(instances)):
            rows = torch.arange(g * group_size, (g + 1) * group_size)
            item = ([instances[g]], seqs.select(rows), rewards[rows], correct[rows])
            (kept if bool(good[g]) else dropped).append(item)
        have = len(kept)
        n_dropped += int((~good).sum())
        if have >= n_groups or rounds >= retries:
            break
        rounds += 1
        need = n_groups - have
    short = max(0, n_groups - have)
    chosen = kept[:n_groups] + dropped[:short]
    seqs = concat_sequences([c[1] for c in chosen], pad_id)
    info = {
        "dynamic_sampling_rounds": float(rounds),
        "dynamic_sampling_dropped": float(n_dropped),
        "dynamic_sampling_short": float(short),
    }
    return (
        [c[0][0] for c in chosen], seqs, torch.cat([c[2] for c in chosen]), torch.cat([c[3] for c in chosen]), info,
    )
