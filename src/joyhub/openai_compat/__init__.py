"""The OpenAI-compatible surface (API.md §12): `/api/v1/openai`, a second protocol adapter on the
one gateway (`tools/gateway.py`) — requests in OpenAI's shape, answers and errors in OpenAI's
shape, admission, limits, idempotency, breaker, retries, relay and settle the gateway's own."""
