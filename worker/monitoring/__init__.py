"""Monitoring of a vlmq worker: custom Celery events and a Prometheus endpoint.

The worker side is :class:`worker.monitoring.bootstep.MonitoringStep`. The events' schema is
:mod:`producer.events`; ``vlmq top`` and ``vlmq report`` read them through
:mod:`producer.listener` and :mod:`producer.cluster`, which import nothing from ``worker``.
Monitoring never breaks the work: every hook only enqueues, and every failure is logged.
"""
