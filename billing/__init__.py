"""Billing and capacity planning.

`turboflow billing record|report`: the usage ledger (`ledger.py`, an append-only table of raw CloudEvents in SQLite or
PostgreSQL, Alembic migrations in `migrations/`), the attribution rule (`attribution.py`) and the per-tenant report
(`usage_report.py`); docs/billing.md.

`turboflow simulate` replays a request trace through the scaling rules configured in `infra/` (a discrete-event model
of Knative's KPA autoscaler), with service times and cold starts from `bench/results/*.json`, and reports latency
percentiles, GPU-hours, idle fraction and cost per video (docs/capacity-planning.md).
"""
