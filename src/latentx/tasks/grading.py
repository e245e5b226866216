"""Verifiable math grading: pull the final answer out of a response and check it against the reference.

Extraction (:func:`extract_answer`) tries, in this order, and stops at the first that finds something:

1. the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces are matched; ``\\boxed 5`` also counts);
2. the last "the answer is ..." / "final answer: ..." phrase (up to the end of its sentence or line);
3. the last GSM8K-style ``#### 72`` line;
4. the last number in the text (``-3``, ``1,000``, ``2.5``, ``3/4``).

Comparison uses Hugging Face ``math-verify`` (``parse`` + ``verify``): both strings are wrapped as
``\\boxed{...}`` first, because math-verify finds nothing in bare LaTeX such as ``\\frac{\\sqrt2}{2}``.

Time limit — design
-------------------
math-verify's own timeout uses ``signal.alarm``: it only works in the main thread, and a signal cannot
interrupt a long C-level computation anyway (``verify`` on ``9^{9^{9^9}}`` runs big-integer arithmetic
for minutes). So we switch it off (``parsing_timeout=None``, ``timeout_seconds=None``) and enforce our
own limit by running the symbolic check in a *reusable worker subprocess*: the caller waits on a pipe
with a deadline and, if the deadline passes, kills the worker.
This works from any thread, from daemon / pool processes (plain ``subprocess``, not ``multiprocessing``)
and can never hang.

The limit covers the whole call, worker start-up included (issue 18 item 10: a call right after a
timeout used to pay 0.6-2 s to start a fresh worker, outside its limit).  Callers never start a worker
themselves: they wait, until their deadline at most, for an idle one or one being started on a
background thread, and the pool keeps one warm *spare* beyond the workers in use, replaced in the
background whenever one is taken or killed.  A check that finds no ready worker within its limit counts
as wrong, like one that runs out of time; :func:`prewarm` starts workers ahead of the first checks (a
cold start on a loaded machine can take longer than a short limit).  ``bench/grader.py --limits``
measures the wall time of calls right after a timeout, from 1 and 4 threads.

Keeping the common case cheap:

- answers that are plain numbers on both sides (GSM8K, AIME, AMC, most rewards during training) are
  decided in-process by exact rational comparison — no subprocess, no sympy — whenever the answer is
  certain (equal numbers, or different integers); anything else goes to math-verify;
- workers are started once and then reused; one idle worker is kept per concurrent caller thread (plus
  the spare).  The first start imports sympy (about 1 s) in a *zygote*, a warm template process; every
  worker, and every replacement of one killed after a timeout, is a fork of it (a few ms), so even when
  every other call times out the replacements are ready before the next deadlines;
- the check inside the worker costs what math-verify costs (a pipe round trip adds ~0.1 ms).

:func:`grade_many` grades a batch on a pool of such workers, driven by one thread each.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

__all__ = ["extract_answer", "grade_answer", "grade_many", "normalize_number", "prewarm", "validate_grading_args", "GraderError"]


class GraderError(RuntimeError):
    """The grading worker could not be started (not raised for wrong or unparsable answers)."""


# --------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_ANSWER_PHRASE = re.compile(
    r"\b(?:final\s+answer|the\s+answer|answer)\s*(?:is|:|=)\s*:?\s*", flags=re.IGNORECASE
)
_SENTENCE_END = re.compile(r"\.(?=\s|$)|\n")
_GSM8K_MARK = re.compile(r"####[ \t]*([^\n]*)")
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?")
_PLAIN_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
_MAX_FAST_CHARS = 200  # longer "numbers" go to math-verify (and its time limit)


_BOX_TOKENS = re.compile(r"(?P<box>\\(?:boxed|fbox)(?![A-Za-z]) *)|(?P<escaped>\\.)|(?P<brace>[{}])", re.DOTALL)
_UNBRACED_BOX_ARGUMENT = re.compile(r"[^\s${}]+")


def _box_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of the contents of every complete ``\\boxed{..}`` / ``\\fbox{..}`` (or ``\\boxed x``),
    ordered by where the box starts. One linear pass: nested braces are matched, escaped braces
    (``\\{``) ignored, and unclosed boxes (a truncated response) dropped."""
    found: list[tuple[int, int, int]] = []  # (box start, content start, content end)
    open_boxes: list[tuple[int, int, int]] = []  # (brace depth, content start, box start)
    depth = 0
    box_brace_at, box_start = -1, -1
    for token in _BOX_TOKENS.finditer(text):
        kind = token.lastgroup
        if kind == "box":
            after = token.end()
            if after < len(text) and text[after] == "{":
                box_brace_at, box_start = after, token.start()
            elif after > token.start() + 6 and text[after - 1] == " ":  # "\boxed 5"
                argument = _UNBRACED_BOX_ARGUMENT.match(text, after)
                if argument:
                    found.append((token.start(), argument.start(), argument.end()))
        elif kind == "brace" and token.group() == "{":
            depth += 1
            if token.start() == box_brace_at:
                open_boxes.append((depth, token.end(), box_start))
        elif kind == "brace":
            if open_boxes and open_boxes[-1][0] == depth:
                _, content_start, start = open_boxes.pop()
                found.append((start, content_start, token.start()))
            depth -= 1
    found.sort()
    return [(content_start, content_end) for _, content_start, content_end in found]


def _clean(answer: str) -> str:
    answer = answer.strip().strip("*").strip()  # markdown bold: **42**
    answer = answer.strip("$").strip()
    for prefix in ("\\(", "\\["):
        if answer.startswith(prefix):
            answer = answer[2:]
    for suffix in ("\\)", "\\]"):
        if answer.endswith(suffix):
            answer = answer[:-2]
    answer = answer.strip().rstrip(".,;").strip()
    return answer.strip("$").strip()


def _phrase_answer(text: str) -> str | None:
    for match in reversed(list(_ANSWER_PHRASE.finditer(text))):
        # up to the end of the sentence (a period before a space, not a decimal point) or of the line
        end = _SENTENCE_END.search(text, match.end())
        answer = _clean(text[match.end() : end.start() if end else len(text)])
        if answer:
            return answer
    return None


def extract_answer(response: str) -> str | None:
    """The final answer of ``response`` as a string, or None when there is none.

    Order: last ``\\boxed{}``/``\\fbox{}`` → last "answer is ..." → last ``#### ...`` → last number.
    Surrounding ``$`` and ``\\( \\)`` and trailing punctuation are stripped.
    """
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    for start, end in reversed(_box_spans(response)):
        box = _clean(response[start:end])
        if box:
            return box
    phrase = _phrase_answer(response)
    if phrase:
        return phrase
    marks = [_clean(m.group(1)) for m in _GSM8K_MARK.finditer(response)]
    marks = [m for m in marks if m]
    if marks:
        return marks[-1]
    numbers = _NUMBER.findall(response)
    if numbers:
        return re.sub(r"\s+", "", numbers[-1]).replace(",", "")
    return None


def normalize_number(text: str) -> str:
    """``"72.0"`` → ``"72"``, ``"025"`` → ``"25"``, ``"1,000"`` → ``"1000"``, ``"-0.50"`` → ``"-0.5"``.

    Text that is not a plain decimal number is returned unchanged.
    """
    stripped = text.strip()
    candidate = stripped.replace(",", "") if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", stripped) else stripped
    if len(candidate) > _MAX_FAST_CHARS or not _PLAIN_NUMBER.fullmatch(candidate):
        return text
    sign = "-" if candidate.startswith("-") else ""
    whole, _, frac = candidate.lstrip("-").partition(".")
    whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")
    if whole == "0" and not frac:
        return "0"
    return sign + whole + ("." + frac if frac else "")


# --------------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------------


def _as_plain_number(text: str) -> Fraction | None:
    text = text.strip().strip("$").strip()
    if len(text) > _MAX_FAST_CHARS or not _PLAIN_NUMBER.fullmatch(text):
        return None
    return Fraction(text)


def _fast_verdict(pred: str, gold: str) -> bool | None:
    """Exact in-process answer for plain numbers when it is certain; None = ask math-verify.

    Equal numbers are equal. Different *integers* are different. Different decimals are left to
    math-verify, which rounds to 6 places (so ``0.3333333`` matches ``0.333333``).
    """
    a, b = _as_plain_number(pred), _as_plain_number(gold)
    if a is None or b is None:
        return None
    if a == b:
        return True
    if a.denominator == 1 and b.denominator == 1:
        return False
    return None


def _wrap(answer: str) -> str:
    """Wrap a bare answer so that math-verify's LaTeX extractor finds it."""
    answer = answer.strip()
    if _box_spans(answer):
        return answer
    depth = 0
    balanced = True
    for ch in answer.replace("\\{", "").replace("\\}", ""):
        depth += ch == "{"
        depth -= ch == "}"
        balanced &= depth >= 0
    if balanced and depth == 0:
        return "\\boxed{" + answer + "}"
    return "$" + answer.replace("$", "") + "$"


_SCIENTIFIC = re.compile(r"(-?\d+(?:\.\d+)?)\s*[eE]\s*([+-]?\d+)")


_BARE_DECIMAL_POINT = re.compile(r"(\d)\.(?!\d)")


def _prepare(answer: str) -> str:
    """Rewrite numeric spellings that math-verify misreads, before wrapping.

    ``4.5e33`` → ``4.5\\times10^{33}`` (it would read ``e`` as Euler's number) and ``-1./3`` → ``-1/3``
    (Python-style float literals, as in some Minerva references).
    """
    answer = answer.strip()
    match = _SCIENTIFIC.fullmatch(answer)
    if match is not None:
        return f"{match.group(1)}\\times10^{{{int(match.group(2))}}}"
    if re.fullmatch(r"[-+*/()\d.\s]+", answer):
        return _BARE_DECIMAL_POINT.sub(r"\1", answer)
    return answer


def _gold_answer(gold: str) -> str:
    """The reference final answer; a full solution (with ``\\boxed`` or ``####``) is reduced to it."""
    if "\\boxed" in gold or "\\fbox" in gold or "####" in gold:
        extracted = extract_answer(gold)
        if extracted:
            return extracted
    return gold.strip()


_mv_ready = False


def _math_verify_equal(pred: str, gold: str) -> bool:
    """math-verify comparison with its signal-based timeouts disabled (no limit: call in a worker)."""
    global _mv_ready
    import logging

    from math_verify import parse, verify

    if not _mv_ready:
        # We disable math-verify's timeouts on purpose; silence its warning about it.
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        _mv_ready = True
    gold_parsed = parse(_wrap(_prepare(gold)), parsing_timeout=None)
    pred_parsed = parse(_wrap(_prepare(pred)), parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


# --------------------------------------------------------------------------------------------------
# Worker subprocesses (the time limit)
# --------------------------------------------------------------------------------------------------

_WORKER_START_LIMIT_S = 120.0
_WORKER_RUN_NAME = "__latentx_grading_worker__"
_WORKER_BOOT = f"import runpy, sys; runpy.run_path(sys.argv[1], run_name={_WORKER_RUN_NAME!r})"


def _serve(requests, replies) -> None:  # pragma: no cover - runs in a worker process
    """Answer JSON-line requests ``{"pred", "gold"}`` with ``{"equal"}`` lines until end of input."""
    for line in requests:
        request = json.loads(line)
        try:
            reply = {"equal": _math_verify_equal(request["pred"], request["gold"])}
        except Exception as error:  # noqa: BLE001 - any failure is a wrong answer, reported as such
            reply = {"equal": False, "error": f"{type(error).__name__}: {error}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def _worker_main() -> None:  # pragma: no cover - runs in the worker subprocess
    """A worker (no argument) serves requests on stdin / the real stdout.  With ``--zygote PATH`` the
    process is a warm template instead: each line on stdin forks one worker, which connects to the Unix
    socket PATH and serves there; the zygote answers ``{"pid"}`` and the kernel reaps the children."""
    protocol_out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints from libraries go to stderr, never into the protocol
    _math_verify_equal("1", "\\frac{2}{2}")  # warm up (imports sympy and the LaTeX parser)
    if sys.argv[2:3] != ["--zygote"]:
        protocol_out.write('{"ready": true}\n')
        _serve(sys.stdin, protocol_out)
        return
    path = sys.argv[3]
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # forked workers are reaped by the kernel
    protocol_out.write('{"ready": true}\n')
    for _ in iter(sys.stdin.readline, ""):
        pid = os.fork()
        if pid == 0:
            try:
                os.close(0)
                protocol_out.close()
                conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                conn.connect(path)
                replies = conn.makefile("w", buffering=1)
                replies.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
                replies.flush()
                _serve(conn.makefile("r"), replies)
            finally:
                os._exit(0)
        protocol_out.write(json.dumps({"pid": pid}) + "\n")


def _read_line(fd: int, buffer: bytearray, deadline: float) -> str | None:
    """One line from ``fd`` (``buffer`` keeps what was read past it), or None at the deadline or end of file."""
    while b"\n" not in buffer:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        readable, _, _ = select.select([fd], [], [], remaining)
        if not readable:
            return None
        chunk = os.read(fd, 65536)
        if not chunk:  # the other side exited
            return None
        buffer += chunk
    end = buffer.index(b"\n")
    line = bytes(buffer[:end]).decode()
    del buffer[: end + 1]
    return line


class _Worker:
    """One grading process, talked to with deadlines.  Spawned (``_Worker()``: a fresh interpreter, 0.6-2 s
    to import sympy) or forked from the warm :class:`_Zygote` (``_Worker(forked=(socket, pid))``, a few ms)."""

    def __init__(self, forked: "tuple[socket.socket, int] | None" = None) -> None:
        self._buffer = bytearray()
        self.process: subprocess.Popen | None = None
        self._stderr = None
        if forked is not None:
            self._conn, self.pid = forked
            self._fd = self._conn.fileno()
            return
        self._conn = None
        self.process, self._stderr, self._fd, self._buffer = _spawn_grader("worker")
        self.pid = self.process.pid

    def _read_line(self, deadline: float) -> str | None:
        return _read_line(self._fd, self._buffer, deadline)

    def _send(self, data: bytes) -> None:
        if self._conn is not None:
            self._conn.sendall(data)
            return
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def check(self, pred: str, gold: str, timeout: float) -> bool | None:
        """math-verify verdict, or None when it took longer than ``timeout`` (the worker is then dead)."""
        try:
            self._send((json.dumps({"pred": pred, "gold": gold}) + "\n").encode())
        except (BrokenPipeError, OSError):
            self.close()
            return None
        line = self._read_line(time.monotonic() + timeout)
        if line is None:
            self.close()
            return None
        return bool(json.loads(line)["equal"])

    @property
    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        if self._conn is None or self._conn.fileno() < 0:
            return False
        try:
            os.kill(self.pid, 0)
        except OSError:
            return False
        return True

    def close(self) -> None:
        if self.process is None:  # forked: the zygote reaps it
            _kill_quietly(self.pid)
            self._conn.close()
            return
        _close_process(self.process, self._stderr)


def _close_process(process: subprocess.Popen, stderr) -> None:
    """Kill ``process`` if it still runs, reap it, close its pipes and its stderr file."""
    if process.poll() is None:
        process.kill()
    process.wait()
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass
    stderr.close()


def _spawn_grader(what: str, *args: str) -> "tuple[subprocess.Popen, Any, int, bytearray]":
    """Start this very file in isolated mode (-I: only the standard library and math-verify are imported,
    not the latentx package, whose task registry may pull in heavy libraries) as a grading ``what``
    ("worker" or "zygote") and wait for its ready line.  Returns (process, stderr file, stdout fd, read
    buffer); :class:`GraderError` with the end of its stderr when it does not start."""
    stderr = tempfile.TemporaryFile()
    process = subprocess.Popen(
        [sys.executable, "-I", "-c", _WORKER_BOOT, str(Path(__file__).resolve()), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
    )
    assert process.stdout is not None
    fd, buffer = process.stdout.fileno(), bytearray()
    ready = _read_line(fd, buffer, time.monotonic() + _WORKER_START_LIMIT_S)
    if ready is None or not json.loads(ready).get("ready"):
        detail = _stderr_tail(stderr)  # read before closing it
        _close_process(process, stderr)
        raise GraderError(f"the math grading {what} did not start:\n{detail}")
    return process, stderr, fd, buffer


def _stderr_tail(stream) -> str:
    stream.seek(0)
    return stream.read().decode(errors="replace")[-2000:]


class _Zygote:
    """A warm grading process (sympy and math-verify imported) that forks new workers on request.

    Replacing a worker killed after a timeout then costs a fork (a few ms) instead of a fresh
    interpreter's 0.6-2 CPU-seconds, so even when every other call times out, the replacements are
    ready before the next calls' deadlines.  The forked workers connect back over a Unix socket.
    """

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="latentx-grader-")
        path = os.path.join(self._dir, "zygote.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(64)
        self._lock = threading.Lock()
        try:
            self.process, self._stderr, self._fd, self._buffer = _spawn_grader("zygote", "--zygote", path)
        except BaseException:
            self._remove_socket()
            raise

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def fork(self, limit: float = 30.0) -> _Worker:
        """A new warm worker; :class:`GraderError` when the zygote cannot make one within ``limit`` s."""
        deadline = time.monotonic() + limit
        with self._lock:
            try:
                assert self.process.stdin is not None
                self.process.stdin.write(b"fork\n")
                self.process.stdin.flush()
            except (BrokenPipeError, OSError) as err:
                raise GraderError(f"the math grading zygote is gone: {err}") from None
            answer = _read_line(self._fd, self._buffer, deadline)
            if answer is None:
                raise GraderError("the math grading zygote did not fork a worker")
            pid = int(json.loads(answer)["pid"])
            self._listener.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                conn, _ = self._listener.accept()
            except OSError as err:
                _kill_quietly(pid)
                raise GraderError(f"a forked math grading worker did not connect: {err}") from None
        conn.settimeout(None)
        worker = _Worker(forked=(conn, pid))
        ready = worker._read_line(deadline)
        if ready is None or int(json.loads(ready).get("pid", -1)) != pid:
            worker.close()
            raise GraderError("a forked math grading worker did not start")
        return worker

    def close(self) -> None:
        _close_process(self.process, self._stderr)
        self._remove_socket()

    def _remove_socket(self) -> None:
        self._listener.close()
        try:
            os.unlink(os.path.join(self._dir, "zygote.sock"))
            os.rmdir(self._dir)
        except OSError:
            pass


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


class _WorkerPool:
    """Grading workers shared by the threads of this process, started in the background.

    Starting a worker costs 0.6-2 s (importing sympy).  So that a call's time limit covers the whole
    call, start-up included, workers are never started by the caller: :meth:`acquire` waits, until the
    caller's deadline at most, for an idle worker or one being started on a background thread; and
    ``spares`` idle workers are kept beyond those in use, topped up in the background whenever one is
    taken or killed, so a call right after a timeout finds a warm worker.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._starting = 0
        self._waiting = 0
        self._start_error: GraderError | None = None
        self._pid = os.getpid()
        self.max_idle = max(2, os.cpu_count() or 2)
        self.spares = 1
        #: fork replacements from a warm zygote (False: spawn every worker; also the fallback when the
        #: platform has no fork or the zygote fails)
        self.use_zygote = hasattr(os, "fork") and hasattr(socket, "AF_UNIX")
        self._zygote: _Zygote | None = None
        self._zygote_lock = threading.Lock()

    def _check_fork(self) -> None:  # lock held
        if self._pid != os.getpid():  # forked: those workers and starter threads belong to the parent
            self._idle, self._starting, self._waiting, self._pid = [], 0, 0, os.getpid()
            self._zygote = None

    def _new_worker(self) -> _Worker:
        """A worker forked from the warm zygote (started on first use), or a spawned one without it."""
        if not self.use_zygote:
            return _Worker()
        with self._zygote_lock:
            zygote = self._zygote
            if zygote is None or not zygote.alive or self._pid != os.getpid():
                if zygote is not None and self._pid == os.getpid():
                    zygote.close()
                try:
                    zygote = self._zygote = _Zygote()
                except (GraderError, OSError):
                    self._zygote = None
                    return _Worker()
        try:
            return zygote.fork()
        except (GraderError, OSError):
            return _Worker()

    def _start_one(self) -> None:  # lock held
        self._starting += 1
        threading.Thread(target=self._boot, name="latentx-grader-start", daemon=True).start()

    def _boot(self) -> None:
        worker, error = None, None
        try:
            worker = self._new_worker()
        except GraderError as err:
            error = err
        except Exception as err:  # noqa: BLE001 - reported to the waiting callers
            error = GraderError(f"the math grading worker did not start: {type(err).__name__}: {err}")
        with self._cond:
            if self._pid != os.getpid():  # forked while starting: not ours
                if worker is not None:
                    worker.close()
                return
            self._starting -= 1
            if worker is not None:
                self._idle.append(worker)
                self._start_error = None
            else:
                self._start_error = error
            self._cond.notify_all()

    def _top_up(self) -> None:  # lock held: keep `spares` idle (or starting) workers in reserve
        while len(self._idle) + self._starting < self.spares:
            self._start_one()

    def prewarm(self, count: int = 1) -> None:
        """Start workers in the background until ``count`` are idle or starting (returns at once)."""
        with self._cond:
            self._check_fork()
            while len(self._idle) + self._starting < count:
                self._start_one()

    def acquire(self, deadline: float | None = None) -> _Worker | None:
        """A live worker, or None when none is ready by ``deadline`` (``time.monotonic()``; None: wait as
        long as a start takes).  Raises :class:`GraderError` when workers fail to start."""
        if deadline is None:
            deadline = time.monotonic() + _WORKER_START_LIMIT_S
        with self._cond:
            self._check_fork()
            self._waiting += 1
            try:
                while True:
                    while self._idle:
                        worker = self._idle.pop()
                        if worker.alive:
                            self._top_up()
                            return worker
                        worker.close()
                    if self._start_error is not None and self._starting == 0:
                        error, self._start_error = self._start_error, None
                        raise error
                    while self._starting < self._waiting:
                        self._start_one()
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    self._cond.wait(remaining)
            finally:
                self._waiting -= 1

    def release(self, worker: _Worker) -> None:
        with self._cond:
            if worker.alive and self._pid == os.getpid() and len(self._idle) < self.max_idle:
                self._idle.append(worker)
                self._cond.notify_all()
                return
            self._top_up()  # a worker killed after a timeout: replace it in the background
        worker.close()

    def close_all(self) -> None:
        with self._cond:
            idle, self._idle = self._idle, []
            mine = self._pid == os.getpid()
        if mine:
            for worker in idle:
                worker.close()
            with self._zygote_lock:
                zygote, self._zygote = self._zygote, None
            if zygote is not None:
                zygote.close()


_POOL = _WorkerPool()
atexit.register(_POOL.close_all)


def prewarm(workers: int = 1) -> None:
    """Start ``workers`` grading workers in the background, so that the first checks find them warm
    (a check's time limit includes waiting for a worker; see :func:`grade_answer`)."""
    _POOL.prewarm(workers)


def _check_with_limit(pred: str, gold: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    worker = _POOL.acquire(deadline)
    if worker is None:  # no worker became ready within the limit: counts as a timeout
        return False
    try:
        remaining = deadline - time.monotonic()
        verdict = worker.check(pred, gold, remaining) if remaining > 0 else None
    finally:
        _POOL.release(worker)
    return bool(verdict)  # None (timed out) counts as wrong


def _validate_timeout(timeout: float | None) -> None:
    if timeout is not None and not (isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
                                    and timeout > 0 and timeout != float("inf")):
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")


def _validate_workers(workers: int | None) -> None:
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive int, got {workers!r}")


def validate_grading_args(timeout: float | None, workers: int | None = None) -> None:
    """Check a grading ``timeout`` and ``workers`` up front (callers do it before generating anything)."""
    _validate_timeout(timeout)
    _validate_workers(workers)


def grade_answer(response: str, gold: str, timeout: float | None = 5.0) -> bool:
    """True when the final answer of ``response`` equals the reference ``gold``.

    ``gold`` is the reference final answer (``"72"``, ``"\\frac{\\sqrt2}{2}"``, ``"(3, \\pi/2)"``); a full
    solution containing ``\\boxed{}`` or ``#### x`` is reduced to its final answer. A response with no
    extractable answer is wrong. The symbolic check runs in a reusable worker process and counts as
    wrong when the call takes longer than ``timeout`` seconds, waiting for a worker included (the call
    returns within ``timeout`` plus the time to kill a worker); ``timeout=None`` runs it in-process without
    any limit (only for trusted input). Safe to call from any thread.
    """
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    if not isinstance(gold, str):
        raise TypeError(f"gold must be a str, got {type(gold).__name__}")
    _validate_timeout(timeout)
    pred = extract_answer(response)
    gold_answer = _gold_answer(gold)
    if pred is None or not gold_answer:
        return False
    fast = _fast_verdict(pred, gold_answer)
    if fast is not None:
        return fast
    if timeout is None:
        return _math_verify_equal(pred, gold_answer)
    return _check_with_limit(pred, gold_answer, timeout)


def grade_many(
    responses: Sequence[str],
    golds: Sequence[str],
    timeout: float | None = 5.0,
    workers: int | None = None,
    progress: bool = False,
) -> list[bool]:
    """:func:`grade_answer` over pairs, on a pool of ``workers`` grading processes (default: CPU count).

    Plain-number answers are decided in-process first; the rest are spread over the pool, answers to
    the same reference on the same worker. Each check has its own ``timeout``; a check that runs past it
    counts as wrong and its worker is replaced. ``timeout=None`` grades in-process, one after another,
    without any limit (trusted input only).
    """
    if len(responses) != len(golds):
        raise ValueError(f"responses and golds differ in length: {len(responses)} vs {len(golds)}")
    if workers is None:
        workers = os.cpu_count() or 1
    validate_grading_args(timeout, workers)
    results: list[bool] = [False] * len(responses)
    pending: list[tuple[int, str, str]] = []
    for i, (response, gold) in enumerate(zip(responses, golds)):
        if not isinstance(response, str) or not isinstance(gold, str):
            raise TypeError(f"pair {i}: response and gold must be str, got "
                            f"{type(response).__name__} and {type(gold).__name__}")
        pred, gold_answer = extract_answer(response), _gold_answer(gold)
        if pred is None or not gold_answer:
            continue
        fast = _fast_verdict(pred, gold_answer)
        if fast is not None:
            results[i] = fast
        else:
            pending.append((i, pred, gold_answer))
    if not pending:
        return results

    from tqdm.auto import tqdm

    if timeout is None:
        for i, pred, gold_answer in tqdm(pending, desc="grading", disable=not progress):
            results[i] = _math_verify_equal(pred, gold_answer)
        return results
    # Answers to the same reference go to the same worker, whose parse cache then holds the reference
    # (evaluation grades n samples per problem); groups are cut so that every worker gets work.
    by_gold: dict[str, list[tuple[int, str, str]]] = {}
    for item in pending:
        by_gold.setdefault(item[2], []).append(item)
    size = max(1, -(-len(pending) // (4 * workers)))
    chunks = [group[j : j + size] for group in by_gold.values() for j in range(0, len(group), size)]
    _POOL.max_idle = max(_POOL.max_idle, workers)
    with ThreadPoolExecutor(max_workers=min(workers, len(chunks))) as pool, \
            tqdm(total=len(pending), desc="grading", disable=not progress) as bar:
        for verdicts in pool.map(lambda chunk: _check_chunk(chunk, timeout), chunks):
            for i, ok in verdicts:
                results[i] = ok
            bar.update(len(verdicts))
    return results


def _check_chunk(chunk: list[tuple[int, str, str]], timeout: float) -> list[tuple[int, bool]]:
    """Grade ``(index, pred, gold)`` items on one worker (a fresh one after a timeout)."""
    verdicts = []
    worker: _Worker | None = None
    try:
        for i, pred, gold in chunk:
            if worker is not None and not worker.alive:
                _POOL.release(worker)  # killed after a timeout: the pool starts a replacement
                worker = None
            if worker is None:
                # A batch waits for its workers to start (only the checks themselves are timed).
                worker = _POOL.acquire()
                if worker is None:
                    raise GraderError(f"no math grading worker started within {_WORKER_START_LIMIT_S:.0f} s")
            verdicts.append((i, bool(worker.check(pred, gold, timeout))))
    finally:
        if worker is not None:
            _POOL.release(worker)
    return verdicts


if __name__ == _WORKER_RUN_NAME:  # pragma: no cover - the worker subprocess
    _worker_main()
