"""The T2V cold start measured where only the serving image's packages are importable (issue 14, deliverable 1).

The GPU machine's image holds hundreds of packages the serving image does not (JAX, flax, peft, ...), and diffusers
probes several of them while it imports, so a cold start measured in that image measures that image. This module
builds, on the GPU machine, a directory that holds only what `infra/Containerfile` installs, and runs the
cold-start child of `bench/coldstart.py` inside it:

1. roots: pyproject.toml's `[project] dependencies` plus the extras of the Containerfile's `pip install ".[pull]"`;
2. closure: each distribution's `Requires-Dist`, markers evaluated for this interpreter, looked up first among the
   carried wheels (installed with `pip install --no-deps --target`; the machine has no diffusers), then in this
   interpreter's site-packages; names found nowhere are reported, not guessed;
3. the site: symlinks to exactly the closure's files (their RECORD) — one link per directory that no other
   distribution writes into (torch/, diffusers/), real directories plus deeper links where several do (nvidia/);
4. bytecode precompiled once for every module in the site and the repository (the image does the same);
5. each child runs as `python -I -S -c LAUNCHER SITE REPO bench.coldstart --child CACHE MODE`: isolated, no site
   module, `sys.path` = [SITE, REPO] + the standard library.

Then (`--phases all`, the default): one `-X importtime` child (summarised), the cold start twice with a warm page cache
and twice with a dropped one (`vm.drop_caches`, else `POSIX_FADV_DONTNEED` on the weights and every file of the site;
`--tiny`: the weights only, never the whole machine's page cache),
then the artifact phases (`artifact_phases`: the serving import path with compile off, a JIT compile + FP8 start that
saves the compile artifact, fresh pods that load it). `--phases aot`: the serving import path with compile off, then
the AOT block packages built ahead (`aot_phases`: `turboflow model compile-artifacts --compile aot` in the site, timed
as a build, not as a pod) and fresh pods that load them (TURBOFLOW_COMPILE=aot, FP8, no compile at start);
`--phases all+aot`: both. On the GPU machine:

    python -m bench.serving_env --wheels .whl-bench --cache-dir /tmp/cache --out $OUT/coldstart-serving.json
    python -m bench.serving_env --wheels .whl-bench --cache-dir /tmp/cache --phases aot --out $OUT/coldstart-aot.json
"""

from __future__ import annotations

import argparse
import compileall
import importlib.metadata
import json
import os
import re
import shutil
import site as site_module
import subprocess
import sys
import sysconfig
import time
import tomllib
from collections.abc import Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from packaging.requirements import Requirement

from .coldstart import _files, build_cache, child_env, run_child, warm_page_cache

REPO = Path(__file__).resolve().parent.parent
# the repository's import roots (bench/__init__.py maps turboflow.engine -> engine/, ...): precompiled like the site
REPO_PACKAGES = ("turboflow", "engine", "storage", "eventing", "functions", "billing", "bench")
# argv after -c: SITE REPO MODULE ARGS...; the module then sees argv[1:] = ARGS, as under `python -m MODULE ARGS`
LAUNCHER = (
    "import runpy, sys; site, repo, module = sys.argv[1:4]; del sys.argv[1:4]; sys.path[:0] = [site, repo]; "
    "runpy.run_module(module, run_name='__main__', alter_sys=True)"
)


def canonical(name: str) -> str:
    """PEP 503 normalised name: `Foo_Bar.baz` -> `foo-bar-baz`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def containerfile_extras(containerfile: str) -> list[str]:
    """The extras of the image's project install (`pip install ... ".[pull]"` -> ["pull"])."""
    return [e.strip() for group in re.findall(r"\"\.\[([^\]]+)\]\"", containerfile) for e in group.split(",")]


def serving_roots(repo: Path = REPO) -> tuple[list[str], list[str]]:
    """(requirement strings, extras): what the serving image installs besides the project itself."""
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    extras = containerfile_extras((repo / "infra" / "Containerfile").read_text())
    roots = list(project["dependencies"])
    for extra in extras:
        roots += project["optional-dependencies"][extra]
    return roots, extras


def distributions(paths: Iterable[Path]) -> dict[str, importlib.metadata.Distribution]:
    """Canonical name -> distribution, the first path that holds a name winning (carried wheels before the image)."""
    found: dict[str, importlib.metadata.Distribution] = {}
    for path in paths:
        for dist in importlib.metadata.distributions(path=[str(path)]):
            found.setdefault(canonical(dist.metadata["Name"]), dist)
    return found


def closure(
    roots: Iterable[str], available: Mapping[str, importlib.metadata.Distribution]
) -> tuple[dict[str, importlib.metadata.Distribution], list[str], list[str]]:
    """(selected distributions, missing names, version conflicts) of the requirements `roots`.

    A requirement of distribution D counts when it has no marker, or its marker holds for this interpreter with
    extra "" or one of the extras D was asked for (`moto[server]` -> "server"); roots are evaluated with extra "".
    A version outside the specifier is kept (it is what this machine has) and reported as a conflict.
    """
    selected: dict[str, importlib.metadata.Distribution] = {}
    missing: set[str] = set()
    conflicts: list[str] = []
    seen: set[tuple[str, str]] = set()
    todo = [(Requirement(r), ("",)) for r in roots]
    while todo:
        req, extras = todo.pop()
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in extras):
            continue
        name = canonical(req.name)
        dist = available.get(name)
        if dist is None:
            missing.add(name)
            continue
        if req.specifier and not req.specifier.contains(dist.version, prereleases=True):
            conflicts.append(f"{req} (found {dist.version})")
        for extra in ("", *sorted(req.extras)):
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            selected[name] = dist
            todo += [(Requirement(r), ("", extra) if extra else ("",)) for r in dist.requires or ()]
    return selected, sorted(missing), sorted(set(conflicts))


def _ancestors(relpath: str) -> list[str]:
    parts = relpath.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def plan_links(files: Mapping[str, Mapping[str, bool]]) -> list[tuple[str, str]]:
    """The fewest (source, relpath) symlinks that expose exactly the selected files.

    `files[source][relpath]` is True for a file of a selected distribution in that source directory, False for a
    file of any other distribution there. A directory can be linked whole unless it holds an unselected file of its
    own source, or selected files of two sources (a namespace such as nvidia/); then it becomes a real directory
    and the walk goes one level deeper.
    """
    owners: dict[str, set[str]] = {}
    blocked: dict[str, set[str]] = {source: set() for source in files}
    for source, entries in files.items():
        for rel, is_selected in entries.items():
            for d in _ancestors(rel):
                if is_selected:
                    owners.setdefault(d, set()).add(source)
                else:
                    blocked[source].add(d)
    shared = {d for d, sources in owners.items() if len(sources) > 1}
    links: dict[tuple[str, str], None] = {}
    for source, entries in files.items():
        for rel, is_selected in sorted(entries.items()):
            if not is_selected:
                continue
            for d in [*_ancestors(rel), rel]:
                if d == rel or (d not in blocked[source] and d not in shared):
                    links[(source, d)] = None
                    break
    return list(links)


def _record(dist: importlib.metadata.Distribution) -> tuple[str, list[str]]:
    """(site directory, files relative to it) of one installed distribution; scripts outside the site skipped."""
    root = str(Path(dist.locate_file("")).resolve())
    rels = []
    for f in dist.files or ():
        rel = f.as_posix()
        if not rel.startswith(("/", "..")):
            rels.append(rel)
    return root, rels


def build_site(target: Path, sources: list[Path], roots: list[str]) -> dict:
    """Fill `target` with links to the closure of `roots` found in `sources` (earlier sources win); report it."""
    available = distributions(sources)
    selected, missing, conflicts = closure(roots, available)
    chosen = {(_record(d)[0], n) for n, d in selected.items()}  # (site directory, name): objects are not reused
    files: dict[str, dict[str, bool]] = {}
    for source in sources:
        for dist in importlib.metadata.distributions(path=[str(source)]):
            root, rels = _record(dist)
            entries = files.setdefault(root, {})
            is_selected = (root, canonical(dist.metadata["Name"])) in chosen
            for rel in rels:
                entries[rel] = entries.get(rel, False) or is_selected
    no_record = sorted(n for n, d in selected.items() if not d.files)
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    links = 0
    for source, rel in plan_links(files):
        src = Path(source) / rel
        if not src.exists():  # RECORD lists a file (often a .pyc) that is gone
            continue
        dst = target / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(src)
        links += 1
    origin = {str(Path(s).resolve()): s for s in sources}
    return {
        "site": str(target),
        "roots": roots,
        "distributions": {
            n: {"version": d.version, "from": str(origin.get(_record(d)[0], _record(d)[0]))}
            for n, d in sorted(selected.items())
        },
        "missing": missing,
        "version_conflicts": conflicts,
        "without_record": no_record,
        "links": links,
    }


def _modules(roots: Iterable[Path]) -> list[str]:
    out = []
    for root in roots:
        for d, _, names in os.walk(root, followlinks=True):  # compileall itself skips symlinked directories
            out += [os.path.join(d, n) for n in names if n.endswith(".py")]
    return out


def _compile(path: str) -> bool:
    try:
        return bool(compileall.compile_file(path, quiet=2))
    except Exception:  # noqa: BLE001  (a read-only or odd file must not stop the measurement; it is counted)
        return False


def precompile(roots: Iterable[Path]) -> dict:
    """Write the .pyc of every module under `roots` that lacks an up-to-date one, in parallel (the image's step)."""
    start = time.perf_counter()
    modules = _modules(roots)
    with ProcessPoolExecutor() as pool:
        ok = sum(pool.map(_compile, modules, chunksize=256))
    return {"modules": len(modules), "compiled_ok": ok, "seconds": time.perf_counter() - start}


def child_argv(site: Path, module: str, *args: str, importtime: bool = False) -> list[str]:
    """This interpreter, isolated (-I: no PYTHON* variables, no user site, no script directory) and without the
    site module (-S: no site-packages, no .pth files), running `module` with sys.path = [site, repo] + stdlib."""
    # faulthandler: a child that dies of a signal (a segfault in a native loader) still says where
    flags = ["-X", "faulthandler", *(["-X", "importtime"] if importtime else [])]
    return [sys.executable, "-I", "-S", *flags, "-c", LAUNCHER, str(site), str(REPO), module, *args]


def summarise_importtime(text: str, top: int = 15) -> dict:
    """The largest import costs in `python -X importtime` output (`import time: self | cumulative | name`, nesting
    by indentation): the top modules by cumulative time and each top-level package's summed self time, in ms."""
    rows = []
    for line in text.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)", line)
        if m:
            rows.append((int(m[1]) / 1e3, int(m[2]) / 1e3, len(m[3]) // 2, m[4]))
    by_package: dict[str, float] = {}
    for self_ms, _, _, name in rows:
        by_package[name.split(".")[0]] = by_package.get(name.split(".")[0], 0.0) + self_ms
    cumulative = sorted(((cum, name) for _, cum, _, name in rows), reverse=True)[:top]
    first_level = sorted(((cum, name) for _, cum, depth, name in rows if depth == 0), reverse=True)[:top]
    return {
        "total_self_ms": round(sum(r[0] for r in rows), 1),
        "top_level_cumulative_ms": [[name, round(cum, 1)] for cum, name in first_level],
        "top_cumulative_ms": [[name, round(cum, 1)] for cum, name in cumulative],
        "self_ms_by_package": [[p, round(ms, 1)] for p, ms in sorted(by_package.items(), key=lambda kv: -kv[1])[:top]],
    }


def site_files(site: Path) -> list[Path]:
    """Every real file the site exposes (what a cold node reads from disk on its first import)."""
    return [Path(d) / n for d, _, names in os.walk(site, followlinks=True) for n in names]


def drop_page_cache_everywhere(cache: Path, site: Path, *, whole_node: bool = True) -> str:
    """Empty the page cache like a fresh node: the whole kernel cache as root, else the weights and the site.
    whole_node=False (the --tiny smoke test) evicts the weights only: the site's files are the test machine's own
    torch and friends, and emptying that machine's page cache would slow everything else it runs."""
    if not whole_node:
        from .coldstart import drop_page_cache

        drop_page_cache(_files(cache))
        return "POSIX_FADV_DONTNEED on the weights (smoke test: the site stays cached)"
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "vm.drop_caches=3 (whole page cache)"
    except OSError:
        from .coldstart import drop_page_cache

        drop_page_cache([*_files(cache), *site_files(site)])
        return "POSIX_FADV_DONTNEED on the weights and every file of the site"


def _gpu() -> dict:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        name, driver = (s.strip() for s in out.splitlines()[0].split(","))
        return {"gpu": name, "driver": driver}
    except (OSError, IndexError, ValueError, subprocess.SubprocessError):
        return {"gpu": None, "driver": None}


PHASES = ("all", "aot", "all+aot")


def measure(
    cache: Path,
    site: Path,
    wheels: Path | None,
    tiny: bool,
    runs: int,
    compile_bytecode: bool,
    log,
    phases: str = "all",
    sla_backend: str = "auto",
) -> tuple[dict, str]:
    """Build the serving site and the model cache, then time the cold starts inside the site; (result, importtime
    text)."""
    result: dict = {"date": time.strftime("%Y-%m-%d"), "host": _gpu()}
    sources = []
    if wheels is not None:
        staged = site.parent / (site.name + "-wheels")
        shutil.rmtree(staged, ignore_errors=True)
        whls = sorted(str(w) for w in wheels.glob("*.whl"))
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        subprocess.run([*cmd, "--target", str(staged), *whls], check=True)
        sources.append(staged)
    # this interpreter's packages: a venv's, and the system's where the venv includes them
    for d in [*site_module.getsitepackages(), sysconfig.get_paths()["purelib"]]:
        if Path(d).is_dir() and Path(d).resolve() not in {s.resolve() for s in sources}:
            sources.append(Path(d))
    roots, extras = serving_roots()
    t = time.perf_counter()
    env = build_site(site, sources, roots)
    env.update(extras=extras, sources=[str(s) for s in sources], build_seconds=time.perf_counter() - t)
    log(
        f"serving site {site}: {len(env['distributions'])} distributions, {env['links']} links, "
        f"missing {env['missing']}, conflicts {env['version_conflicts']}"
    )
    if compile_bytecode:
        env["bytecode"] = precompile([site, *(REPO / p for p in REPO_PACKAGES)])
        log(f"  bytecode: {env['bytecode']}")
    result["environment"] = env
    if wheels is not None:  # bench.models needs diffusers to write the cache; the parent takes it from the wheels
        sys.path.insert(0, str(sources[0]))
    result["cache"] = build_cache(cache, tiny, log)
    result["cache"]["gb"] = sum(f.stat().st_size for f in _files(cache)) / 1e9
    child = child_env(tiny)
    warm_page_cache(_files(cache))
    warm_page_cache(site_files(site))
    result["runs"] = []
    if phases == "aot":  # the short plan: compile off beside the AOT packages, nothing else
        result["runs"] += aot_phases(cache, site, tiny, runs, child, log, compile_off=True, sla_backend=sla_backend)
        return result, ""
    probe = subprocess.run(
        child_argv(site, "bench.coldstart", "--child", str(cache), "imports", importtime=True),
        capture_output=True,
        text=True,
        timeout=600,
        env=child,
        cwd=REPO,
    )
    importtime = probe.stderr
    result["importtime"] = summarise_importtime(importtime)
    lines = [ln for ln in probe.stdout.splitlines() if ln.startswith("{")]
    result["importtime_child"] = json.loads(lines[-1]) if lines else {"error": probe.stderr[-2000:]}
    log(f"  importtime: {result['importtime']['top_cumulative_ms'][:6]}")
    for cold in (False, True):
        for i in range(1, runs + 1):
            label = f"{'cold' if cold else 'warm'} page cache #{i}"
            if cold:
                how = drop_page_cache_everywhere(cache, site, whole_node=not tiny)
            else:
                warm_page_cache(_files(cache))
                how = "weights read once before"
            argv = child_argv(site, "bench.coldstart", "--child", str(cache), "fast")
            r = run_child(argv, label, child, log)
            r.update(page_cache=how, mode="fast (diffusers imported before start)")
            result["runs"].append(r)
    result["runs"] += artifact_phases(cache, site, tiny, runs, child, log)
    if phases == "all+aot":
        result["runs"] += aot_phases(cache, site, tiny, runs, child, log, compile_off=False, sla_backend=sla_backend)
    return result, importtime


def artifact_phases(cache: Path, site: Path, tiny: bool, runs: int, env: dict, log) -> list[dict]:
    """Warm page cache, the serving import path (`lean`: torch + the function; diffusers loads beside the read):
    compile off; then compile + FP8 with an empty compile cache (the JIT compile a pod without artifacts pays; it
    saves the artifact); then `runs` fresh pods, each with an empty compile cache holding only that artifact in
    artifacts/ and TURBOFLOW_COMPILE_REQUIRE_ARTIFACTS=1 (no compile at start: a missing artifact runs eager)."""
    root = site.parent / (site.name + "-compile")
    shutil.rmtree(root, ignore_errors=True)
    fast = {"TURBOFLOW_COMPILE": "1"} if tiny else {"TURBOFLOW_COMPILE": "1", "TURBOFLOW_QUANT_LINEAR": "fp8"}
    plan = [(f"lean, compile off #{i}", {}, None) for i in range(1, runs + 1)]
    plan.append(("lean, compile+fp8, JIT (empty compile cache)", {**fast}, root / "jit"))
    required = {**fast, "TURBOFLOW_COMPILE_REQUIRE_ARTIFACTS": "1"}
    plan += [(f"lean, compile+fp8, artifact loaded #{i}", dict(required), root / f"p{i}") for i in range(1, runs + 1)]
    out = []
    for label, extra, compile_cache in plan:
        if compile_cache is not None:
            compile_cache.mkdir(parents=True)
            extra["TURBOFLOW_COMPILE_CACHE"] = str(compile_cache)
            saved = root / "jit" / "artifacts"  # none on the CPU: there is no warm-up there to compile
            if compile_cache.name != "jit" and saved.is_dir():  # a new pod: only the artifacts the first one saved
                shutil.copytree(root / "jit" / "artifacts", compile_cache / "artifacts", dirs_exist_ok=True)
        warm_page_cache(_files(cache))
        r = run_child(child_argv(site, "bench.coldstart", "--child", str(cache), "lean"), label, {**env, **extra}, log)
        r.update(page_cache="weights read once before", mode="lean", env=extra)
        out.append(r)
    return out


def aot_phases(
    cache: Path, site: Path, tiny: bool, runs: int, env: dict, log, *, compile_off: bool, sla_backend: str = "auto"
) -> list[dict]:
    """Warm page cache, the serving import path (`lean`): compile off (`compile_off`); then the AOT block packages
    built ahead in the site (`turboflow model compile-artifacts --compile aot`, FP8; its seconds recorded as the
    build, not as a pod); then `runs` fresh pods, each with an empty compile cache holding only those packages in
    aoti/, TURBOFLOW_COMPILE=aot and TURBOFLOW_COMPILE_REQUIRE_ARTIFACTS=1 (a missing or mismatched package runs
    eager: the run's compile_artifact says which, its aot_blocks how many block calls the warm-up ran compiled)."""
    root = site.parent / (site.name + "-aot")
    shutil.rmtree(root, ignore_errors=True)
    aot = {"TURBOFLOW_COMPILE": "aot"} if tiny else {"TURBOFLOW_COMPILE": "aot", "TURBOFLOW_QUANT_LINEAR": "fp8"}
    aot["TURBOFLOW_SLA_BACKEND"] = sla_backend  # the build's too: it is part of the key
    label = ("aot" if tiny else "aot+fp8") + ("" if sla_backend == "auto" else f", SLA {sla_backend}")
    out = []
    if compile_off:
        for i in range(1, runs + 1):
            warm_page_cache(_files(cache))
            argv = child_argv(site, "bench.coldstart", "--child", str(cache), "lean")
            r = run_child(argv, f"lean, compile off #{i}", env, log)
            r.update(page_cache="weights read once before", mode="lean", env={})
            out.append(r)
    build = root / "build"
    args = ["model", "compile-artifacts", "--model-dir", str(cache), "--compile", "aot", "--compile-cache", str(build)]
    args += ["--sla-backend", sla_backend] + ([] if tiny else ["--quant-linear", "fp8"])
    start = time.perf_counter()
    proc = subprocess.run(
        child_argv(site, "bench.coldstart", "--cli", *args),
        capture_output=True,
        text=True,
        timeout=1800,
        env=env,
        cwd=REPO,
    )
    built = {"label": "aot packages built ahead (not a pod)", "seconds": time.perf_counter() - start}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        built["returncode"] = proc.returncode
        built["error"] = (proc.stderr or proc.stdout)[-3000:]
        log(f"  {built['label']}: FAILED in {built['seconds']:.1f}s\n{built['error']}")
    else:
        built["result"] = json.loads(lines[-1])
        log(f"  {built['label']}: {built['seconds']:.1f}s, {built['result'].get('path')}")
    out.append(built)
    for i in range(1, runs + 1):
        compile_cache = root / f"p{i}"
        compile_cache.mkdir(parents=True)
        if (build / "aoti").is_dir():  # a new pod: only the packages the build left (the model-cache job's place)
            shutil.copytree(build / "aoti", compile_cache / "aoti")
        extra = {**aot, "TURBOFLOW_COMPILE_REQUIRE_ARTIFACTS": "1", "TURBOFLOW_COMPILE_CACHE": str(compile_cache)}
        warm_page_cache(_files(cache))
        argv = child_argv(site, "bench.coldstart", "--child", str(cache), "lean")
        r = run_child(argv, f"lean, {label}, packages loaded #{i}", {**env, **extra}, log)
        r.update(page_cache="weights read once before", mode="lean", env=extra)
        out.append(r)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.serving_env", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the JSON result (the -X importtime text goes beside it)")
    ap.add_argument("--cache-dir", required=True, help="the model cache (written when it has no manifest.json)")
    ap.add_argument("--site", default="/tmp/serving-site", help="the serving-only directory to build")
    ap.add_argument("--wheels", default=None, help="carried wheels the image lacks (pip install --target)")
    ap.add_argument("--runs", type=int, default=2, help="cold starts per page-cache state")
    ap.add_argument("--tiny", action="store_true", help="tiny model cache, CPU (smoke test)")
    ap.add_argument("--no-compile", action="store_true", help="skip the bytecode step (smoke test)")
    ap.add_argument(
        "--phases",
        choices=PHASES,
        default="all",
        help="all: imports, fast warm/cold, compile artifacts; aot: compile off beside AOT block packages; all+aot",
    )
    ap.add_argument(
        "--sla-backend",
        default="auto",
        choices=("auto", "triton", "flex", "gather"),
        help="the AOT phases' SLA kernels (TURBOFLOW_SLA_BACKEND of the build and the pods; default auto)",
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result, importtime = measure(
        Path(args.cache_dir),
        Path(args.site),
        Path(args.wheels) if args.wheels else None,
        tiny=args.tiny,
        runs=args.runs,
        compile_bytecode=not args.no_compile,
        log=lambda *a: print(*a, flush=True),
        phases=args.phases,
        sla_backend=args.sla_backend,
    )
    result["command"] = "python -m bench.serving_env " + " ".join(argv if argv is not None else sys.argv[1:])
    out.write_text(json.dumps(result, indent=1, default=str))
    out.with_suffix(".importtime.txt").write_text(importtime)
    return 0 if all("error" not in r for r in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
