"""Capacity planning: a discrete-event model of Knative's KPA autoscaler in front of the GPU functions.

`turboflow simulate` replays a request trace through the scaling rules configured in `infra/`, with service times and
cold starts from `bench/results/*.json`, and reports latency percentiles, GPU-hours, idle fraction and cost per video
(docs/capacity-planning.md).
"""
