"""Pipeline configurations the harness can time side by side (`--variants eager,...`).

Each entry: request (extra GenerationRequest fields, e.g. attention="sla", sla_topk=0.1), prepare(pipeline) run
before timing (quantise linears, compile, swap attention processors), restore(pipeline) run after, note (shown in
the table). The optimisation work (issue 7) registers its configurations here; the harness then reports each one
with the plain-diffusers baseline of the same run beside it.
"""
from __future__ import annotations

VARIANTS: dict[str, dict] = {
    "eager": {"request": {}, "note": "TurboVideoPipeline as shipped: diffusers modules, SDPA, bf16, eager."},
}


def register(name: str, *, request: dict | None = None, prepare=None, restore=None, note: str = "") -> None:
    VARIANTS[name] = {"request": dict(request or {}), "prepare": prepare, "restore": restore, "note": note}
