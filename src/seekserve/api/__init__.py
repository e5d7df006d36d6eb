"""The HTTP layer: OpenAI/DeepSeek wire format, SSE, OpenAI-style errors. Knows HTTP, nothing about models."""
