"""Monitoring of a vlmq worker: custom Celery events, a Prometheus endpoint, viewers.

The worker side is :class:`worker.monitoring.bootstep.MonitoringStep`; ``vlmq top`` and
``vlmq report`` read the same events through :mod:`worker.monitoring.listener` and
:mod:`worker.monitoring.state`, which import neither torch nor the worker's model code.
Monitoring never breaks the work: every hook only enqueues, and every failure is logged.
"""
