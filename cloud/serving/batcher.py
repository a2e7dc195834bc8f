"""Dynamic batching with backpressure, per model version, on the server's event loop.

Concurrent requests for one version wait in a bounded queue; a worker merges them into one
ONNX Runtime call of up to ``max_batch_size`` rows, waiting at most ``max_queue_delay_us``
after the first one arrived, runs it (on the event loop when it is cheap, in a worker
thread otherwise, at most ``instances`` batches at once) and hands each request its rows
back. Only requests with the same requested outputs and the same non-batch shapes are
merged. A full queue answers 503 with ``Retry-After`` at once, and a request still queued
after ``timeout_ms`` gets a 503: memory stays bounded however many clients pile on. Models
without a free first dimension are run one request at a time, bounded by the same queue.

Pictures (an image input's ``BYTES`` or ``UINT8`` frames) become the model's tensors before
they queue, so pictures of different sizes merge. Decoding runs in a worker thread (but for
small frames), at most ``DECODERS`` requests of a version at once, counted in the queue's
depth while they wait: decoded pictures, each up to ``max_pixels``, stay bounded too.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
from starlette.concurrency import run_in_threadpool

from cloud.serving.config import ModelConfig
from cloud.serving.metrics import ServerMetrics
from cloud.serving.model import OnnxModel
from shared.errors import InvalidRequestError, ServerBusyError, TandemError
from shared.oip.types import InferRequest, InferResponse

#: Batches whose compute takes less than this (running estimate) run on the event loop.
INLINE_BELOW_S = 0.002
#: In thread mode, one batch in this many runs inline to re-measure, if the model is not
#: clearly slow: the estimate can come back down after a burst of large batches.
PROBE_EVERY = 64
#: A forming batch also closes once the event loop has gone round this many times with no new
#: request for it: nobody else is on the way, so a lone client does not wait the delay out.
QUIET_TURNS = 8
#: Requests of one version whose pictures are decoded at once: decoding is CPU-bound, so more
#: than the cores gain nothing, and each holds a decoded picture.
DECODERS = max(1, os.cpu_count() or 1)


@dataclass(slots=True)
class _Item:
    feeds: dict[str, np.ndarray]
    wanted: list[str]
    rows: int
    key: tuple[object, ...]
    future: asyncio.Future[list[np.ndarray]]
    enqueued: float


class Batcher:
    def __init__(self, model: OnnxModel, config: ModelConfig, metrics: ServerMetrics) -> None:
        self.model = model
        self.config = config
        self.stats = metrics.version(model.name, model.version)
        self.batching = model.batchable and config.max_batch_size > 1
        # the largest request merged (0: none are)
        self._max_rows = config.max_batch_size if self.batching else 0
        #: Triton's max_batch_size: a request of more rows is refused (0: no limit)
        self.batch_limit = config.batch_limit(model.batchable)
        self._queue: deque[_Item] = deque()
        self._queued_rows = 0  # rows in the queue: the worker is woken when a batch is full
        self._mixed = False  # the queue holds requests of more than one key since it was empty
        self._arrivals = 0  # requests ever queued: the quiet watch compares it turn to turn
        self._wait = 0  # which wait for company the quiet watch belongs to
        # requests admitted and not in the queue: unbatched ones not yet answered, and those
        # whose pictures are being (or wait to be) decoded
        self._waiting = 0
        # asyncio's primitives bind to the running loop at first use, not here
        self._more = asyncio.Event()
        self._slots = asyncio.Semaphore(config.instances)
        self._decoders = asyncio.Semaphore(DECODERS)
        self._pictures = bool(model.images)  # the model has image inputs
        self._worker: asyncio.Task[None] | None = None  # held: the loop keeps tasks weakly
        self._working = False  # the worker task is running (set here, cleared by it)
        self._expiry: asyncio.TimerHandle | None = None
        self._timeout_s = config.timeout_ms / 1000.0
        self._tasks: set[asyncio.Task[None]] = set()
        # CPU seconds per batch when run inline: a running estimate, seeded by the load-time
        # warm-up; moved only by inline runs (a thread's runs are slowed by the event loop
        # beside it) and at most doubled by one run (a GC pause must not flip the mode)
        self._inline_s = model.warm_s if model.warm_s is not None else INLINE_BELOW_S
        self._batches = 0

    @property
    def depth(self) -> int:
        return len(self._queue) + self._waiting

    def _admit(self) -> None:
        if self.depth >= self.config.max_queue_size:
            raise ServerBusyError(
                f"model {self.model.name!r} version {self.model.version} has "
                f"{self.depth} requests waiting (limit {self.config.max_queue_size})",
                retry_after_s=1.0,
            )

    async def infer(self, request: InferRequest) -> InferResponse:
        """The request's response; a failure is counted under its status (successes are
        counted per batch)."""
        try:
            if self._pictures:
                feeds, wanted = await self._prepare_pictures(request)
            else:
                feeds, wanted = self.model.prepare(request)
            # mergeable: same outputs, same inputs in the same order with the same row shape
            first = next(iter(feeds.values()), None)
            rows = first.shape[0] if first is not None and first.ndim else 0
            key = (tuple(wanted), *[(n, a.shape[1:], a.dtype) for n, a in feeds.items()])
            if rows > self._max_rows or rows == 0:  # too big to merge, or not batching
                self._check_rows(rows)
                return self.model.response(wanted, await self._alone(feeds, wanted))
            self._admit()
            future = asyncio.get_running_loop().create_future()
            item = _Item(feeds, wanted, rows, key, future, time.monotonic())
            if self._queue and self._queue[0].key != key:
                self._mixed = True
            self._queue.append(item)
            self._queued_rows += rows
            self._arrivals += 1
            if self._queued_rows >= self._max_rows:
                self._more.set()  # else the worker sleeps until the first one's delay is over
            if not self._working:
                self._working = True
                self._worker = asyncio.create_task(self._run())
            if self._expiry is None:
                self._arm_expiry()
            values = await item.future
            return self.model.response(wanted, values)
        except TandemError as exc:
            self.stats.failed(exc.http_status)
            raise

    def _check_rows(self, rows: int) -> None:
        if rows > self.batch_limit > 0:
            raise InvalidRequestError(
                f"inference request batch-size must be <= {self.batch_limit} "
                f"for '{self.model.name}'"  # Triton's words
            )

    async def _prepare_pictures(
        self, request: InferRequest
    ) -> tuple[dict[str, np.ndarray], list[str]]:
        """``model.prepare`` for a model with image inputs, its pictures made tensors first:
        in a worker thread, admitted to the queue's depth, unless they are small frames (a
        request of too many pictures is refused before any is decoded)."""
        rows, inline = self.model.pictures(request)
        if rows and inline:
            request = self.model.with_tensors(request)
        elif rows:
            self._check_rows(rows)
            self._admit()
            self._waiting += 1
            try:
                async with self._decoders:
                    request = await run_in_threadpool(self.model.with_tensors, request)
            finally:
                self._waiting -= 1
        return self.model.prepare(request)

    async def _alone(self, feeds: dict[str, np.ndarray], wanted: list[str]) -> list[np.ndarray]:
        self._admit()
        self._waiting += 1
        try:
            async with self._slots:
                start = time.monotonic()
                values = await run_in_threadpool(self.model.compute, feeds, wanted)
                self.stats.compute_seconds.observe(time.monotonic() - start)
                self.stats.batch_size.observe(1)
                self.stats.served.inc()
                return values
        finally:
            self._waiting -= 1

    async def _run(self) -> None:
        try:
            await self._gather_and_run()
        finally:
            self._working = False

    async def _gather_and_run(self) -> None:
        delay = self.config.max_queue_delay_us / 1e6
        while self._queue:
            # a free instance first: while the last batch runs, the next one gathers
            await self._slots.acquire()
            if not self._queue:  # timed out or cancelled meanwhile
                self._slots.release()
                break
            first = self._queue[0]
            # wait for company until the batch is full, the first request's delay is over, or
            # (close_when_quiet) requests stop coming; woken once, by whichever comes first
            # (a timer, a callback per loop turn, no task): a wake-up per arriving request
            # cost more than the batch saved on a small model
            remaining = first.enqueued + delay - time.monotonic()
            if self._queued_rows < self.config.max_batch_size and remaining > 0:
                self._more.clear()
                self._wait += 1
                loop = asyncio.get_running_loop()
                timer = loop.call_later(remaining, self._more.set)
                if self.config.close_when_quiet:
                    loop.call_soon(self._watch_quiet, self._wait, self._arrivals, 0)
                await self._more.wait()
                timer.cancel()
            batch = self._take(first.key)
            self.stats.queue_depth.set(self.depth)
            if not batch:
                self._slots.release()
                continue
            if self._run_inline():
                # tiny models: a task and a thread hop cost more than the call itself
                self._execute(batch, None)
                continue
            task = asyncio.create_task(self._execute_in_thread(batch))
            self._tasks.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self._tasks.discard)

    def _watch_quiet(self, wait: int, seen: int, quiet: int) -> None:
        """Once per event-loop turn while the worker waits for company: ends the wait after
        ``QUIET_TURNS`` turns without a new request. Under load requests keep coming and the
        batch fills or reaches its delay; a lone request goes at once."""
        if wait != self._wait or self._more.is_set():
            return
        quiet = quiet + 1 if self._arrivals == seen else 0
        if quiet >= QUIET_TURNS:
            self._more.set()
            return
        asyncio.get_running_loop().call_soon(self._watch_quiet, wait, self._arrivals, quiet)

    def _arm_expiry(self) -> None:
        """One timer per batcher, for the oldest queued request (the queue is in arrival
        order): a timer per request cost more than batching saved on a small model."""
        if self._queue:
            wait = self._queue[0].enqueued + self._timeout_s - time.monotonic()
            self._expiry = asyncio.get_running_loop().call_later(max(0.0, wait), self._expire)

    def _expire(self) -> None:
        self._expiry = None
        now = time.monotonic()
        while self._queue and now - self._queue[0].enqueued >= self._timeout_s:
            item = self._queue.popleft()
            self._queued_rows -= item.rows
            if not item.future.done():
                item.future.set_exception(
                    ServerBusyError(
                        f"request waited more than {self.config.timeout_ms:g} ms in the queue",
                        retry_after_s=1.0,
                    )
                )
        self._arm_expiry()

    def _take(self, key: tuple[object, ...]) -> list[_Item]:
        if not self._mixed and self._queued_rows <= self.config.max_batch_size:
            # the usual case: every queued request fits one batch (a cancelled one is run
            # too, and its rows dropped on delivery)
            everything = list(self._queue)
            self._queue.clear()
            self._queued_rows = 0
            return everything
        batch: list[_Item] = []
        rows = 0
        keep: deque[_Item] = deque()
        while self._queue:
            item = self._queue.popleft()
            if item.future.done():  # cancelled meanwhile (its client went away)
                self._queued_rows -= item.rows
                continue
            if item.key == key and rows + item.rows <= self.config.max_batch_size:
                batch.append(item)
                rows += item.rows
            else:
                keep.append(item)
        self._queue = keep
        self._queued_rows -= rows
        if not keep:
            self._mixed = False
        return batch

    def _run_inline(self) -> bool:
        self._batches += 1
        if self._inline_s < INLINE_BELOW_S:
            return True
        return self._batches % PROBE_EVERY == 0 and self._inline_s < 10 * INLINE_BELOW_S

    def _timed_compute(
        self, feeds: dict[str, np.ndarray], wanted: list[str]
    ) -> tuple[list[np.ndarray], float]:
        """The call and its wall time, measured where it runs (a thread hop is not compute)."""
        start = time.perf_counter()
        values = self.model.compute(feeds, wanted)
        return values, time.perf_counter() - start

    async def _execute_in_thread(self, batch: list[_Item]) -> None:
        feeds = self._merge(batch)
        try:
            done = await run_in_threadpool(self._timed_compute, feeds, batch[0].wanted)
        except Exception as exc:
            self._execute(batch, exc)
            return
        self._execute(batch, done)

    def _merge(self, batch: list[_Item]) -> dict[str, np.ndarray]:
        if len(batch) == 1:
            return batch[0].feeds
        return {n: np.concatenate([i.feeds[n] for i in batch]) for n in batch[0].feeds}

    def _execute(
        self, batch: list[_Item], done: tuple[list[np.ndarray], float] | Exception | None
    ) -> None:
        """Hands each request its rows (or the error); computes here first when ``done`` is
        None (the inline path). Releases the batch's slot whatever happens."""
        try:
            now = time.monotonic()
            observe = self.stats.queue_seconds.observe
            for item in batch:
                observe(now - item.enqueued)
            if done is None:
                try:
                    cpu = time.thread_time()
                    done = self._timed_compute(self._merge(batch), batch[0].wanted)
                    cpu = time.thread_time() - cpu
                    self._inline_s += 0.2 * (min(cpu, 2 * self._inline_s) - self._inline_s)
                except Exception as exc:
                    done = exc
            if isinstance(done, Exception):  # every waiting request gets it, none hangs
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(done)
                return
            values, took = done
            self.stats.compute_seconds.observe(took)
            self.stats.batch_size.observe(len(batch))
            offset = delivered = 0
            for item in batch:
                end = offset + item.rows
                if not item.future.done():
                    item.future.set_result([v[offset:end] for v in values])
                    delivered += 1
                offset = end
            self.stats.served.inc(delivered)
        finally:
            self._slots.release()
