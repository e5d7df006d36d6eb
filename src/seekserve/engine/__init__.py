"""The native inference engine: continuous batching over a paged KV cache with prefix caching.

    from seekserve.engine import EngineConfig, LLMEngine, SamplingParams
    engine = LLMEngine(EngineConfig(model_path="./DeepSeek-R1-Distill-Qwen-1.5B"))
    [out] = engine.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
"""

from seekserve.engine.async_engine import AsyncEngine
from seekserve.engine.config import EngineConfig, ResolvedConfig
from seekserve.engine.engine import EngineStats, LLMEngine, PreparedRequest
from seekserve.engine.errors import EngineDeadError, EngineError, InvalidRequestError, ModelLoadError
from seekserve.engine.outputs import CompletionOutput, IncrementalOutput, RequestOutput, TokenLogprobs
from seekserve.engine.params import SamplingParams

__all__ = [
    "AsyncEngine", "CompletionOutput", "EngineConfig", "EngineDeadError", "EngineError", "EngineStats",
    "IncrementalOutput", "InvalidRequestError", "LLMEngine", "ModelLoadError", "PreparedRequest",
    "RequestOutput", "ResolvedConfig", "SamplingParams", "TokenLogprobs",
]
