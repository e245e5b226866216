"""Per-response latent-dynamics signals of one model: sample, one forward each, reduce (METHODS.md §0-§2).

For every sampled response i of one model this module computes, from ONE no-grad forward with hidden states
(:func:`latentx.rollout.policy_forward`, final-layer states after the final norm, METHODS.md §0):

* ``er``, ``erv``, ``era`` -- effective rank of the whole response and the velocity / acceleration of its
  prefix series m_k (METHODS.md §1, :func:`latentx.dynamics.rank_dynamics`);
* ``dsd`` -- Dynamic Spectral Dispersion Var_j |lambda_j(K)| (METHODS.md §2, :func:`latentx.dynamics.dsd_with_info`),
  the Koopman eigenvalues lambda_j and their Residual-DMD residuals (:func:`latentx.dynamics.koopman_spectrum`);
* ``entropy`` -- mean token entropy of the policy over the response's tokens (natural log);
* ``confidence`` -- mean log-probability of the sampled tokens, (1/T) sum_t log pi(o_t | o_<t), <= 0;
  higher means more confident (exp of it is the geometric-mean probability of the sampled tokens);
* ``length`` (tokens, the EOS counts), ``reward`` and ``correct`` (the task's verifier);
* ``matched_length``, ``er_matched``, ``dsd_matched`` -- ER and DSD of the response's first T_g tokens, T_g the
  shortest length in its prompt's group (:func:`matched_lengths`): the per-input dispersion compares these,
  because ER and DSD both change with length.

Undefined values are NaN here (the trainer uses 0, METHODS.md §1, but 0 would distort statistics):
ER needs >= 2 tokens, DSD and the spectrum >= 3 tokens (2 snapshot pairs), ERV >= 2 and ERA >= 3 prefix
windows (T' - 1 >= 2s, resp. 3s, with T' = min(T, window)).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from latentx import dynamics
from latentx.objectives.base import per_response_mean
from latentx.objectives.relax import RelaxConfig
from latentx.rollout import Sequences, policy_forward, sample_responses
from latentx.vision import task_images
from latentx.tasks import Task

__all__ = [
    "SignalSettings",
    "PrefixSeries",
    "ModelSignals",
    "signal_defaults",
    "prefix_effective_ranks",
    "window_counts",
    "matched_lengths",
    "compute_model_signals",
]


def signal_defaults(max_new_tokens: int) -> tuple[int, int]:
    """``(stride, m)`` scaled to responses of at most ``max_new_tokens`` = L tokens.

    The same rule as ``latentx train``'s ``signals.auto_scale``: stride = clamp(L // 8, 2, 40) and
    m = clamp(L // 3, 4, 50); both reach the papers' values (40, 50) from L = 320 / 150 tokens on.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    return int(min(40, max(2, max_new_tokens // 8))), int(min(50, max(4, max_new_tokens // 3)))


@dataclass
class SignalSettings:
    """How the signals are computed (shared by every model of one analysis)."""

    stride: int
    window: int | None = 512
    m: int = 50
    ridge: float = 1e-3
    scaling: str = "mean"
    fit_epochs: int = 1
    fit_seed: int = 0
    batch_size: int = 16  # responses per generate / forward chunk (rounded to whole prompt groups)
    examples: int = 3  # responses per model whose prefix ER series is kept for the figure

    def __post_init__(self) -> None:
        for name in ("stride", "m", "fit_epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.window is not None and (isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 2):
            raise ValueError(f"window must be an int >= 2 or None, got {self.window!r}")
        if isinstance(self.examples, bool) or not isinstance(self.examples, int) or self.examples < 0:
            raise ValueError(f"examples must be an int >= 0, got {self.examples!r}")


def window_counts(lengths: np.ndarray, stride: int, window: int | None) -> np.ndarray:
    """K, the number of prefix windows of METHODS.md §1 per response (0 when T' < 2s)."""
    tail = np.asarray(lengths) if window is None else np.minimum(lengths, window)
    return np.where(tail >= 2 * stride, (tail - 1) // stride, 0)


@dataclass
class PrefixSeries:
    """The prefix ER series of one response (METHODS.md §1) plus a dense curve for plotting.

    ``window_sizes[k-1]`` = t_k + 1 = k*s + 1 rows of the tail H' and ``window_er[k-1]`` = m_k;
    ``dense_sizes`` / ``dense_er``: ER(H'[:n]) for a grid of prefix sizes n (all n when T' is small).
    ``tail_start``: index of the first response token in the tail window (0 unless T > window).
    """

    window_sizes: np.ndarray
    window_er: np.ndarray
    dense_sizes: np.ndarray
    dense_er: np.ndarray
    tail_start: int
    stride: int


def _prefix_ranks(tail: Tensor, sizes: list[int], chunk: int = 32) -> np.ndarray:
    """ER(tail[:n]) for every n in ``sizes``, by :func:`latentx.dynamics.effective_rank` on masked copies."""
    out = []
    positions = torch.arange(tail.shape[0])
    for start in range(0, len(sizes), chunk):
        part = torch.tensor(sizes[start : start + chunk])
        mask = positions[None, :] < part[:, None]
        out.append(dynamics.effective_rank(tail.expand(len(part), -1, -1), mask).double().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def prefix_effective_ranks(H: Tensor, stride: int, window: int | None = 512, dense_points: int = 96) -> PrefixSeries:
    """Prefix ER series m_k = ER(H'[: k*s + 1]), k*s < T', of ONE unpadded trajectory ``H: [T, d]``.

    H' is the last ``window`` rows (METHODS.md §1).  The windows are listed whenever k*s < T' (so also when
    T' < 2s, where ERV = ERA = 0 by definition).  Each value is :func:`latentx.dynamics.effective_rank` of
    the prefix, so the series is exactly the one ``rank_dynamics`` averages into ERV / ERA.
    """
    if not isinstance(H, Tensor) or H.ndim != 2:
        raise ValueError(f"H must be one trajectory of shape [T, d], got {getattr(H, 'shape', type(H).__name__)}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    H = H.detach().float().cpu()
    tail = H if window is None else H[-window:]
    t_tail = tail.shape[0]
    window_sizes = [k * stride + 1 for k in range(1, t_tail) if k * stride < t_tail]
    grid = list(range(2, t_tail + 1))
    if len(grid) > dense_points:
        grid = sorted(set(np.linspace(2, t_tail, dense_points).round().astype(int).tolist()) | set(window_sizes))
    dense = _prefix_ranks(tail, grid) if grid else np.zeros(0)
    lookup = dict(zip(grid, dense))  # the grid holds every window size
    window_er = np.array([lookup[n] for n in window_sizes])
    return PrefixSeries(np.array(window_sizes, dtype=np.int64), window_er, np.array(grid, dtype=np.int64), dense,
                        H.shape[0] - t_tail, stride)


@dataclass
class ModelSignals:
    """Everything computed for one model.

    ``columns``: per-response columns (equal length).  ``moduli``: ``[n, m]`` eigenvalue moduli sorted in
    decreasing order (NaN rows where undefined); ``matched_moduli``: the same on the group's matched length
    (see :func:`matched_lengths`).  ``eigen``: long-format eigenvalue table.  ``examples``:
    response id -> :class:`PrefixSeries`.  ``notes``: messages for the user (empty responses, ...).
    """

    label: str
    spec: str
    hidden_size: int
    m: int
    dictionary_source: str
    columns: dict[str, list]
    moduli: np.ndarray
    matched_moduli: np.ndarray
    eigen: dict[str, list]
    examples: dict[int, PrefixSeries] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over each response's valid tokens; NaN (not 0) for a response without any."""
    mean = per_response_mean(values.float(), mask)
    return torch.where(mask.any(dim=1), mean, torch.full_like(mean, math.nan))


def _chunks(n_prompts: int, samples: int, batch_size: int) -> list[slice]:
    per = max(1, batch_size // samples)
    return [slice(s, min(s + per, n_prompts)) for s in range(0, n_prompts, per)]


def _pad_cat(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    t = max(h.shape[1] for h, _ in parts)
    H = torch.cat([torch.nn.functional.pad(h, (0, 0, 0, t - h.shape[1])) for h, _ in parts])
    M = torch.cat([torch.nn.functional.pad(m, (0, t - m.shape[1])) for _, m in parts])
    return H, M


def compute_model_signals(
    label: str,
    spec: str,
    model,
    tokenizer,
    task,
    instances: list,
    samples: int,
    max_new_tokens: int,
    settings: SignalSettings,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    dictionary: dynamics.KoopmanDictionary | None = None,
    dictionary_source: str = "",
    progress: bool = False,
) -> ModelSignals:
    """Sample ``samples`` responses per instance and compute every per-response signal (module docstring).

    ``dictionary``: a fitted Koopman dictionary to use (from a run or ``--dictionary``); ``None`` fits one on
    this model's trajectories with the training defaults (:class:`latentx.objectives.relax.RelaxConfig`:
    Adam, lr 1e-4, mini-batches of 64, residual loss; ``settings.fit_epochs`` passes; seed
    ``settings.fit_seed``), exactly as ``latentx train`` does on its first step.
    """
    if not instances:
        raise ValueError("instances must not be empty")
    timings = {"sample": 0.0, "forward": 0.0, "signals": 0.0, "fit": 0.0}
    cpu_start = time.process_time()
    torch.manual_seed(seed)
    kept, cols = _rollout(label, model, tokenizer, task, instances, samples, max_new_tokens, settings, temperature,
                          top_p, timings, progress)
    lengths = np.asarray(cols["length"])
    hidden_size = kept[0][0].shape[-1]

    t0 = time.perf_counter()
    if dictionary is None:
        dictionary, dictionary_source = _fit_dictionary(kept, lengths, settings, progress)
    elif dictionary.hidden_size != hidden_size:
        raise ValueError(
            f"model {label!r}: the Koopman dictionary ({dictionary_source}) expects hidden size "
            f"{dictionary.hidden_size} but the model's hidden states have {hidden_size}"
        )
    timings["fit"] = time.perf_counter() - t0
    m = dictionary.m if dictionary is not None else settings.m

    t0 = time.perf_counter()
    dsd_raw, eigvals, residuals = _koopman_signals(kept, dictionary, m, settings)
    matched = matched_lengths(np.asarray(cols["prompt_index"]), lengths)
    dsd_matched, eig_matched, _ = _koopman_signals(kept, dictionary, m, settings, limit=matched)
    er_matched = np.concatenate([
        dynamics.effective_rank(hidden, _truncate(mask, limit)).double().numpy()
        for (hidden, mask), limit in zip(kept, _split(matched, kept))
    ])
    timings["signals"] += time.perf_counter() - t0

    # undefined values -> NaN (module docstring)
    windows = window_counts(lengths, settings.stride, settings.window)
    short = lengths < 3
    cols["er"] = np.where(lengths < 2, np.nan, cols["er"]).tolist()
    cols["erv"] = np.where(windows < 2, np.nan, cols["erv"]).tolist()
    cols["era"] = np.where(windows < 3, np.nan, cols["era"]).tolist()
    cols["dsd"] = np.where(short, np.nan, dsd_raw).tolist()
    cols["matched_length"] = matched.tolist()
    cols["er_matched"] = np.where(matched < 3, np.nan, er_matched).tolist()
    cols["dsd_matched"] = np.where(matched < 3, np.nan, dsd_matched).tolist()
    eigvals[short] = np.nan
    residuals[short] = np.nan
    moduli = np.abs(eigvals)  # sorted by decreasing modulus (koopman_spectrum)
    cols["spectral_radius"] = moduli[:, 0].tolist()
    with np.errstate(invalid="ignore"):
        finite = np.where(np.isfinite(residuals), residuals, np.nan)
        cols["median_residual"] = [float(np.nanmedian(r)) if np.isfinite(r).any() else math.nan for r in finite]
    cols["windows"] = windows.tolist()
    cols["response_id"] = list(range(len(lengths)))

    rows = [(h[j], mk[j]) for h, mk in kept for j in range(h.shape[0])]
    series = {i: prefix_effective_ranks(rows[i][0][rows[i][1]], settings.stride, settings.window)
              for i in _pick_examples(cols, windows, settings.examples)}
    timings["cpu"] = time.process_time() - cpu_start  # CPU seconds of all threads (the others are wall times)
    matched_moduli = np.where((matched < 3)[:, None], np.nan, np.abs(eig_matched))
    return ModelSignals(label, spec, hidden_size, m, dictionary_source, cols, moduli, matched_moduli,
                        _eigen_columns(cols, eigvals, residuals, short), series, timings,
                        _notes(label, cols, short, windows, settings.stride))


def _rollout(label: str, model, tokenizer, task, instances: list, samples: int, max_new_tokens: int,
             settings: SignalSettings, temperature: float, top_p: float, timings: dict[str, float],
             progress: bool) -> tuple[list[tuple[Tensor, Tensor]], dict[str, list]]:
    """Sample and run one forward per chunk; returns the hidden states (CPU float32, with masks) per chunk and
    the columns that need only that forward (length, entropy, confidence, ER / ERV / ERA, reward, ...)."""
    from tqdm.auto import tqdm

    prompts = [task.format_prompt(inst, tokenizer) for inst in instances]
    images = task_images(task, instances)  # a VLM's prompts carry their images through sampler and forward
    default_correct = type(task).is_correct is Task.is_correct  # reward >= 1: grade each response once
    kept: list[tuple[Tensor, Tensor]] = []
    cols: dict[str, list] = {k: [] for k in ("prompt_index", "sample_index", "length", "entropy", "confidence",
                                              "er", "erv", "era", "reward", "correct", "text")}
    chunks = _chunks(len(prompts), samples, settings.batch_size)
    for part in tqdm(chunks, desc=f"{label}: sample + forward", disable=not progress, leave=False):
        t0 = time.perf_counter()
        seqs: Sequences = sample_responses(model, tokenizer, prompts[part], samples, max_new_tokens, temperature, top_p,
                                           images=images[part] if images else None)
        t1 = time.perf_counter()
        with torch.no_grad():
            fo = policy_forward(model, seqs, want_hidden=True)
        t2 = time.perf_counter()
        mask = seqs.response_mask.cpu()
        hidden = fo.hidden.detach().float().cpu()
        rd = dynamics.rank_dynamics(hidden, mask, stride=settings.stride, window=settings.window)
        timings["sample"] += t1 - t0
        timings["forward"] += t2 - t1
        timings["signals"] += time.perf_counter() - t2
        kept.append((hidden, mask))
        for row, text in enumerate(seqs.texts):
            g = part.start + row // samples
            reward = float(task.reward(instances[g], text))
            cols["prompt_index"].append(g)
            cols["sample_index"].append(row % samples)
            cols["reward"].append(reward)
            cols["correct"].append(reward >= 1.0 if default_correct else bool(task.is_correct(instances[g], text)))
            cols["text"].append(text)
        cols["length"].extend(mask.sum(dim=1).tolist())
        cols["entropy"].extend(_masked_mean(fo.entropy.cpu(), mask).tolist())
        cols["confidence"].extend(_masked_mean(fo.logp.cpu(), mask).tolist())
        cols["er"].extend(rd.er.tolist())
        cols["erv"].extend(rd.erv.tolist())
        cols["era"].extend(rd.era.tolist())
    return kept, cols


def _fit_dictionary(kept: list[tuple[Tensor, Tensor]], lengths: np.ndarray, settings: SignalSettings,
                    progress: bool) -> tuple[dynamics.KoopmanDictionary | None, str]:
    """A dictionary fitted on these trajectories as ``latentx train`` fits it, and its description."""
    if not (lengths >= 3).any():
        return None, "none (no response has the 3 tokens a Koopman fit needs)"
    H, M = _pad_cat(kept)
    dictionary = dynamics.KoopmanDictionary.from_config(
        RelaxConfig(), H.shape[-1], m=settings.m, seed=settings.fit_seed, ridge=settings.ridge,
        scaling=settings.scaling, fit_epochs=settings.fit_epochs,
    )
    dictionary.fit(H, M, progress=progress)
    dictionary.requires_grad_(False)
    return dictionary, f"fitted on these {len(lengths)} trajectories ({dictionary.steps_} Adam steps)"


def _eigen_columns(cols: dict[str, list], eigvals: np.ndarray, residuals: np.ndarray, short: np.ndarray) -> dict[str, list]:
    """The long-format eigenvalue table: one row per mode of every response that has a spectrum."""
    m = eigvals.shape[1]
    eigen: dict[str, list] = {k: [] for k in ("response_id", "prompt_index", "mode", "real", "imag", "modulus",
                                              "residual", "correct")}
    for i in np.nonzero(~short)[0]:
        eigen["response_id"] += [int(i)] * m
        eigen["prompt_index"] += [cols["prompt_index"][i]] * m
        eigen["mode"] += list(range(m))
        eigen["real"] += eigvals[i].real.tolist()
        eigen["imag"] += eigvals[i].imag.tolist()
        eigen["modulus"] += np.abs(eigvals[i]).tolist()
        eigen["residual"] += residuals[i].tolist()
        eigen["correct"] += [cols["correct"][i]] * m
    return eigen


def _notes(label: str, cols: dict[str, list], short: np.ndarray, windows: np.ndarray, stride: int) -> list[str]:
    """Messages about responses whose signals are undefined."""
    n, empty = len(short), sum(1 for t in cols["text"] if not t.strip())
    notes = []
    if short.all():
        notes.append(f"model {label!r}: all {n} responses have fewer than 3 tokens ({empty} with empty text); "
                     "no ER / DSD / spectrum could be computed for it (NaN in the tables)")
    elif short.any() or empty:
        notes.append(f"model {label!r}: {int(short.sum())} of {n} responses have fewer than 3 tokens and "
                     f"{empty} have empty text; their undefined signals are NaN")
    if (windows < 2).all() and not short.all():
        notes.append(f"model {label!r}: no response reaches the {2 * stride + 1} tokens that ERV needs "
                     f"(stride {stride}); lower --stride or raise --max-new-tokens")
    return notes


def matched_lengths(groups: np.ndarray, lengths: np.ndarray, minimum: int = 3) -> np.ndarray:
    """Per response: the shortest length among the responses of its group that have >= ``minimum`` tokens.

    Responses shorter than ``minimum`` get 0 (left out).  Truncating every response of a group to this length
    compares their dynamics over the same number of tokens (ER and DSD both depend on length).
    """
    out = np.zeros(len(lengths), dtype=np.int64)
    for g in np.unique(groups):
        rows = (groups == g) & (lengths >= minimum)
        if rows.any():
            out[rows] = lengths[rows].min()
    return out


def _split(values: np.ndarray, kept: list[tuple[Tensor, Tensor]]) -> list[np.ndarray]:
    """``values`` (one per response) cut into the chunks of ``kept``."""
    bounds = np.cumsum([h.shape[0] for h, _ in kept])[:-1]
    return np.split(values, bounds)


def _truncate(mask: Tensor, limit: np.ndarray | None) -> Tensor:
    """``mask`` restricted to each row's first ``limit[row]`` valid tokens (wherever they sit in the row)."""
    if limit is None:
        return mask
    return mask & (mask.long().cumsum(dim=1) <= torch.as_tensor(limit)[:, None])


def _koopman_signals(
    kept: list[tuple[Tensor, Tensor]],
    dictionary: dynamics.KoopmanDictionary | None,
    m: int,
    settings: SignalSettings,
    limit: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DSD ``[n]``, eigenvalues ``[n, m]`` (decreasing modulus) and residuals ``[n, m]`` of every response.

    ``limit``: per response, use only its first ``limit`` tokens (None: all).  NaN without a dictionary.
    """
    limits = _split(limit, kept) if limit is not None else [None] * len(kept)
    dsd_rows, eig_rows, res_rows = [], [], []
    for (hidden, mask), part in zip(kept, limits):
        if dictionary is None:
            dsd_rows.append(np.full(hidden.shape[0], np.nan))
            eig_rows.append(np.full((hidden.shape[0], m), np.nan + 0j))
            res_rows.append(np.full((hidden.shape[0], m), np.nan))
            continue
        mask = _truncate(mask, part)
        with torch.no_grad():
            info = dictionary.dsd_with_info(hidden, mask)  # the dictionary's own settings (METHODS.md §2)
            spectrum = dictionary.spectrum(hidden, mask)
        dsd_rows.append(info.dsd.double().numpy())
        eig_rows.append(spectrum.eigvals.to(torch.complex128).numpy())
        res_rows.append(spectrum.residuals.double().numpy())
    return np.concatenate(dsd_rows), np.concatenate(eig_rows), np.concatenate(res_rows)


def _pick_examples(cols: dict[str, list], windows: np.ndarray, count: int) -> list[int]:
    """Responses for the prefix-curve figure: the longest correct one first, then the longest others.

    Prefers responses with >= 3 windows (ERA defined), then >= 2, then >= 1.
    """
    if count == 0:
        return []
    lengths = np.asarray(cols["length"])
    for need in (3, 2, 1):
        pool = np.nonzero(windows >= need)[0]
        if len(pool):
            break
    else:
        return []
    ranked = sorted(pool.tolist(), key=lambda i: (-lengths[i], i))
    correct = [i for i in ranked if cols["correct"][i]]
    chosen = correct[:1]
    chosen += [i for i in ranked if i not in chosen][: count - len(chosen)]
    return sorted(chosen)
