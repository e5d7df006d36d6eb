"""seekserve: a self-hosted, DeepSeek-compatible model server and hybrid gateway."""

__version__ = "0.1.0"
