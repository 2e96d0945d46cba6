"""Context parallelism for the Wan DiT: one video's tokens split across processes (Ulysses sequence parallelism).

Each of N ranks holds 1/N of the video tokens through every block. Only self-attention needs all tokens, so
around it one all-to-all trades the token split for a head split, attention runs on all L tokens of H/N heads,
and a second all-to-all trades back:

    [B, L/N, H, D] --all_to_all--> [B, L, H/N, D] --attention--> [B, L, H/N, D] --all_to_all--> [B, L/N, H, D]

Cross-attention (text keys, replicated on every rank), the FFN, the norms and the modulation are token-local and
run on the shard as they are. RoPE uses each token's global position: the rotary table is computed for the whole
video and sliced like the tokens. Attention sees every token of its heads, which is exactly what SLA's block
selection needs, so dense attention ("original"), SLA (engine/sla.py) and SageSLA (engine/sagesla.py: its
quantization scales are per head too) all give the single-process result.

Token counts not divisible by N are padded at the end to L' = N * ceil(L / N); the padding is cut off after the
first all-to-all (attention never sees it) and from the gathered DiT output, so it changes nothing.

diffusers 0.42.1 ships the same scheme (`enable_parallelism(ContextParallelConfig(ulysses_degree=N))`), but its
all-to-all lives inside `dispatch_attention_fn`, which the project's SLA processor does not call: the hooks here
place the split, the gather and the all-to-alls themselves, around whichever processor `set_attention` installed.

`enable_context_parallel(transformer, group)` turns one model instance into its rank's shard of the computation;
every rank runs the same sampler with the same seed, so all ranks hold the same latents after each step (the DiT
output is gathered on every rank). `ParallelPipeline` (rank 0) drives N-1 worker processes that do the same.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import multiprocessing.connection
import os
import socket
import time
import traceback

import torch
import torch.nn.functional as F

from turboflow.errors import ConfigError, TurboflowError, WorkerLostError

log = logging.getLogger(__name__)

__all__ = [
    "ContextParallel",
    "ParallelPipeline",
    "WorkerLostError",
    "check_shardable",
    "enable_context_parallel",
]


def padded_length(length: int, world_size: int) -> int:
    """Tokens per video once padded for `world_size` ranks: L' = world_size * ceil(L / world_size)."""
    return -(-length // world_size) * world_size


def check_shardable(transformer, world_size: int) -> None:
    """ConfigError unless `transformer` (a WanTransformer3DModel) can be split across `world_size` ranks: Ulysses
    gives each rank heads / world_size whole heads, so the head count must divide evenly."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world size must be a positive integer, got {world_size!r}", field="world_size")
    heads = transformer.config.num_attention_heads
    if heads % world_size:
        raise ConfigError(
            f"the DiT has {heads} attention heads, which {world_size} ranks cannot share evenly "
            f"(Ulysses context parallelism needs heads % ranks == 0)",
            field="world_size",
        )


# ---- collectives ------------------------------------------------------------------------------------------------
def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """all_to_all over dim 0 (chunk j goes to rank j; chunk i of the result came from rank i). The functional
    collective, so a torch.compile'd block traces it instead of breaking its graph."""
    import torch.distributed._functional_collectives as funcol

    return funcol.wait_tensor(funcol.all_to_all_single(x.contiguous(), None, None, group))


def tokens_to_heads(x: torch.Tensor, world_size: int, group) -> torch.Tensor:
    """[P, L'/N, H, D] (this rank's tokens, all heads) -> [P, L', H/N, D] (all tokens, this rank's heads)."""
    p, local, heads, d = x.shape
    x = x.reshape(p, local, world_size, heads // world_size, d).permute(2, 0, 1, 3, 4)  # [N dest, P, L/N, H/N, D]
    y = _all_to_all(x, group)  # [N src (= token shard), P, L/N, H/N, D]
    return y.permute(1, 0, 2, 3, 4).reshape(p, world_size * local, heads // world_size, d)


def heads_to_tokens(y: torch.Tensor, world_size: int, group) -> torch.Tensor:
    """The inverse: [P, L', H/N, D] -> [P, L'/N, H, D]."""
    p, length, group_heads, d = y.shape
    local = length // world_size
    y = y.reshape(p, world_size, local, group_heads, d).permute(1, 0, 2, 3, 4)  # [N dest (= token shard), ...]
    x = _all_to_all(y, group)  # [N src (= head group), P, L/N, H/N, D]
    return x.permute(1, 2, 0, 3, 4).reshape(p, local, world_size * group_heads, d)


@dataclasses.dataclass
class _Shard:
    """Where this rank sits, and the current forward's token count (set by the rope hook, which runs first)."""

    group: object
    rank: int
    world_size: int
    length: int = 0

    @property
    def padded(self) -> int:
        return padded_length(self.length, self.world_size)

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's slice of `x` along its token dim `dim` (padded with zeros to L' first)."""
        pad = self.padded - x.shape[dim]
        if pad:
            widths = [0, 0] * (x.ndim - 1 - dim) + [0, pad]
            x = F.pad(x, widths)
        local = self.padded // self.world_size
        return x.narrow(dim, self.rank * local, local)


# ---- the attention processor wrapper ----------------------------------------------------------------------------
class UlyssesProcessor:
    """Wraps the self-attention processor `set_attention` installed (diffusers' WanAttnProcessor or SLAProcessor):
    projections, QK-norm and RoPE on this rank's tokens, the all-to-all, the wrapped processor's attention kernel
    on all tokens of this rank's heads, the all-to-all back, the output projection."""

    def __init__(self, inner, shard: _Shard):
        from .sla import SLAProcessor

        self.inner, self.shard = inner, shard
        self._sla = isinstance(inner, SLAProcessor)
        if not self._sla and type(inner).__name__ != "WanAttnProcessor":
            raise ConfigError(
                f"context parallelism supports WanAttnProcessor and SLAProcessor, not {type(inner).__name__}",
                field="attention",
            )

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """[B, L, h, D] each -> [B, L, h, D], the wrapped processor's kernel."""
        if self._sla:  # SLA or SageSLA, as the processor's kind says
            return self.inner.attend(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        return dispatch_attention_fn(
            q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, backend=self.inner._attention_backend
        )

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        from .sla import _rotate

        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("UlyssesProcessor is for unmasked self-attention only")
        shard = self.shard
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)  # RMS norm across heads: per token, so local
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))  # [B, L/N, H, D]
        if rotary_emb is not None:  # the rope hook sliced the table to this rank's tokens
            query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
        batch = query.shape[0]
        # one all-to-all for q, k and v together: [3B, L/N, H, D] -> [3B, L', H/N, D], padding cut off
        qkv = tokens_to_heads(torch.cat([query, key, value]), shard.world_size, shard.group)[:, : shard.length]
        out = self._attend(*qkv.split(batch))  # [B, L, H/N, D]
        if shard.padded != shard.length:
            out = F.pad(out, (0, 0, 0, 0, 0, shard.padded - shard.length))
        out = heads_to_tokens(out, shard.world_size, shard.group)  # [B, L/N, H, D]
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


# ---- the model hooks --------------------------------------------------------------------------------------------
class ContextParallel:
    """The hooks that make one WanTransformer3DModel compute this rank's shard (`enable_context_parallel`).

    transformer pre-hook: wraps any self-attention processor not yet wrapped (`set_attention` swaps them between
    requests); rope hook: records L and slices the rotary table; blocks[0] pre-hook: pads and slices the tokens;
    proj_out hook: all-gathers the output tokens and cuts the padding, so the unpatchify sees the whole video."""

    def __init__(self, transformer, group=None):
        import torch.distributed as dist

        if not dist.is_initialized():
            raise ConfigError("context parallelism needs an initialised torch.distributed process group")
        world_size = dist.get_world_size(group)
        check_shardable(transformer, world_size)
        self.transformer = transformer
        self.shard = _Shard(group=group or dist.group.WORLD, rank=dist.get_rank(group), world_size=world_size)
        self._original = [block.attn1.processor for block in transformer.blocks]
        self._handles = [
            transformer.register_forward_pre_hook(self._wrap_processors),
            transformer.rope.register_forward_hook(self._split_rope),
            transformer.blocks[0].register_forward_pre_hook(self._split_tokens),
            transformer.proj_out.register_forward_hook(self._gather_tokens),
        ]
        self._wrap_processors(transformer, ())

    def _wrap_processors(self, module, args):
        for block in self.transformer.blocks:
            processor = block.attn1.processor
            if not isinstance(processor, UlyssesProcessor):
                block.attn1.processor = UlyssesProcessor(processor, self.shard)

    def _split_rope(self, module, args, output):
        cos, sin = output  # [1, L, 1, D] each
        self.shard.length = cos.shape[1]
        return self.shard.split(cos, 1), self.shard.split(sin, 1)

    def _split_tokens(self, module, args):
        hidden_states, *rest = args  # [B, L, C]
        if hidden_states.shape[1] != self.shard.length:
            raise RuntimeError(f"{hidden_states.shape[1]} tokens enter the blocks, rope made {self.shard.length}")
        return (self.shard.split(hidden_states, 1), *rest)

    def _gather_tokens(self, module, args, output):
        import torch.distributed as dist

        parts = [torch.empty_like(output) for _ in range(self.shard.world_size)]
        dist.all_gather(parts, output.contiguous(), group=self.shard.group)
        return torch.cat(parts, dim=1)[:, : self.shard.length]

    def remove(self) -> None:
        """Back to the single-process model: hooks removed, the unwrapped processors restored."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for block in self.transformer.blocks:
            processor = block.attn1.processor
            if isinstance(processor, UlyssesProcessor):
                block.attn1.processor = processor.inner


def enable_context_parallel(transformer, group=None) -> ContextParallel:
    """Make `transformer` compute this rank's token shard of every forward, with the full output gathered on every
    rank (`group`: default the world). Call it on every rank, with identical weights and identical inputs on each;
    `.remove()` undoes it. ConfigError if the head count does not divide among the ranks."""
    return ContextParallel(transformer, group)


# ---- one pipeline over several processes --------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _shard_pipeline(pipeline) -> list[ContextParallel]:
    return [enable_context_parallel(net) for net in (pipeline.transformer, pipeline.transformer_2) if net is not None]


def _collective_failure(e: BaseException) -> bool:
    """Whether a RuntimeError came from the communication backend (a peer closed its connection, a timeout)."""
    text = str(e).lower()
    return any(word in text for word in ("gloo", "nccl", "connection closed", "connection reset", "timed out"))


# Stages whose reports every rank makes at the same point of the same code path, before or between the DiT's
# collectives: at each one rank 0 tells the workers whether to go on (its callback may have cancelled the request).
# vae_decode is rank 0's alone (the workers skip the decode) and comes after the last collective.
_AGREED_STAGES = frozenset({"text_encode", "vae_encode", "diffusion"})


class _StoppedByRank0(TurboflowError):
    """A worker's side of a request that rank 0 stopped at a step boundary (cancelled, or its callback failed)."""

    code = "cancelled"


def _broadcast_stop(stop: bool, device: torch.device) -> torch.Tensor:
    """Rank 0's decision at a step boundary, broadcast to every rank (one int: 1 means stop here). One tiny
    collective, bounded by the group's timeout like the others; only the workers read it back (a device sync),
    rank 0 knows its own decision and keeps queueing work."""
    import torch.distributed as dist

    flag = torch.tensor([1 if stop else 0], dtype=torch.int32, device=device)
    dist.broadcast(flag, src=0)
    return flag


def _following_rank0(device: torch.device):
    """A worker's stage_progress: at every agreed boundary, stop where rank 0 stopped."""

    def report(stage: str, done: int, total: int) -> None:
        if stage in _AGREED_STAGES and _broadcast_stop(False, device).item():
            raise _StoppedByRank0(f"rank 0 stopped the request at {stage} {done}/{total}")

    return report


def _leading(stage_progress, device: torch.device):
    """Rank 0's stage_progress: the caller's callback (which may raise RequestCancelled at a step boundary), then
    the decision broadcast to the workers, so that every rank leaves the sampler at the same boundary instead of
    the workers waiting in the next step's all-to-all until the collective timeout."""

    def report(stage: str, done: int, total: int) -> None:
        if stage not in _AGREED_STAGES:
            if stage_progress is not None:
                stage_progress(stage, done, total)
            return
        try:
            if stage_progress is not None:
                stage_progress(stage, done, total)
        except BaseException:
            _broadcast_stop(True, device)
            raise
        _broadcast_stop(False, device)

    return report


def _no_decode(latents, frame_sink=None):
    """A worker's decode: rank 0 alone runs the VAE on the (identical) final latents."""
    return torch.zeros(0, dtype=torch.uint8).numpy()


def _worker_main(rank, world_size, init_method, backend, device, model_dir, load_kwargs, timeout_s, conn):
    """One worker process (rank >= 1): join the group, load the model onto its device, then serve `generate`
    commands from rank 0 until `stop` or a closed pipe. Every reply is ('ready'|'done', None) or ('error', text)."""
    import torch.distributed as dist

    try:
        conn.send(("up", None))  # imported: rank 0 now opens the group (joining then takes seconds, not minutes)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        from .loading import load_pipeline

        pipeline = load_pipeline(model_dir, device=device, **load_kwargs)
        _shard_pipeline(pipeline)
        pipeline.decode = _no_decode
        conn.send(("ready", None))
        while True:
            try:
                command, request = conn.recv()
            except EOFError:  # rank 0 is gone
                break
            if command == "stop":
                break
            try:
                pipeline(request, stage_progress=_following_rank0(pipeline.device))
                conn.send(("done", None))
            except (TurboflowError, TypeError) as e:
                # refused before any collective, identically on rank 0 (the request is the same): keep serving
                conn.send(("failed", f"{type(e).__name__}: {e}"))
            except Exception as e:  # noqa: BLE001  (reported to rank 0, which raises the typed error)
                conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
                break  # the group may be mid-collective: this worker cannot be trusted any more
    except Exception as e:  # noqa: BLE001
        try:
            conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        except OSError:
            pass
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        conn.close()


class ParallelPipeline:
    """A TurboVideoPipeline spread over `world_size` processes, one per device: rank 0 is this process (it calls the
    pipeline like the normal one and alone decodes the video), ranks 1.. are worker processes started here.

    Starting (spawn, imports, loading, compile warm-up) may take `start_timeout_s`. Every rank loads the same model
    cache; per request rank 0 sends the validated request (its seed fixed) to each
    worker, every rank runs the same sampler on its token shard of the DiT, and the workers answer `done`. Any
    collective waits at most `timeout_s`; a worker that dies, fails or stops answering raises WorkerLostError and
    leaves `healthy` False for good (readiness: the pod restarts; the broker retries the request elsewhere).

    devices: one per rank (default cuda:0..N-1 when CUDA is present, else cpu for every rank, on gloo).
    load_kwargs: what `load_pipeline` takes (options=LoadOptions(...), dtype, ...), the same on every rank.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        world_size: int = 2,
        devices: list[str | torch.device] | None = None,
        timeout_s: float = 300.0,
        start_timeout_s: float = 900.0,
        **load_kwargs,
    ):
        import torch.distributed as dist
        import torch.multiprocessing as mp

        from .loading import load_pipeline, resolve_device, warm_compiled
        from .options import LoadOptions

        if not isinstance(world_size, int) or world_size < 2:
            raise ConfigError(f"a parallel pipeline needs at least 2 ranks, got {world_size!r}", field="world_size")
        if devices is None:
            devices = [f"cuda:{r}" for r in range(world_size)] if torch.cuda.is_available() else ["cpu"] * world_size
        if len(devices) != world_size:
            raise ConfigError(f"{world_size} ranks need {world_size} devices, got {devices}", field="devices")
        self.devices = [resolve_device(d) for d in devices]
        if len({d.type for d in self.devices}) != 1:
            raise ConfigError(f"all ranks need one device type, got {devices}", field="devices")
        if dist.is_initialized():
            raise ConfigError("this process already belongs to a torch.distributed group", field="world_size")
        # compile warm-up only once sharded (the sharded blocks are other graphs than the whole model's): every
        # rank loads without it, then rank 0 drives the warm-up requests through all ranks below
        fields = {f.name for f in dataclasses.fields(LoadOptions)}
        options = (load_kwargs.pop("options", None) or LoadOptions()).replace(
            **{k: load_kwargs.pop(k) for k in list(load_kwargs) if k in fields}
        )
        load_kwargs["options"] = options.replace(compile_warmup=())
        self.world_size, self.timeout_s = world_size, timeout_s
        self._broken: str | None = None
        backend = _backend_for(self.devices[0])
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        context = mp.get_context("spawn")  # CUDA cannot be forked; spawn is also what a fresh pod would do
        self._workers: list[tuple[multiprocessing.Process, multiprocessing.connection.Connection]] = []
        try:
            for rank in range(1, world_size):
                ours, theirs = context.Pipe()
                proc = context.Process(
                    target=_worker_main,
                    args=(
                        rank,
                        world_size,
                        init_method,
                        backend,
                        self.devices[rank],
                        str(model_dir),
                        load_kwargs,
                        timeout_s,
                        theirs,
                    ),
                    name=f"turboflow-rank{rank}",
                    daemon=True,
                )
                proc.start()
                theirs.close()
                self._workers.append((proc, ours))
            self._collect("up", timeout_s=start_timeout_s)
            if self.devices[0].type == "cuda":
                torch.cuda.set_device(self.devices[0])
            try:
                dist.init_process_group(
                    backend,
                    init_method=init_method,
                    rank=0,
                    world_size=world_size,
                    timeout=datetime.timedelta(seconds=timeout_s),
                )
            except Exception as e:  # the store timed out: a worker never joined
                raise self._lost(f"the workers did not join the process group: {e}") from e
            self.pipeline = load_pipeline(model_dir, device=self.devices[0], **load_kwargs)
            self._shards = _shard_pipeline(self.pipeline)
            self._collect("ready", timeout_s=start_timeout_s)
            if options.compile and options.warmup and self.devices[0].type == "cuda":
                sizes = options.compile_warmup
                if sizes is None:
                    sizes = [(self.pipeline.defaults.get("resolution", "480p"), "16:9", 81)]
                warm_compiled(self, list(sizes))
        except BaseException:
            self.close()
            raise

    # ---- health ---------------------------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        """False once a worker has died or failed: the pipeline then refuses every request (readiness)."""
        if self._broken is None:
            dead = [p.name for p, _ in self._workers if not p.is_alive()]
            if dead:
                self._broken = f"worker(s) {', '.join(dead)} exited"
        return self._broken is None

    @property
    def worker_pids(self) -> list[int]:
        """The worker processes' ids, rank 1 first (for logs and for checking that none outlives the pipeline)."""
        return [proc.pid for proc, _ in self._workers]

    @property
    def problem(self) -> str | None:
        """Why the pipeline is unusable (a worker exited, failed, stopped answering; closed), None while healthy;
        names every worker found dead since (a collective usually notices a crash before the process table)."""
        if self.healthy:
            return None
        dead = [
            f"{p.name} exited with code {p.exitcode}"
            for p, _ in self._workers
            if not p.is_alive() and p.name not in self._broken
        ]
        return "; ".join([self._broken, *dead])

    def _lost(self, why: str) -> WorkerLostError:
        self._broken = self._broken or why
        return WorkerLostError(f"multi-device pipeline unusable: {why}")

    def _collect(self, *expected: str, timeout_s: float | None = None) -> None:
        """Wait for every worker's reply, one of `expected` (at most timeout_s in all, default the collectives'
        timeout); WorkerLostError otherwise."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        for proc, conn in self._workers:
            while not conn.poll(0.1):
                if not proc.is_alive():
                    raise self._lost(f"{proc.name} exited with code {proc.exitcode}")
                if time.monotonic() > deadline:
                    raise self._lost(f"{proc.name} did not answer within {timeout_s:g}s")
            try:
                kind, detail = conn.recv()
            except (EOFError, OSError) as e:
                raise self._lost(f"{proc.name} closed its pipe ({proc.exitcode=})") from e
            if kind not in expected:
                log.error("%s failed: %s", proc.name, detail)
                raise self._lost(f"{proc.name} failed: {str(detail).splitlines()[0]}")

    # ---- the pipeline's face ----------------------------------------------------------------------------------
    def __getattr__(self, name):
        # kind, family, fps, model_name, defaults, request(...): rank 0's pipeline answers (never the private ones)
        if name.startswith("_") or name == "pipeline":
            raise AttributeError(name)
        return getattr(self.pipeline, name)

    def __call__(self, request, progress=None, frame_sink=None, stage_progress=None):
        """Generate one video across all ranks; the same arguments and result as TurboVideoPipeline.__call__."""
        import torch.distributed as dist

        from .pipeline import pick_seed

        if not self.healthy:
            raise WorkerLostError(f"multi-device pipeline unusable: {self._broken}")
        # every rank must draw the same noise: fix the seed here, once (type errors are rank 0's to raise first)
        if getattr(request, "request", None) is not None and request.request.seed is None:
            request = request.with_seed(pick_seed(None))
        for proc, conn in self._workers:
            try:
                conn.send(("generate", request))
            except OSError as e:
                raise self._lost(f"{proc.name} cannot be reached ({e})") from e
        try:
            result = self.pipeline(
                request,
                progress=progress,
                frame_sink=frame_sink,
                stage_progress=_leading(stage_progress, self.pipeline.device),
            )
        except dist.DistError as e:  # a collective failed or timed out: a worker is gone or stuck
            raise self._lost(f"a collective failed: {str(e).splitlines()[0]}") from e
        except RuntimeError as e:
            if not self.healthy or _collective_failure(e):
                raise self._lost(f"a collective failed: {str(e).splitlines()[0]}") from e
            self._collect("done", "failed")
            raise
        except BaseException:
            # a refused request (validated identically on every rank), a cancel at a step boundary (every rank
            # stopped there), a device error here: the workers answer too (or are lost, which _collect says)
            # before the error goes up, so the next request starts with empty pipes
            self._collect("done", "failed")
            raise
        self._collect("done")
        return result

    def close(self) -> None:
        """Stop the workers (a stop command, then terminate after a grace period) and leave the group."""
        import torch.distributed as dist

        self._broken = self._broken or "closed"  # from now on: refused, and readiness says why
        for _, conn in self._workers:
            try:
                conn.send(("stop", None))
            except OSError:
                pass
        for proc, conn in self._workers:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            conn.close()
        self._workers = []
        if dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
