"""Build the worker's Celery app: the producer's shared config plus the batching parts."""

from typing import Any

from celery import Celery, Task
from kombu import Queue

from producer.claimcheck import ImageStore
from producer.config import Settings, make_celery_app
from producer.protocol import TASK_NAME, model_queue
from worker.bootstep import BatchingStep
from worker.executor import ImageSource
from worker.monitoring.bootstep import MonitoringStep
from worker.parts import WorkerParts
from worker.settings import WorkerSettings
from worker.strategy import batching_strategy


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
    worker_settings: WorkerSettings,
    *,
    image_source: ImageSource | None = None,
) -> Celery:
    """The app that ``celery -A worker.app worker`` runs.

    ``image_source`` defaults to the Redis claim-check store at ``settings.redis_url``.
    """
    app = make_celery_app(settings, name="vlmq-worker")
    app.conf.update(
        # The shared queue (any model) and this model's own queue.
        task_queues=[
            Queue(settings.queue),
            Queue(model_queue(settings.queue, worker_settings.served_model)),
        ],
        worker_pool="solo",
        worker_concurrency=1,
        worker_prefetch_multiplier=worker_settings.prefetch_count,
        worker_hijack_root_logger=True,
        # A result that cannot be stored while Redis restarts is retried (with backoff, for
        # up to about a minute) rather than its task requeued and computed again.
        result_backend_always_retry=True,
        result_backend_max_retries=15,
    )
    if image_source is None:
        import redis

        image_source = ImageStore(redis.Redis.from_url(settings.redis_url), settings.image_ttl_s)
    app.vlmq = WorkerParts(worker_settings, image_source)
    app.steps["worker"].add(BatchingStep)
    app.steps["worker"].add(MonitoringStep)
    app.register_task(AnalyzeTask())
    return app
