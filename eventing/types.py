"""CloudEvent type names and the extension attributes turboflow uses. The contract's vocabulary."""

T2V_REQUESTED = "io.turboflow.video.t2v.requested"
I2V_REQUESTED = "io.turboflow.video.i2v.requested"
COMPLETED = "io.turboflow.video.completed"
FAILED = "io.turboflow.video.failed"
STARTED = "io.turboflow.video.started"  # a function took the request onto its device
PROGRESS = "io.turboflow.video.progress"  # stage and step while it runs (at most ~2 per second)
CANCELLED = "io.turboflow.video.cancelled"  # terminal, like completed and failed
REQUEST_TYPES = {"t2v": T2V_REQUESTED, "i2v": I2V_REQUESTED}
TERMINAL_TYPES = (COMPLETED, FAILED, CANCELLED)
LIFECYCLE_TYPES = (STARTED, PROGRESS, *TERMINAL_TYPES)  # what a request goes through after it is requested
POD_READY = "io.turboflow.pod.ready"  # a function's model is loaded: the pod's cold start, reported once
POD_STOPPED = "io.turboflow.pod.stopped"  # the pod stops: its warm idle and busy time (platform overhead)
POD_TYPES = (POD_READY, POD_STOPPED)
# the stages a progress event names, in the order a request passes them
PROGRESS_STAGES = ("text_encode", "vae_encode", "diffusion", "vae_decode", "upload")

GATEWAY_SOURCE = "/turboflow/gateway"  # `source` of what the gateway emits (requests, cancels of queued requests)
TENANT_EXTENSION = "tenant"  # CloudEvents extension attribute selecting the tenant
DEFAULT_TENANT = "default"
