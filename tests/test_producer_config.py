"""Settings from the environment and the shared Celery app."""

import pytest

from producer.config import Settings, make_celery_app
from producer.errors import ConfigurationError


def test_defaults() -> None:
    assert Settings.from_env({}) == Settings(
        redis_url="redis://127.0.0.1:6379/0",
        queue="vlmq",
        image_ttl_s=10800,
        visibility_timeout_s=7200,
        result_expires_s=86400,
    )


def test_from_env() -> None:
    settings = Settings.from_env(
        {
            "REDIS_URL": "rediss://:pw@redis.internal:6380/2?ssl_cert_reqs=required",
            "VLMQ_QUEUE": "vision",
            "VLMQ_IMAGE_TTL_S": "60",
            "VLMQ_VISIBILITY_TIMEOUT_S": "600",
            "VLMQ_RESULT_EXPIRES_S": "120",
        }
    )
    assert settings == Settings(
        "rediss://:pw@redis.internal:6380/2?ssl_cert_reqs=required", "vision", 60, 600, 120
    )


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"REDIS_URL": "http://localhost:6379"}, "redis://"),
        ({"REDIS_URL": "unix:///run/redis.sock"}, "not supported"),
        ({"REDIS_URL": "redis://localhost:port"}, "port from 1 to 65535"),
        ({"REDIS_URL": "redis://localhost:6379/zero"}, "database must be a number"),
        ({"REDIS_URL": "rediss://localhost:6380/0"}, "ssl_cert_reqs=required"),
        ({"VLMQ_IMAGE_TTL_S": "1h"}, "VLMQ_IMAGE_TTL_S must be an integer in >= 1"),
        ({"VLMQ_VISIBILITY_TIMEOUT_S": "0"}, "VLMQ_VISIBILITY_TIMEOUT_S=7200"),
        ({"VLMQ_RESULT_EXPIRES_S": "-1"}, "VLMQ_RESULT_EXPIRES_S"),
    ],
)
def test_errors_say_how_to_fix(env: dict, says: str) -> None:
    with pytest.raises(ConfigurationError, match=says):
        Settings.from_env(env)


def test_password_is_never_shown() -> None:
    settings = Settings(redis_url="redis://app:s3cret@redis:6379/0")
    assert settings.redacted_url == "redis://app:***@redis:6379/0"
    assert "s3cret" not in repr(settings)
    assert "s3cret" not in str(settings)
    assert Settings(redis_url="redis://:s3cret@redis").redacted_url == "redis://:***@redis"
    assert Settings().redacted_url == Settings().redis_url
    with pytest.raises(ConfigurationError) as caught:
        Settings(redis_url="http://app:s3cret@redis")
    assert "s3cret" not in str(caught.value)


def test_celery_app_is_json_only_with_priorities() -> None:
    settings = Settings(redis_url="redis://127.0.0.1:6379/15", queue="q", visibility_timeout_s=99)
    conf = make_celery_app(settings, name="test").conf
    assert conf.accept_content == ["json"]
    assert conf.result_accept_content == ["json"]
    assert (conf.task_serializer, conf.result_serializer, conf.event_serializer) == ("json",) * 3
    assert conf.broker_url == conf.result_backend == settings.redis_url
    assert conf.broker_transport_options == {
        "visibility_timeout": 99,
        "queue_order_strategy": "priority",
        "priority_steps": list(range(10)),
        "unacked_restore_throttle": 1,
    }
    assert conf.result_backend_transport_options == {"visibility_timeout": 99}
    assert conf.result_expires == 86400
    assert conf.result_extended is True
    assert conf.task_default_queue == "q"
    assert conf.task_acks_late is True
    assert conf.worker_send_task_events is True
    assert conf.task_send_sent_event is True
    assert conf.broker_connection_retry_on_startup is True
