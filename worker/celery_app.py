"""Build the worker's Celery app: the producer's shared config plus the batching parts.

The bootsteps are named, not imported: they pull in torch and transformers, which only a
worker needs — ``celery -A worker.app inspect ping`` loads neither.
"""

from typing import TYPE_CHECKING, Any

from celery import Celery, Task, signals

from producer.claimcheck import ImageStore
from producer.config import Settings, make_celery_app
from producer.deadletter import DeadLetters
from producer.errors import ConfigurationError
from producer.protocol import TASK_NAME, model_queue
from producer.queues import routed_queue
from worker.parts import WorkerParts
from worker.quarantine import Quarantine
from worker.settings import WorkerSettings
from worker.strategy import batching_strategy
from worker.transport import serve_redis_urls

if TYPE_CHECKING:
    from worker.executor import ImageSource

WORKER_STEPS = (
    "worker.routing:RoutingStep",
    "worker.bootstep:BatchingStep",
    "worker.monitoring.bootstep:MonitoringStep",
)


class AnalyzeTask(Task):
    """Analyse one image (kwargs: :class:`producer.protocol.AnalysisRequest`).

    The worker batches this task: its messages go to the loop, never to the pool.
    """

    name = TASK_NAME
    Strategy = staticmethod(batching_strategy)
    acks_late = True

    def run(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self.name} runs only inside a vlmq worker's loop")


def create_worker_app(
    settings: Settings,
    worker_settings: WorkerSettings | None = None,
    *,
    image_source: "ImageSource | None" = None,
) -> Celery:
    """The app that ``celery -A worker.app worker`` runs.

    ``worker_settings`` None: read from the environment (:meth:`WorkerSettings.from_env`);
    when they are missing or wrong, only a worker refuses to start (with the message), so
    other celery commands (``inspect``, ``control``, ``events``) need no ``VLMQ_MODEL``.
    ``image_source`` defaults to the Redis claim-check store at ``settings.redis_url``.
    """
    app = make_celery_app(settings, name="vlmq-worker")
    app.conf.update(
        worker_pool="solo",
        worker_concurrency=1,
        worker_hijack_root_logger=True,
        # A result that cannot be stored while Redis restarts is retried (with backoff, for
        # up to about a minute) rather than its task requeued and computed again.
        result_backend_always_retry=True,
        result_backend_max_retries=15,
        # A Redis outage of any length: keep reconnecting, never exit.
        broker_connection_max_retries=None,
        # Poison messages are quarantined (worker/consumer.py, worker/transport.py).
        worker_consumer="worker.consumer:Consumer",
    )
    import redis

    client = redis.Redis.from_url(settings.redis_url)
    if image_source is None:
        image_source = ImageStore(client, settings.image_ttl_s)
    quarantine = Quarantine(DeadLetters(client), app)
    serve_redis_urls(quarantine)
    app.steps["worker"].update(WORKER_STEPS)
    app.register_task(AnalyzeTask())
    if worker_settings is None:
        try:
            worker_settings = WorkerSettings.from_env()
        except ConfigurationError as exc:
            _refuse_workers(app, exc)
            return app
    app.conf.update(
        # The shared queue (any model) and this model's own queue, each under its own key.
        task_queues=[
            routed_queue(settings.queue, settings.queue),
            routed_queue(model_queue(settings.queue, worker_settings.served_model), settings.queue),
        ],
        worker_prefetch_multiplier=worker_settings.prefetch_count,
    )
    app.vlmq = WorkerParts(worker_settings, image_source, quarantine)
    return app


def _refuse_workers(app: Celery, error: ConfigurationError) -> None:
    """Make a worker of ``app`` exit with ``error`` as soon as it is created."""

    def refuse(sender: Any = None, instance: Any = None, **_: Any) -> None:
        if instance is not None and instance.app is app:
            raise SystemExit(f"vlmq worker: {error}")

    signals.celeryd_init.connect(refuse, weak=False)
