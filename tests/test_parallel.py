"""Context-parallel DiT (engine/parallel.py) on CPU: two real processes on gloo against the single-process model.

The DiT test spawns two ranks that run the sharded model and save their outputs; this process computes the
reference with an unsharded copy built from the same seed. The pipeline test drives a real worker process through
`ParallelPipeline` and compares the frames with the session's single-process pipeline, then kills the worker in
the middle of a request: the call must end in WorkerLostError (bounded by the collective timeout), never hang. A
cancel at a step boundary stops every rank there and leaves the pipeline usable.
"""

from __future__ import annotations

import datetime
import socket

import numpy as np
import pytest
import torch
from conftest import FAST

from turboflow.errors import ConfigError, RequestCancelled

# latent [C, F', H', W'] with the 1x2x2 patch: 3 x 8 x 13 = 312 tokens (even), 3 x 7 x 13 = 273 (odd: padded)
LATENTS = {"even": (16, 3, 16, 26), "odd": (16, 3, 14, 26)}
ATTENTIONS = ("original", "sla")
SLA_TOPK = 0.5  # of 5 key blocks per 128-token query block: 2 selected, so the sparse path really selects


def _tiny_dit(seed: int = 0):
    from diffusers import WanTransformer3DModel

    from turboflow.engine.families.wan import TINY_TRANSFORMER

    torch.manual_seed(seed)
    net = WanTransformer3DModel(in_channels=16, **TINY_TRANSFORMER)
    torch.nn.init.normal_(net.proj_out.weight, std=0.5)
    head_dim = TINY_TRANSFORMER["attention_head_dim"]
    # SLA's linear branch projection (zero in a checkpoint without it): random, so that branch counts too
    proj_l = {}
    for i in range(len(net.blocks)):
        proj_l[f"blocks.{i}.proj_l.weight"] = torch.randn(head_dim, head_dim) * 0.3
        proj_l[f"blocks.{i}.proj_l.bias"] = torch.randn(head_dim) * 0.1
    return net.eval().requires_grad_(False), proj_l


def _inputs(latent: tuple[int, ...]):
    g = torch.Generator().manual_seed(123)
    return dict(
        hidden_states=torch.randn(1, *latent, generator=g),
        timestep=torch.tensor([870.0]),
        encoder_hidden_states=torch.randn(1, 16, 32, generator=g),
    )


@torch.no_grad()
def _forward_all(net, proj_l) -> dict[str, torch.Tensor]:
    from turboflow.engine.sla import set_attention

    out = {}
    for attention in ATTENTIONS:
        set_attention(net, attention, topk=SLA_TOPK, proj_l=proj_l)
        for name, latent in LATENTS.items():
            out[f"{attention}-{name}"] = net(**_inputs(latent), return_dict=False)[0]
    return out


def _dit_rank(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from turboflow.engine.parallel import enable_context_parallel

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        net, proj_l = _tiny_dit()
        handle = enable_context_parallel(net)
        torch.save(_forward_all(net, proj_l), f"{out_dir}/rank{rank}.pt")
        handle.remove()
    finally:
        dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_context_parallel_dit_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_dit_rank, args=(_port(), str(tmp_path)), nprocs=2, join=True)
    reference = _forward_all(*_tiny_dit())
    assert reference["sla-even"].abs().max() > 0 and not torch.equal(reference["sla-even"], reference["original-even"])
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == reference.keys()
        for case, want in reference.items():
            assert got[case].shape == want.shape, case
            error = (got[case] - want).abs().max() / want.abs().max()
            assert error < 1e-5, f"rank {rank}, {case}: relative error {error:.2e}"


def test_unshardable_models_are_refused_clearly():
    from turboflow.engine.parallel import ParallelPipeline, check_shardable, enable_context_parallel, padded_length

    net, _ = _tiny_dit()
    check_shardable(net, 2)
    with pytest.raises(ConfigError, match="2 attention heads, which 3 ranks cannot share"):
        check_shardable(net, 3)
    with pytest.raises(ConfigError, match="process group"):
        enable_context_parallel(net)
    with pytest.raises(ConfigError, match="at least 2 ranks"):
        ParallelPipeline("/nonexistent", world_size=1)
    with pytest.raises(ConfigError, match="2 ranks need 2 devices"):
        ParallelPipeline("/nonexistent", world_size=2, devices=["cpu"])
    assert [padded_length(n, 2) for n in (312, 273, 1)] == [312, 274, 2]


def test_parallel_pipeline_frames_equal_single_process_and_a_dead_worker_fails_fast(tiny_t2v_dir, t2v_pipeline):
    from turboflow.engine.parallel import ParallelPipeline
    from turboflow.errors import WorkerLostError

    requests = [
        dict(seed=5, num_steps=2, **FAST),
        dict(seed=5, num_steps=2, attention="sla", sla_topk=0.3, **FAST),
    ]
    with ParallelPipeline(tiny_t2v_dir, world_size=2, devices=["cpu", "cpu"], timeout_s=60) as parallel:
        assert parallel.healthy and parallel.kind == "t2v"
        want_first = None
        for fields in requests:
            want = t2v_pipeline(t2v_pipeline.request("a red fox", **fields))
            want_first = want_first or want
            got = parallel(parallel.request("a red fox", **fields))
            assert got.frames.shape == want.frames.shape and got.seed == want.seed
            # float32 throughout: the sharded matmuls round differently in the last bits, which may move a pixel
            # across a rounding boundary, never further
            diff = np.abs(got.frames.astype(int) - want.frames.astype(int))
            assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (fields, diff.max(), (diff > 0).mean())
        unseeded = parallel(parallel.request("a boat", num_steps=1, **FAST))  # rank 0 fixes the seed for all
        assert unseeded.seed is not None
        # a refused request is refused on every rank, and the pipeline stays usable
        with pytest.raises(TypeError):
            parallel("not a validated request")
        assert parallel.healthy

        # a cancel at a step boundary stops every rank there (the workers do not wait in the next step's
        # all-to-all until the collective timeout), and the pipeline serves the next request
        def cancel_after_first_step(stage, done, total):
            if stage == "diffusion" and done == 1:
                raise RequestCancelled("cancelled by the test")

        with pytest.raises(RequestCancelled):
            parallel(parallel.request("a boat", seed=1, num_steps=3, **FAST), stage_progress=cancel_after_first_step)
        assert parallel.healthy and parallel.problem is None
        again = parallel(parallel.request("a red fox", **requests[0]))
        assert np.abs(again.frames.astype(int) - want_first.frames.astype(int)).max() <= 1

        worker = parallel._workers[0][0]

        def kill_worker_mid_request(stage, done, total):
            if stage == "diffusion" and done == 1:
                worker.kill()

        with pytest.raises(WorkerLostError) as lost:
            parallel(parallel.request("a boat", seed=1, num_steps=2, **FAST), stage_progress=kill_worker_mid_request)
        assert lost.value.retryable and lost.value.code == "device_unavailable"
        assert not parallel.healthy
        with pytest.raises(WorkerLostError, match="unusable"):  # refused at once, before any collective
            parallel(parallel.request("a boat", seed=1, num_steps=1, **FAST))


# ---- bench/parallel.py --request: the whole request on one rank and on two (the GPU measurement's CPU smoke) --------
def test_bench_parallel_request_times_one_rank_and_two_with_equal_frames(tmp_path):
    """Two gloo processes run bench.parallel's request mode on the tiny I2V model (both experts sharded, the seeded
    image through the VAE encoder): the one-rank row and the two-rank row each time text encode -> DiT -> decode ->
    mp4 -> S3 (moto), and the two rows' videos are the same."""
    import json

    from bench import parallel as bench_parallel

    out = tmp_path / "out"
    # --variant sla: the GPU run's `fast` less FP8 (no CPU kernel worth timing) and compile (aot_eager on the CPU
    # proves nothing about Inductor and costs seconds here); four requests of ~3 s each (the tiny VAE decodes 640x480
    # in ~2 s on one CPU thread) after two processes' imports
    argv = ["--tiny", "--request", "--model", "i2v-a14b-720p", "--variant", "sla", "--steps", "2", "--out", str(out)]
    assert bench_parallel.main(argv) == 0
    doc = json.loads((out / "parallel_request.json").read_text())
    assert doc["world_size"] == 2 and doc["s3_error"] is None and doc["variant_settings"]["attention"] == "sla"
    (entry,) = doc["models"]
    assert entry["key"] == "i2v-a14b-720p" and entry["kind"] == "i2v" and entry["offload"] == "none"
    rows = entry["rows"]
    assert [rows["1gpu"]["gpus"], rows["cp"]["gpus"]] == [1, 2]
    for row in rows.values():
        assert row["experts"] == ["high", "low"] and len(row["steps_s"]) == 2 and row["mp4_bytes"] > 0
        for stage in ("text_encode_s", "vae_encode_s", "diffusion_s", "vae_decode_s", "s3_upload_s", "total_s"):
            assert row[stage] > 0, stage
    # float32 on gloo: the sharded matmuls may move a pixel by one level, never further
    assert entry["frames_max_abs_diff"] <= 1 and entry["frames_mean_abs_diff"] < 0.05
    table = (out / "parallel_request.md").read_text()
    assert "| **request total** |" in table and "| VAE encode (I2V) |" in table and "1 GPU / 2 GPUs" in table


def test_bench_parallel_takes_an_i2v_model_only_for_whole_requests(tmp_path):
    from bench import parallel as bench_parallel

    for argv in (["--model", "i2v-a14b-720p"], ["--model", "14b-720p,14b-480p"], ["--request", "--model", "nope"]):
        with pytest.raises(SystemExit):
            bench_parallel.main(["--tiny", "--out", str(tmp_path), *argv])
