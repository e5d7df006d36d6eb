"""Backends: one protocol (`base.Backend`), several engines behind it (local native engine today)."""
