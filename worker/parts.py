"""The vlmq parts of a worker's Celery app, in one object: ``app.vlmq``."""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from worker.settings import WorkerSettings

if TYPE_CHECKING:  # the app is built without them (`celery -A worker.app inspect` is light)
    from worker.executor import ImageSource
    from worker.loop import BatchLoop, BatchObserver
    from worker.quarantine import Quarantine
    from worker.sweeper import Sweeper


@dataclass
class WorkerParts:
    """What the worker's bootsteps and strategy share.

    Built with the app (settings, image source); monitoring adds observers before the loop
    starts; the batching bootstep sets ``loop`` and ``sweeper`` while the worker runs.
    """

    settings: WorkerSettings
    images: "ImageSource"
    quarantine: "Quarantine"  # poison messages go there (worker/consumer.py, transport.py)
    observers: "list[BatchObserver]" = field(default_factory=list)
    loop: "BatchLoop | None" = None
    sweeper: "Sweeper | None" = None
