"""Model cache layout on the PVC: a diffusers-style directory plus `manifest.json`.

    MODEL_DIR/
      manifest.json            format, name, kind (the task: t2v|i2v), family (wan2.1|wan2.2|...), components,
                               defaults, files[path,size,sha256]
      transformer/             config.json + *.safetensors  (I2V: the high-noise expert)
      transformer_2/           I2V only: the low-noise expert
      vae/  text_encoder/  tokenizer/

`family` names the registered model family (engine/families) whose spec loads the components. Manifests written
before it was recorded have none and load as the family their kind implied (wan2.1 for t2v, wan2.2 for i2v).

Loading checks presence and sizes (cheap, every cold start); `verify(checksums=True)` hashes every file
(the pull job and `turboflow model verify` do this once).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from turboflow.errors import ChecksumMismatchError, ModelCacheError

from . import families

MANIFEST = "manifest.json"
FORMAT = "turboflow-model-cache/1"
KINDS = families.TASKS
_CHUNK = 8 << 20


@dataclass
class FileEntry:
    path: str
    size: int
    sha256: str


@dataclass
class Manifest:
    name: str
    kind: str  # the task it serves: t2v | i2v
    components: dict[str, str]  # role -> subdirectory
    files: list[FileEntry] = field(default_factory=list)
    defaults: dict = field(default_factory=dict)  # e.g. sigma_max, resolution, boundary
    source: dict = field(default_factory=dict)  # where the weights came from (checkpoint names, tiny seed)
    format: str = FORMAT
    created: float = field(default_factory=time.time)
    family: str = ""  # "": written before families were recorded -> the family the kind implied

    def __post_init__(self):
        if not self.family and self.kind in KINDS:
            self.family = families.family_for_kind(self.kind).name

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(
    model_dir: str | os.PathLike,
    *,
    name: str,
    kind: str,
    components: dict[str, str],
    family: str | None = None,
    defaults: dict | None = None,
    source: dict | None = None,
) -> Manifest:
    """Hash every file under the component directories and write manifest.json last (its presence
    means the cache is complete). `family` defaults to the one the kind implies (wan2.1 t2v, wan2.2 i2v)."""
    root = Path(model_dir)
    if kind not in KINDS:
        raise ModelCacheError(f"unknown model kind {kind!r}; expected one of {KINDS}")
    spec = families.family(family) if family is not None else families.family_for_kind(kind)
    _check_family_serves(spec, kind, root)
    entries = []
    for sub in sorted(set(components.values())):
        base = root / sub
        if not base.is_dir():
            raise ModelCacheError(f"component directory missing: {base}")
        for p in sorted(base.rglob("*")):
            if p.is_file():
                entries.append(FileEntry(str(p.relative_to(root)), p.stat().st_size, sha256_file(p)))
    manifest = Manifest(
        name=name,
        kind=kind,
        family=spec.name,
        components=dict(components),
        files=entries,
        defaults=dict(defaults or {}),
        source=dict(source or {}),
    )
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, root / MANIFEST)
    return manifest


def read_manifest(model_dir: str | os.PathLike) -> Manifest:
    root = Path(model_dir)
    path = root / MANIFEST
    if not root.is_dir():
        raise ModelCacheError(f"model directory does not exist: {root}", code="model_cache_missing")
    if not path.is_file():
        raise ModelCacheError(
            f"{path} not found: the model cache is incomplete (run `turboflow model import` or the pull job)",
            code="model_cache_incomplete",
        )
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT:
            raise ModelCacheError(
                f"{path}: unsupported format {raw.get('format')!r}, expected {FORMAT}", code="model_cache_invalid"
            )
        files = [FileEntry(**f) for f in raw.pop("files", [])]
        manifest = Manifest(files=files, **raw)
    except ModelCacheError:
        raise
    except (ValueError, TypeError, KeyError) as e:
        raise ModelCacheError(f"{path} is not a valid manifest: {e}", code="model_cache_invalid") from e
    if manifest.kind not in KINDS:
        raise ModelCacheError(f"{path}: unknown kind {manifest.kind!r}", code="model_cache_invalid")
    try:
        spec = families.family(manifest.family)
    except families.UnknownFamilyError as e:
        raise families.UnknownFamilyError(f"{path}: {e.message}", field="family") from None
    _check_family_serves(spec, manifest.kind, path)
    return manifest


def _check_family_serves(spec: families.FamilySpec, kind: str, where: Path) -> None:
    if kind not in spec.tasks:
        raise ModelCacheError(
            f"{where}: model family {spec.name} serves {'/'.join(spec.tasks)}, not {kind}", code="model_cache_invalid"
        )


def verify(model_dir: str | os.PathLike, *, checksums: bool = False) -> Manifest:
    """Raise ModelCacheError naming the first missing/short file, ChecksumMismatchError on a bad hash."""
    root = Path(model_dir)
    manifest = read_manifest(root)
    for entry in manifest.files:
        p = root / entry.path
        if not p.is_file():
            raise ModelCacheError(f"model cache file missing: {entry.path} (in {root})", code="model_cache_incomplete")
        size = p.stat().st_size
        if size != entry.size:
            raise ModelCacheError(
                f"model cache file {entry.path} has {size} bytes, manifest says {entry.size}",
                code="model_cache_incomplete",
            )
        if checksums:
            digest = sha256_file(p)
            if digest != entry.sha256:
                raise ChecksumMismatchError(
                    f"sha256 of {entry.path} is {digest[:16]}..., manifest says {entry.sha256[:16]}..."
                )
    return manifest
