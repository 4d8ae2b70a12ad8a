"""The server's one generation thread: a bounded queue of jobs, each decoded with mlx-lm's
``generate_step`` (through :func:`gemma4_mlx.prompt_fill.generate_steps`; samplers and logits
processors from ``mlx_lm.sample_utils``), or with
:func:`gemma4_mlx.speculative.speculative_generate_step` when the server was started with a draft
model (the same tokens under greedy sampling), cancellable between prefill chunks and between
tokens.

Under ``mlx.launch`` (a model sharded over several processes) the worker runs on rank 0 with a
:class:`~gemma4_mlx.server_distributed.Lockstep`: it announces each job to the other ranks, and
every prefill step and token ends with an agreement, so all ranks stop at the same step
(:mod:`gemma4_mlx.server_distributed`).

A job's output is a stream of events on ``job.events``: :class:`Piece` (text, reasoning, tool
calls and logprobs of one token), then one :class:`Finished` or :class:`Failed`. Whatever a job
does, the thread survives it and takes the next one.
"""

from __future__ import annotations

import math
import os
import queue
import sys
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from . import cuda_context
from .chat_format import ReasoningParser
from .prompt_fill import generate_steps
from .server_api import GenerationRequest
from .peer_watch import PEER_LOST_GRACE
from .server_distributed import IDLE_TICK, GroupLost, group_failure
from .tools import TOOL_CALL_START, TOOL_RESPONSE_START, ToolCall, ToolCallParser

LOGPROB_FLOOR = -9999.0  # what a -inf log-probability is reported as (JSON has no -inf)


class Busy(Exception):
    """The queue is full: the caller answers 503 with Retry-After."""


class Cancelled(Exception):
    pass


@dataclass
class Piece:
    text: str
    reasoning: str = ""
    logprobs: Optional[List[Dict[str, Any]]] = None
    tool_calls: List[ToolCall] = field(default_factory=list)  # calls completed by this token


@dataclass
class Finished:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    status: int
    message: str


@dataclass
class Job:
    request: GenerationRequest
    cancel: threading.Event = field(default_factory=threading.Event)
    events: "queue.Queue" = field(default_factory=queue.Queue)
    outcome: Optional[str] = None  # "finished", "cancelled", "failed" once done
    done: threading.Event = field(default_factory=threading.Event)
    generated: int = 0
    drafted: int = 0  # tokens a draft model proposed and the model kept


class StopMatcher:
    """Cuts the text at the first stop string; holds back a tail that could start one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""

    def feed(self, piece: str) -> Tuple[str, bool]:
        self.buf += piece
        if not self.stops:
            out, self.buf = self.buf, ""
            return out, False
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[: min(hits)], ""
            return out, True
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.buf)), keep, -1):
                if s.startswith(self.buf[-n:]):
                    keep = n
                    break
        out, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


class Worker:
    """Runs jobs one at a time in its own thread; at most ``1 + max_queue`` jobs admitted.

    The thread first calls ``loader()`` for ``(model, tokenizer)`` or ``(model, tokenizer,
    draft_model)``: MLX streams belong to the thread that made them, so the models are built
    where they will run (as mlx_lm.server does). With a draft model every job is decoded
    speculatively, ``num_draft_tokens`` proposals per step. With a ``lockstep`` (rank 0 of a
    sharded model) the other ranks run every job with it.
    """

    def __init__(self, loader: Callable[[], Tuple[Any, ...]], max_queue: int = 8,
                 prefill_step_size: int = 2048, debug: bool = False, num_draft_tokens: int = 3,
                 lockstep=None):
        self._loader = loader
        self.lockstep = lockstep
        self.fatal: Optional[str] = None  # why the thread cannot serve any more (a rank of the group is gone)
        self.on_fatal: Optional[Callable[[str], None]] = None  # told when it breaks (the server stops)
        self.model = None
        self.tokenizer = None
        self.draft_model = None
        self.num_draft_tokens = num_draft_tokens
        self.end_ids: set = set()
        self.tool_call_id: Optional[int] = None  # the token that opens a tool call, if the vocabulary has it
        self.handover_id: Optional[int] = None  # <|tool_response>: the model hands over to the host
        self.max_queue = max_queue
        self.prefill_step_size = prefill_step_size
        self.debug = debug
        self._jobs: "queue.Queue[Optional[Job]]" = queue.Queue()
        self._lock = threading.Lock()
        self._admitted = 0
        self._current: Optional[Job] = None
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._parked = threading.Event()
        self._load_error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="gemma4-mlx-generation", daemon=True)
        self.completed = 0  # jobs finished, cancelled or failed (for /health and tests)
        self.last_job: Optional[Job] = None
        self._xtc_special: List[int] = []

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Start the thread and wait until the model is loaded; re-raises the loader's error."""
        self._thread.start()
        while not self._ready.wait(0.25):
            pass
        if self._load_error is not None:
            raise self._load_error

    def alive(self) -> bool:
        return (self._thread.is_alive() and not self._parked.is_set() and not self._stopping.is_set()
                and self.fatal is None)

    @property
    def load(self) -> int:
        return self._admitted

    def submit(self, request: GenerationRequest) -> Job:
        if self._stopping.is_set():
            raise Busy("the server is shutting down")
        with self._lock:
            if self._admitted >= 1 + self.max_queue:
                raise Busy(f"busy: {self._admitted} requests running or queued")
            self._admitted += 1
        job = Job(request)
        self._jobs.put(job)
        return job

    def stop(self, timeout: float = 60.0) -> bool:
        """Cancel the running job, fail the queued ones, end the thread. True if it ended."""
        self._stopping.set()
        current = self._current
        if current is not None:
            current.cancel.set()
        self._jobs.put(None)
        if self._thread.is_alive():
            self._parked.wait(timeout)
        while True:  # anything still queued gets its answer
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._finish(job, "failed", Failed(503, "the server is shutting down"))
        return self._parked.is_set() or not self._thread.is_alive()

    # -- the thread ----------------------------------------------------------------------------
    def load_models(self) -> None:
        """Run the loader in this thread (the one that will run the model) and read what jobs
        need from the tokenizer."""
        from .generation import end_token_ids

        loaded = tuple(self._loader())
        self.model, self.tokenizer = loaded[:2]
        self.draft_model = loaded[2] if len(loaded) > 2 else None
        self.end_ids = set(int(i) for i in end_token_ids(self.model, self.tokenizer))
        vocab = self.tokenizer.get_vocab() if hasattr(self.tokenizer, "get_vocab") else {}
        self.tool_call_id = vocab.get(TOOL_CALL_START)
        self.handover_id = vocab.get(TOOL_RESPONSE_START)
        newline = list(self.tokenizer.encode("\n", add_special_tokens=False))
        self._xtc_special = newline + sorted(self.end_ids)

    def _load(self) -> bool:
        try:
            self.load_models()
            return True
        except BaseException as e:  # noqa: BLE001 - reported by start() in the caller's thread
            self._load_error = e
            return False
        finally:
            self._ready.set()

    def _run(self) -> None:
        try:
            if self._load():
                self._serve()
                if self.lockstep is not None:
                    self.lockstep.stop()  # the other ranks exit
        except GroupLost as e:
            self._broken(str(e))
        except Exception as e:  # noqa: BLE001 - a bug of ours: without this thread nothing is served
            if self.debug:
                traceback.print_exc()
            self._broken(f"the generation thread failed ({type(e).__name__}: {e})")
        finally:
            # Park instead of ending: a thread that used MLX's thread-local stream and ends
            # right before the process exits races MLX's teardown of that stream, which aborts
            # the process ("terminate called without an active exception"). A parked daemon
            # thread holds nothing and dies with the process.
            self._parked.set()
            threading.Event().wait()

    def _broken(self, why: str) -> None:
        self.fatal = why
        self._stopping.set()
        if self.on_fatal is not None:
            self.on_fatal(why)

    def _next_job(self) -> Optional[Job]:
        if self.lockstep is None:
            return self._jobs.get()
        try:
            return self._jobs.get(timeout=IDLE_TICK)
        except queue.Empty:
            self.lockstep.idle()  # the other ranks wait for a word; they sleep between ticks
            return None

    def _serve(self) -> None:
        while not self._stopping.is_set():
            job = self._next_job()
            if job is None:
                continue
            if self._stopping.is_set():
                self._finish(job, "failed", Failed(503, "the server is shutting down"))
                continue
            if job.cancel.is_set():
                self._finish(job, "cancelled", Failed(499, "cancelled"))
                continue
            self._current = job
            try:
                if self.lockstep is not None:
                    self.lockstep.announce(job.request)
                finished = self._generate(job)
                self._finish(job, "finished", finished)
            except Cancelled:
                self._finish(job, "cancelled", Failed(499, "cancelled"))
            except GroupLost as e:
                self._finish(job, "failed", Failed(503, f"the server is stopping: {e}"))
                raise
            except BaseException as e:  # noqa: BLE001 - one job's failure is never the server's
                if self.lockstep is not None and group_failure(e):
                    self._finish(job, "failed", Failed(503, f"the server is stopping: {GroupLost.of(e, 0)}"))
                    raise GroupLost.of(e, 0) from e
                line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                print(f"gemma4-mlx serve: generation failed: {type(e).__name__}: {line}", file=sys.stderr)
                if self.debug:
                    traceback.print_exc()
                # An error inside mlx-lm's compiled sampler leaves MLX's global random key a
                # traced placeholder; every later unseeded sample would fail on it. Reseed.
                mx.random.seed(int.from_bytes(os.urandom(8), "little"))
                self._finish(job, "failed", Failed(500, f"generation failed: {line}"))
            finally:
                self._current = None
                try:
                    mx.clear_cache()
                except Exception:  # pragma: no cover
                    pass

    def _finish(self, job: Job, outcome: str, event) -> None:
        with self._lock:  # once: peer_lost may answer a job whose thread answers it too
            if job.outcome is not None:
                return
            job.outcome = outcome
            self._admitted -= 1
            self.completed += 1
        job.events.put(event)
        self.last_job = job
        job.done.set()

    def peer_lost(self, why: str, grace: float = PEER_LOST_GRACE) -> None:
        """A process of the group is gone (:class:`~gemma4_mlx.peer_watch.PeerWatch`): after
        ``grace`` seconds in which the generation thread's own error may arrive, answer the
        running job and break the worker, which stops the server. The thread may be stuck in
        a collective that never ends (peer_watch.py), so nothing here waits for it."""
        if self._stopping.wait(grace):  # the thread failed on its own, or the server stops anyway
            return
        why = f"another process of the group is gone ({why})"
        job = self._current
        if job is not None:
            self._finish(job, "failed", Failed(503, f"the server is stopping: {why}"))
        self._broken(why)

    def _check(self, job: Job) -> None:
        if job.cancel.is_set() or self._stopping.is_set():
            raise Cancelled

    def _agreed(self, decide: Callable[..., Any], token: int, *args) -> bool:
        """``decide(*args)`` (True: the generation stops here), told to the other ranks of a
        sharded model so that they stop at this step too, whether it raises or not."""
        if self.lockstep is None:
            return bool(decide(*args))
        try:
            stop = bool(decide(*args))
        except BaseException:
            self.lockstep.step(True, token)
            raise
        return self.lockstep.step(stop, token)

    def steps(self, r: GenerationRequest, on_prefill: Callable[[int, int], None], job: Optional[Job] = None):
        """``(token, logprobs)`` of request ``r``: seeded, sampled and processed as it asks;
        ``on_prefill(done, total)`` runs between prefill steps (it may raise to stop). Rank 0
        and the other ranks of a sharded model build their steps here, the same way."""
        if r.seed is not None:
            mx.random.seed(r.seed)
        vocab = getattr(getattr(self.model, "args", None), "vocab_size", None)
        top_k = 0 if vocab is not None and r.top_k >= vocab else r.top_k  # all tokens: no filter
        sampler = make_sampler(r.temperature, top_p=r.top_p, min_p=r.min_p, top_k=top_k,
                               xtc_probability=r.xtc_probability, xtc_threshold=r.xtc_threshold,
                               xtc_special_tokens=self._xtc_special)
        processors = make_logits_processors(
            logit_bias=r.logit_bias or None, repetition_penalty=r.repetition_penalty,
            repetition_context_size=r.repetition_context_size, presence_penalty=r.presence_penalty,
            frequency_penalty=r.frequency_penalty,
        )
        if r.tools and r.tool_choice == "none" and self.tool_call_id is not None:
            processors.append(self._ban(self.tool_call_id))  # tools declared, but no call may start
        return self._steps(r, sampler, processors, on_prefill, job)

    def _generate(self, job: Job) -> Finished:
        r = job.request
        ends = set(self.end_ids)
        if r.tools and self.handover_id is not None:
            ends.add(self.handover_id)  # after its calls the model waits for their results
        # cancelled between prefill steps
        steps = self.steps(r, lambda done, total: self._agreed(self._check, -1, job), job)
        detok = self.tokenizer.detokenizer
        detok.reset()
        stopper = StopMatcher(r.stop)
        parser = ReasoningParser() if r.split_reasoning else None
        calls_parser = ToolCallParser() if r.parse_tool_calls else None
        made: List[ToolCall] = []

        def emit(raw: str, logprobs=None, final: bool = False) -> None:
            if parser is not None:
                text, reasoning = parser.feed(raw)
                if final:
                    more_text, more_reasoning = parser.finish()
                    text, reasoning = text + more_text, reasoning + more_reasoning
            else:
                text, reasoning = raw, ""
            calls: List[ToolCall] = []
            if calls_parser is not None:  # calls are parsed from the answer, never from reasoning
                text, calls = calls_parser.feed(text)
                if final:
                    rest, more = calls_parser.finish()
                    text, calls = text + rest, calls + more
                made.extend(calls)
            if text or reasoning or logprobs or calls:
                job.events.put(Piece(text, reasoning, logprobs, calls))

        finish, cut = "length", False

        def take(token: int, logprobs) -> bool:
            """One token to the client; True when the reply ends with it."""
            nonlocal finish, cut
            self._check(job)
            job.generated += 1
            if token in ends:  # the end marker is never part of the output
                finish = "stop"
                return True
            lp = [self._logprob_entry(token, logprobs, r.top_logprobs)] if r.logprobs else None
            detok.add_token(token)
            text, cut = stopper.feed(detok.last_segment)
            emit(text, lp)
            if cut or (made and not r.parallel_tool_calls):  # a stop string; the one call asked for
                finish = "stop"
                return True
            return False

        try:
            for token, logprobs in steps:
                if self._agreed(take, int(token), int(token), logprobs):
                    break
        finally:
            steps.close()
        if not cut:  # what the detokenizer and the stop matcher still hold
            detok.finalize()
            text, cut = stopper.feed(detok.last_segment)
            if cut:
                finish = "stop"
            else:
                text += stopper.flush()
        else:
            text = ""
        emit(text, final=True)
        if made and finish == "stop":
            finish = "tool_calls"
        return Finished(finish, len(r.prompt), job.generated)

    def _steps(self, r: GenerationRequest, sampler, processors, progress, job: Optional[Job]):
        """``(token, logprobs)``: mlx-lm's step, or the exact speculative one (counted in ``job``)."""
        cuda_context.ensure_current()  # before the prompt's array is made: see cuda_context
        if self.draft_model is None:
            return generate_steps(
                mx.array(r.prompt), self.model, max_tokens=r.max_tokens, sampler=sampler,
                logits_processors=processors or None, prompt_cache=make_prompt_cache(self.model),
                prefill_step_size=self.prefill_step_size, prompt_progress_callback=progress,
            )
        from .speculative import speculative_generate_step

        def drafted():
            steps = speculative_generate_step(
                mx.array(r.prompt), self.model, self.draft_model, num_draft_tokens=self.num_draft_tokens,
                max_tokens=r.max_tokens, sampler=sampler, logits_processors=processors or None,
                prefill_step_size=self.prefill_step_size, prompt_progress_callback=progress,
            )
            try:
                for token, logprobs, from_draft in steps:
                    if job is not None:
                        job.drafted += bool(from_draft)
                    yield token, logprobs
            finally:
                steps.close()

        return drafted()

    @staticmethod
    def _ban(token: int):
        def processor(tokens, logits):
            return mx.where(mx.arange(logits.shape[-1]) == token, -mx.inf, logits)

        return processor

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _logprob_entry(self, token: int, logprobs: mx.array, top: int) -> Dict[str, Any]:
        def entry(t: int, lp: float) -> Dict[str, Any]:
            text = self._token_text(t)
            lp = lp if math.isfinite(lp) else LOGPROB_FLOOR
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8", "replace"))}

        out = entry(token, float(logprobs[token].item()))
        alts = []
        if top > 0:
            k = min(top, logprobs.shape[-1])
            idx = mx.argpartition(-logprobs, kth=k - 1)[:k]
            vals = logprobs[idx]
            order = mx.argsort(-vals)
            for i, v in zip(idx[order].tolist(), vals[order].tolist()):
                alts.append(entry(int(i), float(v)))
        out["top_logprobs"] = alts
        return out
