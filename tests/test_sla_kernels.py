"""SLA's Triton kernels (engine/kernels) against the float64 dense-mask reference, and the "triton" backend.

The kernels need Triton. Without a GPU they run in Triton's interpreter (numpy on CPU tensors), which must be chosen
before Triton is imported: on a CPU machine the one test `test_kernels_in_the_triton_interpreter` reruns this module
in a subprocess with TRITON_INTERPRET=1, so nothing leaks into other test modules; the kernel tests below run only
inside that subprocess, or directly on a CUDA machine.

Precision: the kernels get float32 inputs (the interpreter has no bf16 products; fp32 inputs select IEEE fp32
products on the GPU too) and the reference gets the same values in float64 with the same block table. The expected
error is fp32 rounding: inputs rounded to fp32 (2^-24 relative), then sums of at most ~1000 products and
exponentials, ~1e-6 absolute on outputs of magnitude ~1 (1.4e-6 measured at 4,000 tokens on an H200). atol 2e-5,
rtol 1e-5 leave a 10x margin, and stay far below what a real fault moves: a block missed or added, a key >= L not
masked, a wrong scale or a wrong LUT row changes outputs by 1e-2 to 1.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from turboflow.engine import sla
from turboflow.engine.sla import select_blocks, sla_attention, sla_reference

HAVE_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
ON_GPU = torch.cuda.is_available() and not INTERPRETING
KERNELS_HERE = HAVE_TRITON and (INTERPRETING or ON_GPU)
DEVICE = "cuda" if ON_GPU else "cpu"
ATOL, RTOL = 2e-5, 1e-5

kernels_here = pytest.mark.skipif(
    not KERNELS_HERE, reason="kernel tests run on a GPU or in the Triton-interpreter subprocess"
)


@pytest.mark.timeout(900)
@pytest.mark.skipif(KERNELS_HERE or not HAVE_TRITON, reason="runs the kernel tests in the interpreter subprocess")
def test_kernels_in_the_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        env=env,
        capture_output=True,
        text=True,
        timeout=850,
    )
    assert run.returncode == 0, run.stdout[-12000:] + run.stderr[-4000:]
    # every kernel test ran: the only skip in there is this runner itself
    summary = run.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and re.search(r"\b1 skipped", summary), summary


def _qkv(b, h, length, d, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, length, d, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(3)]


def _proj(d, seed, bias: bool):
    g = torch.Generator().manual_seed(seed + 1)
    w = (torch.randn(d, d, generator=g, dtype=torch.float64) * 0.1).to(DEVICE)
    b = (torch.randn(d, generator=g, dtype=torch.float64) * 0.1).to(DEVICE) if bias else None
    return w, b


def _f32(t):
    return None if t is None else t.float()


def _kernel(q, k, v, lut, w, b, tiles=None, blk_q=128, blk_k=64):
    from turboflow.engine.kernels import sparse_attention as sa

    tiles = tiles or sa.DEFAULT_TILES
    return sa.sla_sparse_linear_forward(_f32(q), _f32(k), _f32(v), lut, _f32(w), _f32(b), blk_q, blk_k, tiles)


def _attend_blocks(q, k, v, lut, blk_q=128, blk_k=64):
    """Softmax attention of each query over the keys of its LUT row's blocks (float64, explicit mask)."""
    length = q.shape[-2]
    blocks = torch.zeros(*lut.shape[:3], -(-length // blk_k), dtype=torch.bool, device=q.device)
    blocks.scatter_(-1, lut.long(), True)
    mask = blocks.repeat_interleave(blk_q, dim=2)[:, :, :length].repeat_interleave(blk_k, dim=3)[..., :length]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v


# (batch, heads, tokens, head dim, top-k, proj_l weight, proj_l bias, BLOCK_M). 300 and 1000 tokens end in a short
# K block (44 and 40 keys); 256 does not (the unmasked path). 300 tokens at top-k 0.1 keep one block per query block.
CASES = [
    (1, 2, 300, 64, 0.1, True, True, 128),
    (1, 2, 300, 64, 0.5, True, False, 64),
    (2, 2, 300, 64, 0.5, False, False, 128),
    (1, 2, 256, 64, 0.5, True, True, 128),
    (1, 3, 1000, 64, 0.1, True, True, 64),
    (1, 2, 1000, 64, 0.5, False, False, 128),
    (1, 2, 1000, 128, 0.25, True, True, 128),
]


@kernels_here
@pytest.mark.parametrize("b,h,length,d,topk,with_proj,with_bias,block_m", CASES)
def test_kernel_matches_float64_reference(b, h, length, d, topk, with_proj, with_bias, block_m):
    from turboflow.engine.kernels import sparse_attention as sa

    q, k, v = _qkv(b, h, length, d, seed=length + d)
    w, bias = _proj(d, length, with_bias) if with_proj else (None, None)
    lut = select_blocks(q, k, topk)  # the reference's own selection (float64)
    ref = sla_reference(q, k, v, topk=topk, proj_weight=w, proj_bias=bias)
    out = _kernel(q, k, v, lut, w, bias, sa.TileConfig(block_m=block_m, num_warps=4, num_stages=2))
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=ATOL, rtol=RTOL)


# two selected K blocks per softmax step: odd block counts (the last step's second half masked), a short last K
# block, and the unmasked path (256 tokens, an even count)
TWO_BLOCK_CASES = [
    (1, 2, 300, 64, 0.6, True, True, 128),  # 3 of 5 blocks: odd, the short block may be among them
    (1, 2, 256, 64, 0.5, True, False, 64),  # 2 of 4: even, no key masked
    (1, 3, 1000, 64, 0.2, False, False, 128),  # 3 of 16: odd
    (1, 2, 1000, 64, 0.7, True, True, 64),  # 11 of 16: odd, several steps
]


@kernels_here
@pytest.mark.parametrize("b,h,length,d,topk,with_proj,with_bias,block_m", TWO_BLOCK_CASES)
def test_two_key_blocks_per_step_match_float64_reference(b, h, length, d, topk, with_proj, with_bias, block_m):
    from turboflow.engine.kernels import sparse_attention as sa

    q, k, v = _qkv(b, h, length, d, seed=length + 2 * d)
    w, bias = _proj(d, length, with_bias) if with_proj else (None, None)
    lut = select_blocks(q, k, topk)
    assert (lut.shape[-1] % 2 == 1) == (length != 256)  # the odd counts this test is about
    ref = sla_reference(q, k, v, topk=topk, proj_weight=w, proj_bias=bias)
    tiles = sa.TileConfig(block_m=block_m, num_warps=4, num_stages=2, keys_per_step=2)
    out = _kernel(q, k, v, lut, w, bias, tiles)
    torch.testing.assert_close(out.double(), ref, atol=ATOL, rtol=RTOL)


@kernels_here
def test_all_blocks_selected_is_dense_attention():
    q, k, v = _qkv(1, 2, 300, 64, seed=7)
    lut = select_blocks(q, k, 1.0)
    assert lut.shape[-1] == 5  # every K block, the short one included
    dense = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(_kernel(q, k, v, lut, None, None).double(), dense, atol=ATOL, rtol=RTOL)


@kernels_here
def test_one_block_per_query_block_masks_the_keys_past_the_end():
    q, k, v = _qkv(1, 2, 300, 64, seed=8)
    short = torch.full((1, 2, 3, 1), 4, dtype=torch.int64, device=DEVICE)  # block 4 holds keys 256..299 only
    out = _kernel(q, k, v, short, None, None)
    only_tail = torch.softmax((q @ k[:, :, 256:].transpose(-1, -2)) / 8.0, dim=-1) @ v[:, :, 256:]
    torch.testing.assert_close(out.double(), only_tail, atol=ATOL, rtol=RTOL)
    # a different block per query block: each 128-query tile reads its own LUT row
    rows = torch.tensor([2, 0, 3], device=DEVICE).view(1, 1, 3, 1).expand(1, 2, 3, 1)
    torch.testing.assert_close(
        _kernel(q, k, v, rows, None, None).double(), _attend_blocks(q, k, v, rows), atol=ATOL, rtol=RTOL
    )


@kernels_here
def test_strided_inputs_and_lut_order():
    """SLAProcessor hands [B, L, H, D] tensors transposed to [B, H, L, D]: the kernels take the strides and write the
    output with q's layout; the order of the blocks in a LUT row does not matter."""
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 300, 2, 64, generator=g).to(DEVICE).transpose(1, 2) for _ in range(3))
    w, bias = _proj(64, 9, True)
    lut = select_blocks(q, k, 0.5)
    out = _kernel(q, k, v, lut, w, bias)
    assert out.stride() == q.stride()
    contiguous = _kernel(q.contiguous(), k.contiguous(), v.contiguous(), lut, w, bias)
    torch.testing.assert_close(out, contiguous, atol=0, rtol=0)
    reversed_rows = _kernel(q, k, v, lut.flip(-1), w, bias)
    torch.testing.assert_close(reversed_rows, out, atol=ATOL, rtol=RTOL)


@kernels_here
@pytest.mark.parametrize("length,topk,with_proj", [(1000, 0.1, True), (600, 0.5, True), (300, 0.5, False)])
def test_triton_backend_matches_reference(length, topk, with_proj):
    q, k, v = _qkv(1, 2, length, 64, seed=11)
    w, bias = _proj(64, 11, True) if with_proj else (None, None)
    # the fp32 and fp64 selections agree on these inputs, so the outputs differ by the kernels' rounding only
    assert torch.equal(
        select_blocks(q, k, topk).sort(-1).values, select_blocks(q.float(), k.float(), topk).sort(-1).values
    )
    out = sla_attention(
        q.float(), k.float(), v.float(), topk=topk, proj_weight=_f32(w), proj_bias=_f32(bias), backend="triton"
    )
    ref = sla_reference(q, k, v, topk=topk, proj_weight=w, proj_bias=bias)
    torch.testing.assert_close(out.double(), ref, atol=ATOL, rtol=RTOL)


@kernels_here
def test_the_op_traces_into_one_graph_and_has_a_fake_implementation():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from turboflow.engine.kernels import sparse_attention  # noqa: F401  (registers the op)

    q, k, v = (t.float() for t in _qkv(1, 2, 300, 64, seed=12))
    w, bias = (t.float() for t in _proj(64, 12, True))
    fn = lambda q, k, v: sla_attention(q, k, v, topk=0.5, proj_weight=w, proj_bias=bias, backend="triton")
    explained = torch._dynamo.explain(fn)(q, k, v)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    assert "torch.ops.turboflow.sla_sparse_linear" in explained.graphs[0].code
    # backend "eager" runs dynamo's graph as traced (the interpreter's launches cannot be recorded by AOTAutograd)
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v), fn(q, k, v), atol=0, rtol=0)
    torch._dynamo.reset()

    lut = select_blocks(q, k, 0.5)
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]  # SLAProcessor's layout
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in strided)
        out = torch.ops.turboflow.sla_sparse_linear(
            fq, fk, fv, mode.from_tensor(lut), mode.from_tensor(w), mode.from_tensor(bias), 128, 64
        )
        assert out.shape == q.shape and out.dtype == q.dtype and out.stride() == fq.stride()
    torch.library.opcheck(
        torch.ops.turboflow.sla_sparse_linear.default,
        (q, k, v, lut, w, bias, 128, 64),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@kernels_here
@pytest.mark.skipif(not INTERPRETING, reason="the interpreter's limit only")
def test_interpreted_kernels_refuse_aot_tracing():
    q, k, v = (t.float() for t in _qkv(1, 1, 128, 64, seed=13))
    fn = torch.compile(lambda q, k, v: sla_attention(q, k, v, topk=0.5, backend="triton"), backend="aot_eager")
    with pytest.raises(Exception, match="interpreter cannot be traced by AOTAutograd"):
        fn(q, k, v)
    torch._dynamo.reset()


@kernels_here
def test_unsupported_inputs_are_refused_by_name():
    from turboflow.engine.kernels import sparse_attention as sa

    q, k, v = (t.float() for t in _qkv(1, 1, 200, 64, seed=14))
    lut = select_blocks(q, k, 0.5)
    with pytest.raises(ValueError, match="head dim"):
        sa.sla_sparse_linear(q[..., :48], k[..., :48], v[..., :48], lut, None, None, 128, 64)
    with pytest.raises(ValueError, match="lut"):
        sa.sla_sparse_linear(q, k, v, lut[:, :, :1], None, None, 128, 64)
    with pytest.raises(ValueError, match="block_m"):
        sa.sla_sparse_linear_forward(q, k, v, lut, None, None, 128, 64, sa.TileConfig(block_m=256))
    with pytest.raises(ValueError, match="proj_bias without proj_weight"):
        sa.sla_sparse_linear(q, k, v, lut, None, torch.zeros(64), 128, 64)


# ---- torch side: no kernels needed ------------------------------------------------------------------------------


def test_engine_import_loads_no_triton():
    """Cold start: importing the engine's SLA (and running it on CPU) imports neither Triton nor the kernels."""
    code = (
        "import sys, torch\n"
        "from turboflow.engine.sla import sla_attention\n"
        "q = torch.randn(1, 1, 200, 64)\n"
        "sla_attention(q, q, q, topk=0.5)\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert not [m for m in sys.modules if m.startswith('turboflow.engine.kernels.')], 'kernels imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-4000:]


def test_unknown_backend_is_refused():
    q = torch.randn(1, 1, 64, 16)
    with pytest.raises(ValueError, match="backend must be one of"):
        sla_attention(q, q, q, topk=0.5, backend="cuda")


def test_auto_falls_back_once_when_the_kernels_fail_to_build(monkeypatch, caplog):
    """A kernel build failure (no C compiler, old GPU) warns once; the op then stays on the next backend."""
    calls = []

    def broken_build(*args):
        calls.append(1)
        raise RuntimeError("Failed to find C compiler")

    monkeypatch.setattr(sla, "_AUTO_TRITON_DEVICES", ("cuda", "cpu"))  # let "auto" try Triton on these CPU tensors
    monkeypatch.setattr(sla, "_triton_broken", False)
    monkeypatch.setattr(sla, "_triton_ready", lambda: not sla._triton_broken)
    monkeypatch.setattr(sla, "_sla_triton", broken_build)
    g = torch.Generator().manual_seed(15)
    q, k, v = (torch.randn(1, 2, 300, 64, generator=g) for _ in range(3))
    with caplog.at_level(logging.WARNING, logger="turboflow.engine.sla"):
        first = sla_attention(q, k, v, topk=0.5)
        second = sla_attention(q, k, v, topk=0.5)
    assert len(calls) == 1
    assert [r.getMessage() for r in caplog.records if "Triton SLA kernels unavailable" in r.getMessage()] == [
        "Triton SLA kernels unavailable (RuntimeError: Failed to find C compiler); SLA falls back"
    ]
    gathered = sla_attention(q, k, v, topk=0.5, backend="gather")
    torch.testing.assert_close(first, gathered, atol=0, rtol=0)
    torch.testing.assert_close(second, gathered, atol=0, rtol=0)
