"""The Celery app for Flower: ``celery -A worker.monitoring.flower_app flower``.

Flower must share vlmq's broker settings (JSON only, the Redis transport's options). With
Celery's defaults its event queue binding is written with another key separator, and the
workers then fail to publish any event on that Redis. Imports neither torch nor the model.
"""

from producer.config import Settings, make_celery_app

app = make_celery_app(Settings.from_env(), name="vlmq-flower")
