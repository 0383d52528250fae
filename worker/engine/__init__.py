"""The fast engine: continuous (iteration-level) batching with CUDA-graph decode for Mllama."""

from worker.engine.engine import ContinuousEngine, EngineStats, FinishedRequest

__all__ = ["ContinuousEngine", "EngineStats", "FinishedRequest"]
