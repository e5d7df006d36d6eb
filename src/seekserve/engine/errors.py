"""Typed errors raised by the engine. The API layer maps them to HTTP statuses:
`InvalidRequestError` -> 400, `ModelLoadError` -> start-up failure, `EngineDeadError` -> 503."""


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """The caller asked for something invalid (a bad sampling parameter, a prompt that is too long).

    `param` names the offending field, as OpenAI's error body does."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ModelLoadError(EngineError):
    """A checkpoint folder cannot be loaded: unknown architecture, missing file, shape mismatch."""


class EngineDeadError(EngineError):
    """The engine loop stopped (a crash in a step); no further requests can be served."""
