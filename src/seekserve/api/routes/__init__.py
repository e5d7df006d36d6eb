"""One router per resource; each route is thin: parse, call the backend, encode."""
