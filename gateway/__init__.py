"""turboflow's front door: a FastAPI gateway (API keys, request status, progress, cancellation, signed webhooks)
and the web console. See docs/ARCHITECTURE.md and docs/gateway.openapi.json."""
