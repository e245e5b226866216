"""The math grader: answer extraction, math-verify comparison, time limit, batch pool."""

from __future__ import annotations

import threading
import time

import pytest

from latentx.tasks.grading import (
    _fast_verdict,
    _math_verify_equal,
    extract_answer,
    grade_answer,
    grade_many,
    normalize_number,
)

B = "\\boxed"

# (response, gold, expected). Every row is asserted. Rows where math-verify's verdict is a judgement
# call are marked "# mv:" with the reason we accept it.
GRADING_CASES = [
    # --- integers, decimals, fractions ---
    (f"So the total is {B}{{72}}.", "72", True),
    (f"{B}{{72}}", "72.0", True),
    (f"{B}{{71}}", "72", False),
    (f"{B}{{720}}", "72", False),
    (f"{B}{{-5}}", "-5", True),
    (f"{B}{{5}}", "-5", False),
    (f"{B}{{0.5}}", "\\frac{1}{2}", True),
    (f"{B}{{\\frac{{1}}{{2}}}}", "0.5", True),
    (f"{B}{{\\dfrac{{1}}{{2}}}}", "\\frac12", True),
    (f"{B}{{\\tfrac{{3}}{{4}}}}", "0.75", True),
    (f"{B}{{1/2}}", "\\frac{1}{2}", True),
    (f"{B}{{\\frac{{2}}{{4}}}}", "\\frac{1}{2}", True),
    (f"{B}{{0.51}}", "\\frac{1}{2}", False),
    (f"{B}{{0.333}}", "\\frac{1}{3}", False),  # mv: 3-digit rounding is not equal (6 places compared)
    (f"{B}{{0.3333333}}", "\\frac{1}{3}", True),  # mv: equal after rounding to 6 decimal places
    (f"{B}{{\\frac{{1}}{{3}}}}", "\\frac{2}{3}", False),
    (f"{B}{{1,000}}", "1000", True),
    (f"{B}{{1000}}", "1,000", True),
    (f"{B}{{1.5 \\times 10^{{3}}}}", "1500", True),
    (f"{B}{{007}}", "7", True),
    # --- radicals, pi, symbolic expressions ---
    (f"{B}{{\\frac{{\\sqrt{{2}}}}{{2}}}}", "\\frac{\\sqrt2}{2}", True),
    (f"{B}{{\\sqrt{{2}}/2}}", "\\frac{\\sqrt{2}}{2}", True),
    (f"{B}{{\\frac{{1}}{{\\sqrt{{2}}}}}}", "\\frac{\\sqrt2}{2}", True),
    (f"{B}{{\\sqrt{{3}}}}", "\\frac{\\sqrt2}{2}", False),
    (f"{B}{{2\\sqrt{{3}}}}", "\\sqrt{12}", True),
    (f"{B}{{\\pi/2}}", "\\frac{\\pi}{2}", True),
    (f"{B}{{1.57}}", "\\frac{\\pi}{2}", False),  # mv: a decimal approximation of pi/2 is not pi/2
    (f"{B}{{x^2+2x+1}}", "(x+1)^2", True),
    (f"{B}{{x^2+2x}}", "(x+1)^2", False),
    (f"{B}{{p - q}}", "p-q", True),
    (f"{B}{{q - p}}", "p-q", False),
    (f"{B}{{3+4i}}", "3+4i", True),
    (f"{B}{{4+3i}}", "3+4i", False),
    # --- percentages ---
    (f"{B}{{50\\%}}", "50", True),
    (f"{B}{{50}}", "50\\%", True),
    (f"{B}{{0.5}}", "50\\%", True),  # mv: 50% is read as the number 0.5
    (f"{B}{{40\\%}}", "50\\%", False),
    # --- units, degrees, \text, currency ---
    (f"{B}{{10\\text{{ cm}}}}", "10", True),
    (f"{B}{{10}}", "10\\text{ cm}", True),
    (f"{B}{{12\\text{{ cm}}}}", "10\\text{ cm}", False),
    (f"{B}{{90^\\circ}}", "90", True),
    (f"{B}{{\\$18}}", "18", True),
    (f"{B}{{\\text{{Evelyn}}}}", "\\text{Evelyn}", True),
    (f"{B}{{\\text{{Bob}}}}", "\\text{Evelyn}", False),
    (f"{B}{{\\text{{(C)}}}}", "C", True),
    (f"{B}{{(C)}}", "\\text{(C)}", True),
    (f"{B}{{\\text{{(D)}}}}", "\\text{(C)}", False),
    # --- intervals, tuples, sets, equations ---
    (f"{B}{{[-2,7)}}", "[-2,7)", True),
    (f"{B}{{[-2,7]}}", "[-2,7)", False),
    (f"{B}{{(-\\infty, 3]}}", "(-\\infty,3]", True),
    (f"{B}{{\\left( 3, \\frac{{\\pi}}{{2}} \\right)}}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    (f"{B}{{(3, \\pi)}}", "\\left( 3, \\frac{\\pi}{2} \\right)", False),
    (f"{B}{{(1,2)}}", "(2,1)", False),
    (f"{B}{{\\{{1,2,3\\}}}}", "\\{3,2,1\\}", True),
    (f"{B}{{2, -2}}", "-2, 2", True),  # mv: comma lists are compared as sets
    (f"{B}{{x=5}}", "5", True),
    (f"{B}{{5}}", "x=5", True),
    (f"{B}{{y=2x+3}}", "y = 2x + 3", True),
    (f"{B}{{y=2x+4}}", "y = 2x + 3", False),
    (f"{B}{{\\begin{{pmatrix}} 1 \\\\ 2 \\end{{pmatrix}}}}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", True),
    (f"{B}{{\\begin{{pmatrix}} 2 \\\\ 1 \\end{{pmatrix}}}}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", False),
    # --- extraction: several boxes, \fbox, nested braces, no box ---
    (f"First {B}{{3}}, then corrected: {B}{{4}}", "4", True),
    (f"First {B}{{4}}, then corrected: {B}{{3}}", "4", False),
    ("The result is \\fbox{12}.", "12", True),
    (f"{B}{{\\frac{{\\frac{{1}}{{2}}}}{{3}}}}", "\\frac{1}{6}", True),
    (f"{B} 7", "7", True),
    ("Adding up, the answer is 42.", "42", True),
    ("Adding up, the answer is $\\frac{3}{4}$.", "0.75", True),
    ("Final answer: 17", "17", True),
    ("The final answer is 16", "17", False),
    ("She pays 3 * 6 = 18 dollars.\n#### 18", "18", True),
    ("So 5 + 7 = 12 apples", "12", True),
    ("So 5 + 7 = 12 apples", "7", False),
    ("I am not sure.", "7", False),
    ("", "7", False),
    (f"{B}{{}}", "7", False),
    (f"unfinished {B}{{12", "12", True),  # the unclosed box is ignored; falls back to the last number
    # --- gold given as a full solution (boxed or GSM8K) ---
    (f"{B}{{9}}", "Half of 18 is $\\boxed{9}$.", True),
    ("#### 9", "She has 18 / 2 = <<18/2=9>>9 left.\n#### 9", True),
]


def test_case_table_is_large_enough():
    assert len(GRADING_CASES) >= 60
    assert sum(expected for _, _, expected in GRADING_CASES) >= 20
    assert sum(not expected for _, _, expected in GRADING_CASES) >= 20


def test_grading_table():
    responses = [r for r, _, _ in GRADING_CASES]
    golds = [g for _, g, _ in GRADING_CASES]
    got = grade_many(responses, golds, timeout=20.0, workers=2)
    wrong = [(r, g, e) for (r, g, e), ok in zip(GRADING_CASES, got) if ok != e]
    assert not wrong, "grader disagrees on:\n" + "\n".join(f"  {r!r} vs gold {g!r}: expected {e}" for r, g, e in wrong)


@pytest.mark.parametrize(
    "response, gold, expected",
    [GRADING_CASES[0], GRADING_CASES[2], GRADING_CASES[6], GRADING_CASES[20], GRADING_CASES[23]],
)
def test_grade_answer_agrees_with_batch(response, gold, expected):
    assert grade_answer(response, gold, timeout=20.0) is expected


EXTRACTION_CASES = [
    (f"a {B}{{1}} b {B}{{\\frac{{a}}{{b^{{2}}}}}} c", "\\frac{a}{b^{2}}"),
    ("x \\fbox{7} y", "7"),
    (f"$\\boxed{{5}}$ and \\fbox{{6}}", "6"),
    (f"{B}{{\\{{1,2\\}}}}", "\\{1,2\\}"),
    (f"{B} 7$ done", "7"),
    ("So the answer is $\\frac{1}{2}$. Then", "\\frac{1}{2}"),
    ("The answer is 3.5. Next sentence", "3.5"),
    ("The final answer is: 12", "12"),
    ("Answer: (B)\nmore text 99", "(B)"),
    ("The final answer is: **42**.", "42"),
    ("**Answer:** $7$", "7"),
    ("18 / 2 = 9\n#### 9", "9"),
    ("#### 1,234", "1,234"),
    ("I have 3 cats and 1,000 dogs", "1000"),
    ("ratio 3/4", "3/4"),
    ("it is -2.5 degrees", "-2.5"),
    ("no numbers here", None),
    (f"{B}{{  }} then 4", "4"),
]


@pytest.mark.parametrize("response, expected", EXTRACTION_CASES)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


def test_extraction_order_box_before_phrase_before_hashes_before_number():
    text = f"The answer is 2. #### 3 then 4 {B}{{1}} 5"
    assert extract_answer(text) == "1"
    assert extract_answer("The answer is 2.\n#### 3\n4") == "2"
    assert extract_answer("#### 3\n4") == "3"


@pytest.mark.parametrize(
    "raw, expected",
    [("72.0", "72"), ("72", "72"), ("-0.50", "-0.5"), ("1,000", "1000"), ("0.0", "0"), ("\\frac12", "\\frac12"), ("3.14", "3.14")],
)
def test_normalize_number(raw, expected):
    assert normalize_number(raw) == expected


def test_fast_path_is_exact_and_defers_when_unsure():
    assert _fast_verdict("72", "72.0") is True
    assert _fast_verdict("71", "72") is False
    assert _fast_verdict("0.3333333", "0.333333") is None  # math-verify rounds: let it decide
    assert _fast_verdict("\\frac12", "0.5") is None


def test_fast_path_matches_math_verify_on_numbers():
    pairs = [("72", "72"), ("72", "72.0"), ("-3", "-3"), ("12", "13"), ("0", "-0"), ("100", "10"),
             ("2.50", "2.5"), ("999999", "1000000"), ("-7", "7"), ("0.125", ".125")]
    for pred, gold in pairs:
        fast = _fast_verdict(pred, gold)
        assert fast is not None
        assert fast == _math_verify_equal(pred, gold), (pred, gold)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(TypeError, match="response"):
        grade_answer(None, "1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="gold"):
        grade_answer("1", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        grade_answer("1", "1", timeout=0)
    with pytest.raises(ValueError, match="timeout"):
        grade_answer("1", "1", timeout=float("nan"))
    with pytest.raises(ValueError, match="length"):
        grade_many(["1"], ["1", "2"])
    with pytest.raises(ValueError, match="workers"):
        grade_many(["1"], ["1"], workers=0)


PATHOLOGICAL = f"{B}{{9^{{9^{{9^{{9}}}}}}}}"  # math-verify would compute a gigantic integer power


def test_pathological_answer_times_out_in_a_thread():
    grade_answer(f"{B}{{\\frac{{1}}{{2}}}}", "0.5")  # start a worker outside the timed part
    result: dict[str, object] = {}

    def target() -> None:
        start = time.monotonic()
        result["ok"] = grade_answer(PATHOLOGICAL, "5", timeout=1.0)
        result["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "grading hung"
    assert result["ok"] is False
    assert result["seconds"] < 1.0 + 1.0  # the limit plus killing the worker
    # the grader still works afterwards (a fresh worker is started)
    assert grade_answer(f"{B}{{\\frac{{1}}{{2}}}}", "0.5", timeout=60) is True


def test_pathological_answer_in_batch_does_not_block_others():
    responses = [PATHOLOGICAL, f"{B}{{\\frac{{\\sqrt2}}{{2}}}}", f"{B}{{3}}"]
    golds = ["5", "\\frac{1}{\\sqrt2}", "3"]
    start = time.monotonic()
    got = grade_many(responses, golds, timeout=2.0, workers=2)
    assert got == [False, True, True]
    assert time.monotonic() - start < 60


def test_threads_share_the_grader_safely():
    cases = GRADING_CASES[:12]
    results: list[list[bool]] = [[] for _ in range(3)]

    def target(slot: int) -> None:
        results[slot] = [grade_answer(r, g, timeout=30.0) for r, g, _ in cases]

    threads = [threading.Thread(target=target, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    expected = [e for _, _, e in cases]
    assert results == [expected] * 3


@pytest.mark.parametrize(
    "degenerate",
    ["\\boxed{" * 20_000, "The answer is . " * 20_000, "{" * 100_000, "\\boxed 5 " * 20_000, "#### \n" * 20_000],
)
def test_extraction_is_linear_on_degenerate_responses(degenerate):
    # A collapsed policy can repeat a pattern for thousands of tokens; a quadratic scan would take minutes.
    start = time.monotonic()
    extract_answer(degenerate)
    assert time.monotonic() - start < 5.0


def test_nested_escaped_and_unclosed_boxes():
    assert extract_answer("\\boxed {5} then text") == "5"
    assert extract_answer("\\boxed{a\\}b}") == "a\\}b"
    assert extract_answer("\\boxed{ \\boxed{5}") == "5"  # outer box never closes
    assert extract_answer("} stray \\boxed{5}") == "5"
    assert extract_answer("\\boxedfoo{3} 4") == "4"  # not a box command
    assert extract_answer("x\n####\n5") == "5"  # an empty #### line is no answer


def test_time_limit_covers_worker_start_after_a_timeout():
    """Issue 18 item 10: after a timeout killed the worker, the next call paid 0.6-2 s to start a fresh
    one, outside its limit.  Now a call waits for a (background-started or spare) worker only until its
    own deadline.  The bound here is loose for a loaded CI machine; bench/grader.py --limits measures it."""
    from latentx.tasks import grading

    grading.prewarm(3)
    assert grade_answer(f"{B}{{\\frac{{1}}{{2}}}}", "0.5", timeout=60) is True
    walls = []

    def calls() -> None:
        for response, gold in ((PATHOLOGICAL, "5"), (f"{B}{{\\sqrt{{2}}/2}}", "\\frac{\\sqrt{2}}{2}")) * 2:
            start = time.monotonic()
            grade_answer(response, gold, timeout=1.0)
            walls.append(time.monotonic() - start)

    calls()
    threads = [threading.Thread(target=calls) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(walls) == 4 + 16
    assert max(walls) < 1.0 + 0.5, walls
    # and the grader is still right once its workers have started again
    assert grade_answer(f"{B}{{\\sqrt{{2}}/2}}", "\\frac{\\sqrt{2}}{2}", timeout=60) is True


def test_workers_killed_by_a_timeout_are_replaced_by_forks_of_the_warm_zygote():
    """Issue 18 item 10: a replacement is forked from a warm template (a few ms), not a new interpreter
    that imports sympy again (0.6-2 CPU-s: with 4 threads on 2 cores most normal answers right after a
    timeout found no ready worker and counted as wrong); bench/grader.py --limits measures it."""
    from latentx.tasks import grading

    grading._POOL.close_all()
    assert grade_answer(f"{B}{{\\frac{{1}}{{2}}}}", "0.5", timeout=60) is True
    zygote = grading._POOL._zygote
    assert zygote is not None and zygote.alive
    assert grade_answer(PATHOLOGICAL, "5", timeout=0.5) is False  # its worker is killed
    assert grade_answer(f"{B}{{\\sqrt{{2}}/2}}", "\\frac{\\sqrt{2}}{2}", timeout=60) is True
    assert grading._POOL._zygote is zygote  # the same template served the replacements
    with grading._POOL._cond:
        idle = list(grading._POOL._idle)
    assert idle and all(w.process is None for w in idle)  # forked workers (no Popen of their own)
    with open(f"/proc/{idle[0].pid}/stat") as stat:
        assert int(stat.read().rsplit(")", 1)[1].split()[1]) == zygote.process.pid  # parent: the zygote
    grading._POOL.close_all()
    assert not zygote.alive or zygote.process.wait(timeout=5) is not None


def test_a_grading_process_that_does_not_start_says_why(monkeypatch):
    """A worker or zygote that dies before its ready line: GraderError carrying the end of its stderr
    (read before the file is closed)."""
    from latentx.tasks import grading

    monkeypatch.setattr(grading, "_WORKER_BOOT", "import sys; sys.stderr.write('no sympy here'); sys.exit(1)")
    for start, what in ((grading._Worker, "worker"), (grading._Zygote, "zygote")):
        with pytest.raises(grading.GraderError, match=rf"grading {what} did not start:\nno sympy here"):
            start()
