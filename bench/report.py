"""bench.run's report: per-stage speedups, the markdown tables (summary per model, one table per variant)."""

from __future__ import annotations

import json
from pathlib import Path

STAGES = [
    ("text_encode_s", "text encode"),
    ("vae_encode_s", "VAE encode (I2V)"),
    ("step_median_s", "DiT step (median)"),
    ("projected_dit_4_steps_s", "DiT 4 steps"),
    ("vae_decode_s", "VAE decode"),
    ("mp4_encode_s", "mp4 encode left after the decode"),
    ("mp4_encode_total_s", "mp4 encode (all, overlapped)"),
    ("s3_upload_s", "S3 upload"),
    ("total_s", "total, timed run (its steps)"),
    ("projected_total_4_steps_s", "total, 4 steps"),
    ("peak_gpu_gb", "peak GPU GB"),
]


def speedups(ours, base) -> dict:
    if not ours or not base or "error" in base:
        return {}
    out = {}
    for k, _ in STAGES:
        a, b = ours.get(k), base.get(k)
        if k != "peak_gpu_gb" and isinstance(a, (int, float)) and isinstance(b, (int, float)) and a > 0:
            out[k] = b / a
    return out


def summary(rows: list[dict]) -> list[str]:
    """One table per model: variants side by side (each adds one optimisation), plain diffusers last."""
    lines = []
    keys = list(dict.fromkeys(r["key"] for r in rows))
    for key in keys:
        mine = [r for r in rows if r["key"] == key]
        if len(mine) < 2 and not (mine and (mine[0].get("baseline") or {}).get("step_median_s")):
            continue
        base = next((r.get("baseline") for r in mine if r.get("baseline")), None) or {}
        cols = [r["variant"] for r in mine] + (["plain diffusers"] if base.get("step_median_s") else [])
        data = [r.get("ours") or {} for r in mine] + ([base] if base.get("step_median_s") else [])
        lines += [
            f"## Summary: {mine[0]['model']} ({mine[0]['frames']} frames), variants side by side",
            "",
            "| stage | " + " | ".join(cols) + " |",
            "|---|" + "---|" * len(cols),
        ]
        for k, label in STAGES:
            if k == "vae_encode_s" and mine[0]["kind"] != "i2v":
                continue
            lines.append(f"| {label} | " + " | ".join(_f(d.get(k)) for d in data) + " |")
        lines.append(
            "| DiT weights GB | "
            + " | ".join(_f(r.get("dit_weights_gb"), 3) for r in mine)
            + (" | " + _f(mine[0].get("built_dit_weights_gb"), 3) if base.get("step_median_s") else "")
            + " |"
        )
        ref = base.get("projected_dit_4_steps_s")
        if ref:
            lines.append(
                "| DiT 4 steps vs plain diffusers | "
                + " | ".join(
                    (_f(ref / d["projected_dit_4_steps_s"], 2) + "x") if d.get("projected_dit_4_steps_s") else "–"
                    for d in data
                )
                + " |"
            )
        lines.append("")
    return lines


# ---- report ---------------------------------------------------------------------------------------------------------
def _f(v, digits=3):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"# turboflow bench — {env.get('gpu') or 'CPU'} — {env['date']}",
        "",
        f"GPU {env.get('gpu')}, driver {env.get('driver')}, CUDA {env.get('cuda')}, torch {env['torch']}, "
        f"diffusers {env.get('diffusers')}, transformers {env.get('transformers')}, python {env['python']}",
        "",
        f"Command: `{env['command']}`",
        "",
    ]
    if result.get("attention_op"):
        op = result["attention_op"]
        dense = op.get("attn_dense_sdpa_s")
        shape = "2 heads x 1,000 tokens (tiny, CPU)" if result["device"] == "cpu" else "12 heads x 32,760 tokens"
        lines += [
            f"## SLA attention op vs dense SDPA ({shape} x 128, bf16)",
            "",
            "| op | ms | vs dense | peak GB |",
            "|---|---|---|---|",
        ]
        for k, v in op.items():
            if k.endswith("_s") and isinstance(v, float):
                name = k[:-2]
                lines.append(
                    f"| {name} | {v * 1e3:.2f} | {_f(dense / v, 2) + 'x' if dense else '–'} | "
                    f"{_f(op.get(name + '_peak_gb'), 2)} |"
                )
        lines += [f"| {k} | {v} | | |" for k, v in op.items() if k.endswith("error")]
        lines.append("")
    lines += summary(result.get("models", []))
    for row in result.get("models", []):
        ours, base = row.get("ours") or {}, row.get("baseline") or {}
        lines += [
            f"## {row['model']} — {row['resolution']} {row['aspect_ratio']}, {row['frames']} frames, "
            f"variant `{row['variant']}`",
            "",
            f"Timed {row['timed_steps']} step(s) after a {row['warmup_steps']}-step warm-up run; 4-step rows are "
            f"projected with the median step. Offload: {row['offload']}. {row.get('note', '')}",
            "",
            "| stage | turboflow (s) | plain diffusers (s) | diffusers / turboflow |",
            "|---|---|---|---|",
        ]
        for k, label in STAGES:
            if k == "vae_encode_s" and row["kind"] != "i2v":
                continue
            sp = row.get("speedup", {}).get(k)
            lines.append(f"| {label} | {_f(ours.get(k))} | {_f(base.get(k))} | {_f(sp, 2) + 'x' if sp else '–'} |")
        if ours.get("steps_s"):
            lines.append(
                f"| steps measured | {', '.join(_f(s) for s in ours['steps_s'])} | "
                f"{', '.join(_f(s) for s in base.get('steps_s') or [])} | |"
            )
        if row.get("published_5090_s"):
            lines.append(
                f"| TurboDiffusion RTX 5090, published (excl. text enc. + VAE decode) | {row['published_5090_s']} | | |"
            )
        for err in ("ours_error",):
            if row.get(err):
                lines.append(f"\n**{err}**: {row[err]}")
        if base.get("error"):
            lines.append(f"\n**baseline error**: {base['error']}")
        lines.append("")
    if result.get("loader"):
        lines += [
            "## Weight loading (GB/s to the device)",
            "",
            "| method | source | GB | seconds | GB/s |",
            "|---|---|---|---|---|",
        ]
        for r in result["loader"]:
            lines.append(
                f"| {r['method']} | {r['source']} | {_f(r['gb'], 2)} | {_f(r['seconds'])} | {_f(r['gbps'], 2)} |"
            )
        lines.append("")
    if result.get("coldstart"):
        lines += [
            "## Cold start to ready (T2V function, 1.3B + umT5-xxl)",
            "",
            "| run | interpreter | import torch | import turboflow | import diffusers | import transformers | "
            "imports total | build modules (overlaps read) | read + H2D | assign | warm-up | ready after start |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["coldstart"].get("runs", []):
            lines.append(
                f"| {r['label']} | {_f(r.get('interpreter_s'))} | {_f(r.get('import_torch_s'))} | "
                f"{_f(r.get('import_turboflow_s'))} | {_f(r.get('import_diffusers_s'))} | "
                f"{_f(r.get('import_transformers_s'))} | {_f(r.get('imports_s'))} | {_f(r.get('build_s'))} | "
                f"{_f(r.get('read_s'))} "
                f"({_f(r.get('gbps'), 1)} GB/s) | {_f(r.get('assign_s'))} | {_f(r.get('warmup_s'))} | "
                f"{_f(r.get('ready_s'))} |"
            )
        lines.append("")
    for n in result.get("notes", []):
        lines.append(f"- {n}")
    return "\n".join(lines) + "\n"


def write(result: dict, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "bench.md").write_text(markdown(result))
