"""The producer client: check an image and question locally, store the image, enqueue the task."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any

import redis
from celery import Celery, states
from celery.exceptions import TaskRevokedError
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult

from producer import errors
from producer.aio import AsyncResultReader
from producer.claimcheck import ImageStore
from producer.config import Settings, is_redis_url, make_celery_app
from producer.images import ImageSource, decode_image, read_image_source
from producer.ledger import Ledger, LedgerEntry
from producer.protocol import AnalysisRequest, Limits, model_queue
from producer.queues import queue_depth
from producer.results import AnalysisResult

logger = logging.getLogger(__name__)

_NAMED_ERRORS = {
    name: cls
    for name, cls in vars(errors).items()
    if isinstance(cls, type) and issubclass(cls, errors.VlmqError)
}


#: The longest one wait for a result listens before it reads the stored result again.
RESULT_POLL_S = 2.0


class TaskHandle:
    """A submitted task: its id, its state, and a way to wait for its result."""

    def __init__(self, task_id: str, app: Celery, reader: AsyncResultReader | None = None) -> None:
        self.id = task_id
        self._async = AsyncResult(task_id, app=app)
        self._reader = reader

    def __repr__(self) -> str:
        return f"TaskHandle({self.id!r})"

    @property
    def state(self) -> str:
        """The Celery state: PENDING (also for unknown ids), STARTED, SUCCESS, FAILURE, ..."""
        return self._async.state

    def ready(self) -> bool:
        """Whether the task has finished, successfully or not."""
        return self._async.ready()

    def result(self, timeout: float | None = None) -> AnalysisResult:
        """Wait up to ``timeout`` seconds (None: forever) for the result.

        Raises:
            TimeoutError: the task has not finished in time.
            VlmqError: the task failed; it is the named error the worker raised (e.g.
                ``InvalidImage``), or a plain ``VlmqError`` describing any other failure
                (revoked, expired, worker crash).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = RESULT_POLL_S if deadline is None else deadline - time.monotonic()
            try:
                # Waited in slices: each get() reads the stored result once before it
                # listens, so a notification the result subscriber misses (seen once: a
                # 300 s wait on a task long in SUCCESS) costs a slice, not the timeout.
                # (Celery takes a timeout of 0 as none at all.)
                outcome = self._async.get(
                    timeout=min(max(left, 0.01), RESULT_POLL_S), propagate=False
                )
                break
            except CeleryTimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    # Celery keeps a waiter that timed out registered until its task
                    # finishes; drop it so polling does not pile them up.
                    self._async.backend.remove_pending_result(self._async)
                    raise TimeoutError(
                        f"task {self.id} has not finished after {timeout:.3g} s "
                        f"(state {self.state})"
                    ) from None
        return self._finish(outcome)

    async def aresult(self, timeout: float | None = None) -> AnalysisResult:
        """:meth:`result` for asyncio: awaits the stored result without blocking the loop.

        Raises:
            TimeoutError: the task has not finished in time.
            VlmqError: the task failed, as in :meth:`result`.
        """
        backend = self._async.backend
        if self._reader is None:
            self._reader = AsyncResultReader(backend.url)
        raw = await self._reader.wait(
            backend.get_key_for_task(self.id),
            lambda raw: backend.decode_result(raw)["status"] in states.READY_STATES,
            timeout,
        )
        if raw is None:
            raise TimeoutError(f"task {self.id} has not finished after {timeout:.3g} s")
        meta = backend.decode_result(raw)
        if meta["status"] == states.SUCCESS:
            return self._finish(meta["result"])
        return self._finish(backend.exception_to_python(meta["result"]))

    def revoke(self) -> None:
        """Revoke the task: a worker drops it unrun, and :meth:`result` raises
        :class:`~producer.errors.TaskRevoked`.

        The revocation is stored as the task's outcome, so a worker that starts later (or
        missed the broadcast) acks the task without running it. A task already inside the
        model finishes, and its result then replaces the revocation.
        """
        if not self.ready():
            self._async.backend.mark_as_revoked(self.id, "revoked")
        self._async.revoke()

    def _finish(self, outcome: Any) -> AnalysisResult:
        if isinstance(outcome, BaseException):
            raise _named_error(self.id, outcome) from outcome
        return AnalysisResult.from_dict(self.id, outcome)


def _named_error(task_id: str, exc: BaseException) -> errors.VlmqError:
    """The vlmq error for a task failure Celery rebuilt from ``exc_module``/``exc_type``.

    Celery rebuilds the real class only when its module is imported here; otherwise it makes
    a look-alike class of the same name, which is mapped back to ours by name.
    """
    if isinstance(exc, errors.VlmqError):
        return exc
    if isinstance(exc, TaskRevokedError):
        # Celery stores the reason as the message: "expired" for a passed `expires`.
        if str(exc) == "expired":
            return errors.TaskExpired(
                f"task {task_id} expired before a worker started it (TaskRevokedError: expired)"
            )
        return errors.TaskRevoked(f"task {task_id} was revoked before it ran (TaskRevokedError)")
    named = _NAMED_ERRORS.get(type(exc).__name__)
    if named is not None:
        return named(str(exc))
    return errors.VlmqError(f"task {task_id} failed: {type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class _Prepared:
    data: bytes
    request: AnalysisRequest
    priority: int | None
    expires: str | None  # ISO 8601, as Celery writes it in the message
    queue: str


#: Redis connections one client opens at most for claim checks and queue depths.
REDIS_CONNECTIONS = 32


class Client:
    """Submits image-analysis tasks to the vlmq queue.

    ``settings`` defaults to :meth:`Settings.from_env` and ``limits`` to
    :meth:`Limits.from_env`. The Celery app (``app``, else :func:`make_celery_app`) and the
    claim-check store (``image_store``, else an :class:`ImageStore` on ``settings.redis_url``)
    are created on first use; both must be the ones the worker reads. URLs of private,
    loopback or link-local hosts are refused unless ``allow_private_urls``.

    Every task is recorded in the ledger (:mod:`producer.ledger`) before it is published, so
    that a worker's sweeper sends it again should its message be lost with a killed worker.

    When ``settings.max_queue_depth`` is set, a submission that would take a queue past it
    raises :class:`~producer.errors.QueueFull`, or first waits up to ``wait_when_full``
    seconds for the workers to make room. The limit is approximate: producers that check at
    the same moment may together pass it by what they send then.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        app: Celery | None = None,
        limits: Limits | None = None,
        image_store: ImageStore | None = None,
        allow_private_urls: bool = False,
        wait_when_full: float | None = None,
    ) -> None:
        self.settings = settings or Settings.from_env()
        self.limits = limits or Limits.from_env()
        self.allow_private_urls = allow_private_urls
        self.wait_when_full = wait_when_full
        self._given_app = app
        self._given_images = image_store

    @cached_property
    def app(self) -> Celery:
        """The Celery app tasks are sent with."""
        return self._given_app or make_celery_app(self.settings)

    @cached_property
    def _reader(self) -> AsyncResultReader:
        return AsyncResultReader(self.app.backend.url)

    @cached_property
    def images(self) -> ImageStore:
        """The claim-check store the images go to."""
        return self._given_images or ImageStore(self._redis, self.settings.image_ttl_s)

    @cached_property
    def _redis(self) -> redis.Redis:
        # A blocking pool: many threads submitting at once wait for a connection instead of
        # failing with "Too many connections".
        pool = redis.BlockingConnectionPool.from_url(
            self.settings.redis_url, max_connections=REDIS_CONNECTIONS, timeout=30
        )
        return redis.Redis(connection_pool=pool)

    @cached_property
    def _ledger(self) -> Ledger | None:
        # An app on another broker (the demo's in-memory transport) has no sweeper to serve.
        return Ledger(self._redis) if is_redis_url(self.app.conf.broker_url) else None

    def submit(
        self,
        image: ImageSource,
        question: str,
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        priority: int | None = None,
        expires: float | datetime | None = None,
        model: str | None = None,
    ) -> TaskHandle:
        """Check ``image`` and ``question`` locally, store the image, enqueue the task.

        ``image`` is anything :func:`~producer.images.read_image_source` reads (path, URL,
        bytes, PIL image). ``priority``: 0 is the highest and 9 the lowest (the Redis
        transport's order); None sends at 0. ``expires``: seconds from now, or a datetime,
        after which the worker drops the task unanswered. ``model``: the served model id
        (e.g. ``llama-3.2v-11b-cot.bf16``) whose queue it goes to; None: the shared queue,
        which every worker serves.

        Raises:
            InvalidImage: the image cannot be read or decoded, or is over the limits.
            InvalidRequest: the question or an option is out of range.
        """
        prepared = self._prepare(
            image,
            question,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            priority=priority,
            expires=expires,
            model=model,
        )
        return self._send([prepared])[0]

    async def asubmit(self, image: ImageSource, question: str, **options: Any) -> TaskHandle:
        """:meth:`submit` for asyncio: reading and checking the image and sending run in a
        worker thread, so the event loop never waits on them; same arguments and errors."""
        return await asyncio.to_thread(self.submit, image, question, **options)

    def submit_many(self, items: Iterable[Mapping[str, Any] | tuple[Any, ...]]) -> list[TaskHandle]:
        """Submit several tasks: each item is ``(image, question)`` or a mapping of
        :meth:`submit`'s arguments by name (``image``, ``question``, options).

        Every item is checked before anything is stored or sent, so one bad item sends
        nothing; the images then go to Redis and the messages to the broker in pipelines.

        Raises:
            InvalidRequest: an item is malformed; the message starts with its index.
        """
        prepared = []
        for index, item in enumerate(items):
            try:
                args, options = _item_arguments(item)
                prepared.append(self._prepare(*args, **options))
            except errors.InvalidRequest as exc:
                raise type(exc)(f"item {index}: {exc}") from exc
        return self._send(prepared)

    def handle(self, task_id: str) -> TaskHandle:
        """The handle of a task submitted earlier, perhaps by another process."""
        return TaskHandle(task_id, self.app, self._reader)

    def close(self) -> None:
        """Release the Redis connections this client opened."""
        if "_redis" in self.__dict__:
            self._redis.close()
        if "app" in self.__dict__ and self._given_app is None:
            self.app.close()

    def _prepare(
        self,
        image: ImageSource,
        question: str,
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        priority: int | None,
        expires: float | datetime | None,
        model: str | None,
    ) -> _Prepared:
        if priority is not None and (
            isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 9
        ):
            raise errors.InvalidRequest(
                f"priority must be an integer from 0 (highest) to 9 (lowest) or None, "
                f"got {priority!r}"
            )
        if expires is not None and (
            isinstance(expires, bool) or not isinstance(expires, (int, float, datetime))
        ):
            raise errors.InvalidRequest(
                f"expires must be seconds from now or a datetime, got {expires!r}"
            )
        data = read_image_source(
            image, limits=self.limits, allow_private_urls=self.allow_private_urls
        )
        request = AnalysisRequest(
            image_key=ImageStore.key_for(data),
            question=question,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            model=model,
        )
        request.validate(self.limits)
        decode_image(data, self.limits)
        queue = self.settings.queue if model is None else model_queue(self.settings.queue, model)
        return _Prepared(data, request, priority, _expiry(expires), queue)

    def queue_depth(self, queue: str | None = None) -> int:
        """Tasks waiting in ``queue`` (default: the shared queue), all priorities together;
        tasks a worker has already taken are not counted."""
        return queue_depth(self._redis, queue or self.settings.queue)

    def _wait_for_room(self, prepared: list[_Prepared]) -> None:
        limit = self.settings.max_queue_depth
        if not limit:
            return
        wanted = Counter(item.queue for item in prepared)
        deadline = time.monotonic() + (self.wait_when_full or 0.0)
        while True:
            depths = {queue: self.queue_depth(queue) for queue in wanted}
            full = [q for q, n in wanted.items() if depths[q] + n > limit]
            if not full:
                return
            if time.monotonic() >= deadline:
                queue = full[0]
                waited = f" after waiting {self.wait_when_full:g} s" if self.wait_when_full else ""
                raise errors.QueueFull(
                    f"queue {queue!r} holds {depths[queue]} waiting tasks{waited}; with "
                    f"{wanted[queue]} more it would pass VLMQ_MAX_QUEUE_DEPTH={limit}. "
                    "Try again later, or pass Client(wait_when_full=SECONDS) to wait for room"
                )
            time.sleep(0.05)

    def _send(self, prepared: list[_Prepared]) -> list[TaskHandle]:
        self._wait_for_room(prepared)
        self.images.put_many([item.data for item in prepared])
        entries = [
            LedgerEntry(
                task_id=str(uuid.uuid4()),
                queue=item.queue,
                kwargs=item.request.to_message(),
                priority=item.priority,
                expires=item.expires,
                submitted_at=item.request.submitted_at,
            )
            for item in prepared
        ]
        ledger = self._ledger
        if ledger is not None:
            ledger.add(entries)
        try:
            with self.app.producer_or_acquire() as producer, producer.batch():
                for entry in entries:
                    entry.publish(self.app, producer)
        except Exception:
            # submit raises, so these tasks were not accepted: keep the sweeper from sending
            # them. Should Redis be gone this fails too, and a sweeper may run them later.
            if ledger is not None:
                try:
                    ledger.forget(entry.task_id for entry in entries)
                except redis.RedisError:
                    logger.warning("Could not drop %d unsent tasks from the ledger", len(entries))
            raise
        return [TaskHandle(entry.task_id, self.app, self._reader) for entry in entries]


def _expiry(expires: float | datetime | None) -> str | None:
    """``expires`` (seconds from now, or a datetime) as the ISO 8601 time Celery sends."""
    if expires is None:
        return None
    if isinstance(expires, datetime):
        return expires.isoformat()
    try:
        return (datetime.now(UTC) + timedelta(seconds=expires)).isoformat()
    except (OverflowError, ValueError):
        raise errors.InvalidRequest(
            f"expires must be a finite number of seconds from now, got {expires!r}"
        ) from None


# submit's options and their defaults, spelled out once, in its signature.
_SUBMIT_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(Client.submit).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
}


def _item_arguments(
    item: Mapping[str, Any] | tuple[Any, ...],
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments of :meth:`Client.submit` that ``item`` stands for."""
    if isinstance(item, tuple) and len(item) == 2:
        return item, dict(_SUBMIT_DEFAULTS)
    if isinstance(item, Mapping):
        options = {**_SUBMIT_DEFAULTS, **item}
        missing = {"image", "question"} - options.keys()
        unknown = options.keys() - _SUBMIT_DEFAULTS.keys() - {"image", "question"}
        if not missing and not unknown:
            return (options.pop("image"), options.pop("question")), options
    raise errors.InvalidRequest(
        "an item must be (image, question) or a mapping with image, question and any of "
        f"{', '.join(_SUBMIT_DEFAULTS)}, got {item!r:.80}"
    )
