"""One generation worker: requests wait in a bounded queue and run one at a time on the one model.

Contract: ``GenerationWorker.submit`` queues a ``GenerationRequest`` and returns its ``Job`` at
once, or raises ``Overloaded`` when ``max_queue`` requests are already waiting (the server
answers 503). A thread takes jobs in order, selects the job's adapter on the shared peft model
(``set_adapter``, or ``disable_adapter`` for the base), seeds torch when the request gives a
seed, and runs ``model.generate`` with a streamer that turns each token into final text
(``IncrementalText``) and hands it to the job's asyncio queue. Serializing requests is what makes
per-request adapter switching safe: two requests never run on the model at once, so one can
never see the other's adapter. ``Job.cancel`` (a client that went away) stops its generation
at the next token; a job cancelled while waiting never starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from dataclasses import dataclass, field

import torch
from peft import PeftModel
from transformers import (
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from lmtune.errors import LmtuneError
from lmtune.serve.decoding import IncrementalText

logger = logging.getLogger(__name__)


class Overloaded(LmtuneError):
    """The queue of waiting requests is full."""


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate: prompt ids, which adapter (None: the base), and the decoding settings."""

    prompt_ids: list[int]
    adapter: str | None
    generation: GenerationConfig
    stop_ids: tuple[int, ...]
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Finish:
    """The end of a job: why it ended and how many tokens the model generated."""

    finish_reason: str  # "stop", "length" or "cancelled"
    completion_tokens: int


@dataclass
class Job:
    """A queued request; its ``events`` receive text pieces (str), then one ``Finish`` or an exception."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, event: object) -> None:
        """Hand an event to the job's event loop (called from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop has closed: the server is stopping, nobody is listening
            self.cancel()


class _JobStreamer(BaseStreamer):
    """generate()'s streamer: the prompt first (skipped), then each new token."""

    def __init__(self, job: Job, text: IncrementalText):
        self.job, self.text = job, text
        self.tokens = 0
        self.ended_by_stop_token = False
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # a decoder-only model's prompt, or a seq2seq model's start token
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.tokens += 1
            if token in self.job.request.stop_ids:
                self.ended_by_stop_token = True
                continue
            piece = self.text.add(token)
            if piece:
                self.job.emit(piece)

    def end(self) -> None:
        pass


class _StopWhen(StoppingCriteria):
    """Ends generation when the client went away or a stop string was reached."""

    def __init__(self, job: Job, text: IncrementalText):
        self.job, self.text = job, text

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        done = self.job.cancelled.is_set() or self.text.stopped
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class GenerationWorker:
    """Runs queued generation requests one after another on one model.

    Args:
        model: The model, a ``PeftModel`` when adapters are served.
        tokenizer: Its tokenizer.
        max_queue: Requests that may wait; one more is refused with ``Overloaded``.
        tokenizer_lock: Held while decoding, as other threads tokenize prompts with the same tokenizer.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_queue: int,
                 tokenizer_lock: threading.Lock | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.tokenizer_lock = tokenizer_lock
        self.max_queue = max_queue
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._current: Job | None = None
        self._thread = threading.Thread(target=self._run, name="lmtune-generation", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> Job:
        """Queue a request; the returned job streams its events to ``loop``.

        Raises:
            Overloaded: when ``max_queue`` requests are already waiting.
        """
        job = Job(request, loop)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Overloaded(f"the server is busy: {self.max_queue} requests are already waiting "
                             "(--max_queue); retry later.") from None
        return job

    def stop(self) -> None:
        """Cancel every waiting job and the running one, and end the thread."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                job.emit(Finish("cancelled", 0))
        current = self._current
        if current is not None:
            current.cancel()
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            if job.cancelled.is_set():
                job.emit(Finish("cancelled", 0))
                continue
            self._current = job
            try:
                job.emit(self._generate(job))
            except Exception as err:  # reported to the request that caused it; the worker serves on
                logger.exception("generation failed")
                job.emit(err)
            finally:
                self._current = None

    def _adapter(self, name: str | None):
        if not isinstance(self.model, PeftModel):  # no adapters: the base is all there is
            return contextlib.nullcontext()
        if name is None:
            return self.model.disable_adapter()
        self.model.set_adapter(name)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def _generate(self, job: Job) -> Finish:
        request = job.request
        text = IncrementalText(self.tokenizer, request.stop, self.tokenizer_lock)
        streamer = _JobStreamer(job, text)
        inputs = torch.tensor([request.prompt_ids], device=self.model.device)
        if request.seed is not None:
            torch.manual_seed(request.seed)
        with self._adapter(request.adapter):
            self.model.generate(
                input_ids=inputs, attention_mask=torch.ones_like(inputs), generation_config=request.generation,
                streamer=streamer, stopping_criteria=StoppingCriteriaList([_StopWhen(job, text)]),
            )
        rest = text.finish()
        if rest:
            job.emit(rest)
        if job.cancelled.is_set():
            reason = "cancelled"
        elif streamer.ended_by_stop_token or text.stopped:
            reason = "stop"
        else:
            reason = "length"
        return Finish(reason, streamer.tokens)
