"""The Celery app for Flower: ``celery -A worker.monitoring.flower_app flower``.

Flower must share vlmq's broker settings (JSON only, the Redis transport's options). With
Celery's defaults it binds its reply queue with another key separator: the workers cannot
answer its inspect and control commands (worker pages fail, and each worker logs "Control
command error"). Imports neither torch nor the model.
"""

from producer.config import Settings, make_celery_app

app = make_celery_app(Settings.from_env(), name="vlmq-flower")
