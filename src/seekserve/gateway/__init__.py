"""The policy pipeline every request walks through: authenticate → authorize (RBAC) → rate-limit →
classify sensitivity → cache → route → meter/audit."""
