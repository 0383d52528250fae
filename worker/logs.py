"""The worker's progress in its log at Celery's default level (WARNING), and a ready line.

Loading and warming a model takes minutes; at WARNING a worker would look hung. vlmq's own
loggers log at INFO or below whatever ``--loglevel`` says (DEBUG still gives DEBUG).
"""

import logging
from typing import Any

from celery import signals

PROGRESS_LOGGERS = ("worker", "producer")

logger = logging.getLogger(__name__)


@signals.after_setup_logger.connect(weak=False, dispatch_uid="vlmq-progress-level")
def show_progress(loglevel: int | None = None, **_: Any) -> None:
    level = min(loglevel or logging.WARNING, logging.INFO)
    for name in PROGRESS_LOGGERS:
        logging.getLogger(name).setLevel(level)


@signals.worker_ready.connect(weak=False, dispatch_uid="vlmq-ready-line")
def announce_ready(sender: Any = None, **_: Any) -> None:
    """Log that the worker takes tasks, what it serves and from which queues."""
    app = sender.app
    parts = getattr(app, "vlmq", None)  # none: not a vlmq worker's app
    if parts is None:
        return
    served = parts.settings
    logger.info(
        "vlmq worker %s ready: serving %s on %s from queues %s",
        sender.hostname, served.served_model, served.device,
        ", ".join(sorted(app.amqp.queues.consume_from)),
    )  # fmt: skip
