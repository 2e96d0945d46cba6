"""CloudEvent type names and the extension attributes turboflow uses. The contract's vocabulary."""

T2V_REQUESTED = "io.turboflow.video.t2v.requested"
I2V_REQUESTED = "io.turboflow.video.i2v.requested"
COMPLETED = "io.turboflow.video.completed"
FAILED = "io.turboflow.video.failed"
REQUEST_TYPES = {"t2v": T2V_REQUESTED, "i2v": I2V_REQUESTED}

TENANT_EXTENSION = "tenant"  # CloudEvents extension attribute selecting the tenant
DEFAULT_TENANT = "default"
