"""The worker's Celery app, configured from the environment: ``celery -A worker.app worker``.

The GPU is pinned (``VLMQ_GPU``) before anything imports torch. Only a worker needs the
worker settings (``VLMQ_MODEL``…) and torch: ``celery -A worker.app inspect ping`` needs
neither.
"""

from worker.gpu import pin_gpu

pin_gpu()

import worker.logs  # noqa: E402, F401  (the worker's progress at Celery's default log level)
from producer.config import Settings  # noqa: E402
from producer.errors import ConfigurationError  # noqa: E402
from worker.celery_app import create_worker_app  # noqa: E402

try:
    app = create_worker_app(Settings.from_env())
except ConfigurationError as exc:
    raise SystemExit(f"vlmq worker: {exc}") from None
