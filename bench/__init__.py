"""vlmq's GPU benchmark harness: ``python -m bench --help``.

One run on one GPU measures every mode against the same workload:
(a) transformers ``generate`` one request at a time, (b) static batches, (c) the worker's
default (continuous) engine in process, (cb) its batch executor in process, (d) the whole system
through Redis and a Celery worker, plus the quantized loads. See ``BENCHMARKS.md``.
"""
