"""The API's routes, one module per resource, each thin: parse, call the gateway or a backend, encode.
models, health, keys and records are FastAPI routers; chat and completions are plain functions that the
ASGI endpoint in api/inference.py serves (the requests that carry the load skip FastAPI)."""
