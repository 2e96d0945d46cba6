"""`turboflow model import|pull`: turn downloaded TurboDiffusion / Wan files into a model cache directory.

Output layout (engine/modelcache.py): diffusers-style component directories with config.json + safetensors,
`manifest.json` written last (its presence marks the cache complete):

    OUT/transformer/        WanTransformer3DModel (I2V: the high-noise expert, used while t >= boundary)
    OUT/transformer/sla/proj_l.safetensors   SLA proj_l tensors when the checkpoint has them (see checkpoint.py)
    OUT/transformer_2/      I2V only: the low-noise expert
    OUT/vae/                AutoencoderKLWan
    OUT/text_encoder/       transformers UMT5EncoderModel
    OUT/tokenizer/          copied from a local directory (tokenizer.json / spiece.model ...): never a hub

Inputs per component: a Wan-native `.pth` file (TurboDiffusion DiT, its `-quant.pth`, `Wan2.1_VAE.pth`,
`models_t5_umt5-xxl-enc-bf16.pth`) or an already-converted component directory (config.json + *.safetensors), or
`diffusers_dir=` a diffusers pipeline directory supplying every component not given explicitly. Every component's
keys and shapes are checked against its architecture (the model family's component classes: `family=`, default
the kind's, wan2.1 for t2v and wan2.2 for i2v); nothing mismatched is written silently. Wan-native `.pth` files are
converted with engine/checkpoint.py (the Wan families' key maps).

`pull_model` downloads named files with huggingface_hub's `hf_hub_download` (where the cluster has network), then
runs the same import and a full sha256 verification of the result. The downloader is injectable; this repository's
tests inject one that copies local files, so the real network download is not exercised here.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from turboflow.errors import CheckpointError, TurboflowError

from . import checkpoint as ck
from . import families, modelcache
from .families import FamilySpec
from .quant import INT8_STORAGE, use_stored_int8

log = logging.getLogger(__name__)

MAX_SHARD = "5GB"
DTYPES = {
    "keep": None,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".gguf")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model")


class ModelImportError(TurboflowError):  # noqa: N801 - not the builtin
    """Bad import arguments (missing inputs, existing output without --force, unclassifiable file names)."""

    code = "model_import_error"


# ---------------------------------------------------------------------------------------------------------------
# component writers
# ---------------------------------------------------------------------------------------------------------------
def _is_native_file(path: Path) -> bool:
    return path.is_file() and path.suffix in (".pth", ".pt", ".ckpt")


def _save_model(cls, config: dict, state_dict: dict, dest: Path, what: str, int8: bool = False) -> None:
    """Build `cls` on the meta device, adopt the (already checked) tensors, save_pretrained as safetensors."""
    with torch.device("meta"):
        model = cls(**config) if not hasattr(cls, "config_class") else cls(cls.config_class(**config))
    if int8:  # `-quant` layers stored as int8 + block scales (loaded the same way by engine/fastload.py)
        use_stored_int8(model, state_dict)
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:  # check_state_dict ran already; this is a belt-and-braces guard
        raise CheckpointError(f"{what}: {e}") from e
    model.save_pretrained(dest, max_shard_size=MAX_SHARD, safe_serialization=True)


def _expected_from_dir(cls, src: Path) -> dict[str, tuple[int, ...]]:
    config_class = getattr(cls, "config_class", None)  # transformers models take a config object
    if config_class is not None:
        config = config_class.from_pretrained(src, local_files_only=True)
        with torch.device("meta"):
            model = cls(config)
    else:
        with torch.device("meta"):
            model = cls.from_config(cls.load_config(src, local_files_only=True))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _copy_component_dir(cls, role: str, src: Path, dest: Path) -> None:
    """Copy an already-converted component directory after checking its tensor headers against its config."""
    from safetensors import safe_open

    if not (src / "config.json").is_file():
        raise ModelImportError(
            f"{role}: {src} has no config.json (expected a diffusers/transformers component directory or a .pth file)"
        )
    files = sorted(src.glob("*.safetensors"))
    if not files:
        others = [p.name for p in src.iterdir() if p.suffix in _WEIGHT_SUFFIXES]
        raise ModelImportError(
            f"{role}: {src} has no *.safetensors weights"
            + (f" (found {others}; convert them to safetensors first)" if others else "")
        )
    shapes: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(f, framework="pt") as fh:
            for k in fh.keys():
                shapes[k] = fh.get_slice(k).get_shape()
    fake = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    ignore = ("encoder.embed_tokens.weight",) if role == "text_encoder" else ()  # tied to shared.weight
    ck.check_state_dict(f"{role} in {src}", fake, _expected_from_dir(cls, src), ignore_missing=ignore)
    dest.mkdir(parents=True)
    for p in sorted(src.iterdir()):
        if p.is_file() and (p.suffix in (".safetensors", ".json") or p.name.endswith(".safetensors.index.json")):
            shutil.copyfile(p, dest / p.name)
    sla = src / ck.SLA_FILE
    if sla.is_file():
        (dest / ck.SLA_FILE).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sla, dest / ck.SLA_FILE)


def _write_dit(cls, src: Path, dest: Path, config: dict | None, dtype, keep_int8: bool = False) -> dict:
    from safetensors.torch import save_file

    if not _is_native_file(src):
        _copy_component_dir(cls, dest.name, src, dest)
        return {"file": src.name, "format": "diffusers"}
    conv = ck.load_dit_checkpoint(src, config, dtype=dtype, keep_int8=keep_int8)
    _save_model(
        cls,
        conv.config,
        conv.state_dict,
        dest,
        f"DiT {src}",
        int8=conv.info.get("stored") == INT8_STORAGE,
    )
    if conv.sla_proj_l:
        (dest / ck.SLA_FILE).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in conv.sla_proj_l.items()}, dest / ck.SLA_FILE)
    return {
        **conv.info,
        "format": "wan-native",
        "in_channels": conv.config["in_channels"],
        "num_layers": conv.config["num_layers"],
    }


def _write_vae(cls, src: Path, dest: Path, config: dict | None, dtype) -> dict:
    if not _is_native_file(src):
        _copy_component_dir(cls, "vae", src, dest)
        return {"file": src.name, "format": "diffusers"}
    sd, cfg = ck.load_vae_checkpoint(src, config, dtype=dtype)
    _save_model(cls, cfg, sd, dest, f"VAE {src}")
    return {"file": src.name, "format": "wan-native"}


def _write_text_encoder(cls, src: Path, dest: Path, config: dict | None, dtype) -> dict:
    if not _is_native_file(src):
        _copy_component_dir(cls, "text_encoder", src, dest)
        return {"file": src.name, "format": "transformers"}
    sd, cfg = ck.load_t5_checkpoint(src, config, dtype=dtype)
    _save_model(cls, cfg, sd, dest, f"umT5 {src}")
    return {"file": src.name, "format": "wan-native"}


def _write_tokenizer(cls, src: Path, dest: Path) -> dict:
    if not src.is_dir():
        raise ModelImportError(
            f"tokenizer: {src} is not a directory (give the local umT5 tokenizer directory with "
            f"tokenizer.json and/or spiece.model; it is never fetched from a hub)"
        )
    if not any((src / f).is_file() for f in ("tokenizer.json", "spiece.model")):
        raise ModelImportError(f"tokenizer: {src} has neither tokenizer.json nor spiece.model")
    dest.mkdir(parents=True)
    for p in sorted(src.iterdir()):
        if p.is_file() and p.suffix not in _WEIGHT_SUFFIXES:
            shutil.copyfile(p, dest / p.name)
    try:
        tok = cls.from_pretrained(dest, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ModelImportError(f"tokenizer in {src} cannot be loaded offline: {e}") from e
    return {"dir": src.name, "class": type(tok).__name__, "vocab_size": len(tok)}


# ---------------------------------------------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------------------------------------------
def default_defaults(spec: FamilySpec, dit_name: str = "") -> dict:
    """Request defaults of an imported model: the family's sigma_max and resolution (720p where the DiT's file
    name says so), boundary 0.9."""
    resolution = "720p" if "720" in dit_name else spec.default_resolution
    return {"sigma_max": spec.default_sigma_max, "boundary": 0.9, "resolution": resolution}


def _resolve(value, diffusers_dir: Path | None, sub: str) -> Path | None:
    if value is not None:
        return Path(value)
    if diffusers_dir is not None and (diffusers_dir / sub).is_dir():
        return diffusers_dir / sub
    return None


def import_model(
    out_dir: str | os.PathLike,
    *,
    kind: str,
    family: str | None = None,
    dit=None,
    dit_low=None,
    vae=None,
    text_encoder=None,
    tokenizer_dir=None,
    diffusers_dir=None,
    name: str | None = None,
    dit_config: dict | None = None,
    vae_config: dict | None = None,
    t5_config: dict | None = None,
    sigma_max: float | None = None,
    boundary: float | None = None,
    resolution: str | None = None,
    dtype: str | None = "keep",
    keep_int8: bool = False,
    force: bool = False,
    source: dict | None = None,
    progress: Callable[[str], None] | None = None,
) -> modelcache.Manifest:
    """Convert/copy every component of a `family` model (default: the kind's) serving the task `kind` into
    `out_dir` and write its manifest. `dit` is the first expert's DiT, `dit_low` the second's (two-expert families).
    Returns the Manifest."""
    if kind not in modelcache.KINDS:
        raise ModelImportError(f"kind must be one of {modelcache.KINDS}, got {kind!r}")
    spec = families.family(family) if family is not None else families.family_for_kind(kind)
    if kind not in spec.tasks:
        raise ModelImportError(f"family {spec.name} serves {'/'.join(spec.tasks)}, not --kind {kind}")
    if dtype not in DTYPES:
        raise ModelImportError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES[dtype]
    say = progress or (lambda msg: log.info("%s", msg))
    ddir = Path(diffusers_dir) if diffusers_dir is not None else None
    if ddir is not None and not ddir.is_dir():
        raise ModelImportError(f"diffusers directory not found: {ddir}")
    inputs = {
        "transformer": _resolve(dit, ddir, "transformer"),
        "vae": _resolve(vae, ddir, "vae"),
        "text_encoder": _resolve(text_encoder, ddir, "text_encoder"),
        "tokenizer": _resolve(tokenizer_dir, ddir, "tokenizer"),
    }
    if len(spec.transformer_roles) == 2:
        inputs[spec.transformer_roles[1]] = _resolve(dit_low, ddir, spec.transformer_roles[1])
    elif dit_low is not None:
        raise ModelImportError(
            f"dit_low (the low-noise expert) only applies to --kind i2v (a two-expert family); {spec.name} has one DiT"
        )
    missing = [role for role, p in inputs.items() if p is None]
    if missing:
        raise ModelImportError(f"no input for {missing}: pass them explicitly or a diffusers directory that has them")
    absent = [f"{role}: {p}" for role, p in inputs.items() if not p.exists()]
    if absent:
        raise ModelImportError(f"input not found: {absent}")

    root = Path(out_dir)
    _prepare_output(root, list(inputs), force)
    record: dict = {"importer": "turboflow.engine.model_import", **(source or {})}
    classes = {role: spec.components[role].load_class() for role in inputs}
    writers = {
        "vae": lambda s, d: _write_vae(classes["vae"], s, d, vae_config, torch_dtype),
        "text_encoder": lambda s, d: _write_text_encoder(classes["text_encoder"], s, d, t5_config, torch_dtype),
        "tokenizer": lambda s, d: _write_tokenizer(classes["tokenizer"], s, d),
    }
    for role in spec.transformer_roles:
        writers[role] = lambda s, d, role=role: _write_dit(classes[role], s, d, dit_config, torch_dtype, keep_int8)
    for role in ("tokenizer", "vae", "text_encoder", *spec.transformer_roles):
        say(f"{role}: {inputs[role]}")
        record[role] = writers[role](inputs[role], root / role)
    _check_pairing(spec, kind, root)
    defaults = default_defaults(spec, inputs["transformer"].name)
    if all((root / role / ck.SLA_FILE).is_file() for role in spec.transformer_roles):
        # fine-tuned with SLA: serve it that way unless asked not to (upstream's default, SageSLA, is a quantized
        # variant with other blocks on Hopper that this build does not offer; 'sla' is what it was trained with)
        defaults.update(attention="sla", sla_topk=0.1)
    defaults.update(
        {
            k: v
            for k, v in (("sigma_max", sigma_max), ("boundary", boundary), ("resolution", resolution))
            if v is not None
        }
    )
    name = name or _default_name(kind, inputs["transformer"])
    return modelcache.write_manifest(
        root,
        name=name,
        kind=kind,
        family=spec.name,
        components={r: r for r in inputs},
        defaults=defaults,
        source=record,
    )


def _default_name(kind: str, dit: Path) -> str:
    stem = dit.stem if dit.is_file() else dit.resolve().parent.name
    stem = stem.removesuffix("-quant").replace("-high", "")
    return stem.lower() or f"imported-{kind}"


def _prepare_output(root: Path, roles: list[str], force: bool) -> None:
    existing = [r for r in [modelcache.MANIFEST, *roles] if (root / r).exists()]
    if existing and not force:
        raise ModelImportError(f"{root} already holds {existing}; pass force=True (--force) to replace them")
    for r in existing:
        p = root / r
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    root.mkdir(parents=True, exist_ok=True)


def _check_pairing(spec: FamilySpec, kind: str, root: Path) -> None:
    for role in spec.transformer_roles:
        cfg = json.loads((root / role / "config.json").read_text())
        if cfg.get("in_channels") != spec.in_channels:
            raise ModelImportError(
                f"{role} has {cfg.get('in_channels')} input channels; a {spec.name} {kind} model needs "
                f"{spec.in_channels} (is this the right checkpoint for --kind {kind}?)"
            )


# ---------------------------------------------------------------------------------------------------------------
# pull
# ---------------------------------------------------------------------------------------------------------------
Downloader = Callable[[str, str, str | None, Path], str]


def hf_downloader(repo: str, filename: str, revision: str | None, local_dir: Path) -> str:
    """huggingface_hub download of one file (needs network; not exercised in this repository's tests)."""
    from huggingface_hub import constants, hf_hub_download

    if constants.HF_HUB_OFFLINE:
        raise ModelImportError(
            "HF_HUB_OFFLINE is set in this process; `model pull` needs the hub: run it in a fresh "
            "process with HF_HUB_OFFLINE unset (or download the files and use `model import`)"
        )
    return hf_hub_download(repo_id=repo, filename=filename, revision=revision, local_dir=local_dir)


def parse_file_spec(spec: str, repo: str | None) -> tuple[str, str]:
    """`NAME` (from --repo) or `OWNER/REPO:NAME`."""
    if ":" in spec:
        r, _, f = spec.partition(":")
        if r.count("/") != 1 or not f:
            raise ModelImportError(f"--file {spec!r}: expected NAME or OWNER/REPO:NAME")
        return r, f
    if not repo:
        raise ModelImportError(f"--file {spec!r} names no repository and no --repo was given")
    return repo, spec


def classify_files(kind: str, names: list[str]) -> dict[str, str]:
    """Map downloaded file names to import roles by their (TurboDiffusion / Wan) naming."""
    roles: dict[str, str] = {}

    def put(role, n):
        if role in roles:
            raise ModelImportError(f"two files for {role}: {Path(roles[role]).name} and {Path(n).name}")
        roles[role] = n

    for n in names:
        low = Path(n).name.lower()
        if "vae" in low:
            put("vae", n)
        elif "t5" in low:
            put("text_encoder", n)
        elif kind == "i2v" and "low" in low:
            put("dit_low", n)
        elif kind == "t2v" or "high" in low:
            put("dit", n)
        else:
            raise ModelImportError(
                f"cannot tell what {Path(n).name} is (expected a DiT, *VAE*, *t5* file"
                + ("; I2V experts must be named *high* / *low*)" if kind == "i2v" else ")")
            )
    need = ["dit", "vae", "text_encoder"] + (["dit_low"] if kind == "i2v" else [])
    lacking = [r for r in need if r not in roles]
    if lacking:
        raise ModelImportError(f"the --file list has nothing for {lacking}")
    return roles


def pull_model(
    out_dir: str | os.PathLike,
    *,
    kind: str,
    files: list[str],
    repo: str | None = None,
    tokenizer_dir=None,
    tokenizer_repo: str | None = None,
    revision: str | None = None,
    download_dir=None,
    downloader: Downloader | None = None,
    keep_downloads: bool = True,
    progress: Callable[[str], None] | None = None,
    **import_kwargs,
) -> modelcache.Manifest:
    """Download named files, import them into `out_dir`, then verify every file's sha256 against the manifest."""
    say = progress or (lambda msg: log.info("%s", msg))
    download = downloader or hf_downloader
    if (tokenizer_dir is None) == (tokenizer_repo is None):
        raise ModelImportError("give exactly one of a local tokenizer directory or --tokenizer-repo")
    specs = [parse_file_spec(f, repo) for f in files]
    roles = classify_files(kind, [f for _, f in specs])
    root = Path(out_dir)
    ddir = Path(download_dir) if download_dir else root.parent / (root.name + ".download")
    ddir.mkdir(parents=True, exist_ok=True)
    local: dict[str, Path] = {}
    by_name = {f: r for r, f in specs}
    for role, fname in roles.items():
        say(f"downloading {by_name[fname]}:{fname}")
        local[role] = Path(download(by_name[fname], fname, revision, ddir))
    if tokenizer_repo is not None:
        tok_dir = ddir / "tokenizer"
        tok_dir.mkdir(exist_ok=True)
        for fname in _TOKENIZER_FILES:
            try:
                got = Path(download(tokenizer_repo, fname, None, tok_dir))
            except Exception as e:  # optional files (spiece.model vs tokenizer.json) may be absent
                say(f"tokenizer file {fname} not fetched: {type(e).__name__}")
                continue
            if got.parent != tok_dir:
                shutil.copyfile(got, tok_dir / fname)
        tokenizer_dir = tok_dir
    source = {
        "pull": {
            "repo": repo,
            "files": [f"{r}:{f}" for r, f in specs],
            "revision": revision,
            "tokenizer": tokenizer_repo or str(tokenizer_dir),
        }
    }
    manifest = import_model(
        root,
        kind=kind,
        dit=local["dit"],
        dit_low=local.get("dit_low"),
        vae=local["vae"],
        text_encoder=local["text_encoder"],
        tokenizer_dir=tokenizer_dir,
        source=source,
        progress=say,
        **import_kwargs,
    )
    say("verifying sha256 of every file")
    manifest = modelcache.verify(root, checksums=True)
    if not keep_downloads:
        shutil.rmtree(ddir, ignore_errors=True)
    return manifest


__all__ = ["import_model", "pull_model", "classify_files", "parse_file_spec", "hf_downloader", "ModelImportError"]
