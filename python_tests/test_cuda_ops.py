"""CUDA kernels against the float64 reference on the CPU, launch counts,
stream and graph capture, and no host synchronisation in a solve.
Every test here needs a GPU (marked `cuda`, skipped without one)."""

import pytest
import torch

import imaml_ext.ops as ops
from imaml_ext.ops import has_compiled_kernels, reference
from op_samples import CONV4_SHAPES, cg_sample_states, prox_sample_inputs, task_list

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def needs_cuda_kernels():
    if torch.cuda.is_available() and not has_compiled_kernels("cuda"):
        pytest.fail("a CUDA device is present but imaml_ext was built without its CUDA kernels")


def to_cpu(v):
    if isinstance(v, list):
        return [t.cpu() for t in v]
    return v.cpu() if isinstance(v, torch.Tensor) else v


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_prox_cuda_matches_reference(dtype):
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for sample in prox_sample_inputs(device="cuda", dtype=dtype):
        expected = sample.clone()
        expected.__dict__.update({k: to_cpu(v) for k, v in expected.__dict__.items()})
        torch.ops.imaml_ext.prox_sgd_step_(*sample.op_args())
        reference.prox_sgd_step_(*expected.op_args())
        for a, e in zip(sample.params + sample.momentum_buffers, expected.params + expected.momentum_buffers):
            torch.testing.assert_close(a.cpu(), e, **tol, msg=lambda m: f"{sample.name}: {m}")


def test_prox_on_unaligned_views_and_side_stream():
    """Slices whose data do not start on 16 bytes take the scalar path."""
    flat = torch.randn(4 * 1001 + 1, dtype=torch.float32, device="cuda")
    params = [flat[1:].view(4, 1001)]
    grads = [torch.randn(4, 1001, device="cuda")]
    anchors = [torch.randn(1001, device="cuda")]
    expected = [params[0].cpu().clone()]
    reference.prox_sgd_step_(expected, to_cpu(grads), to_cpu(anchors), [], 0.2, 0.3, 0.0, None, None)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.prox_sgd_step_(params, grads, anchors, 0.2, 0.3)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(params[0].cpu(), expected[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cg_ops_cuda_match_reference(dtype):
    tol = 1e-11 if dtype == torch.float64 else 1e-4
    for state in cg_sample_states(device="cuda", dtype=dtype):
        for stage in ("init", "alpha", "update"):
            cuda_state = state.clone()
            cpu_state = state.clone()
            cpu_state.__dict__.update({k: to_cpu(v) for k, v in cpu_state.__dict__.items()})
            getattr(torch.ops.imaml_ext, f"cg_{stage}_")(*getattr(cuda_state, f"{stage}_args")())
            getattr(reference, f"cg_{stage}_")(*getattr(cpu_state, f"{stage}_args")())
            for name in ("x", "r", "p", "s"):
                for a, e in zip(getattr(cuda_state, name), getattr(cpu_state, name)):
                    torch.testing.assert_close(a.cpu(), e, rtol=tol, atol=tol)
            torch.testing.assert_close(cuda_state.scalars.cpu(), cpu_state.scalars, rtol=tol, atol=tol)
            assert torch.equal(cuda_state.status.cpu(), cpu_state.status)
            assert torch.equal(cuda_state.iterations.cpu(), cpu_state.iterations)
            assert cuda_state.counter.item() == 0, "the last block must reset the counter"


def _spd_problem(num_tasks, sizes, device, dtype=torch.float64):
    n = sum(sizes)
    m = torch.randn(num_tasks, n, n, dtype=dtype, device=device)
    hessians = m @ m.transpose(1, 2) / n
    b = [torch.randn(num_tasks, k, dtype=dtype, device=device) for k in sizes]

    def hvp(v):
        out = torch.einsum("tij,tj->ti", hessians, torch.cat(v, dim=1))
        return list(out.split(sizes, dim=1))

    return hessians, b, hvp


def test_cg_solve_cuda_exact():
    sizes = [7, 3, 20]
    hessians, b, hvp = _spd_problem(33, sizes, "cuda")
    x, info = ops.cg_solve(hvp, b, 0.9, iters=60)
    system = torch.eye(sum(sizes), dtype=torch.float64, device="cuda") + hessians / 0.9
    expected = torch.linalg.solve(system, torch.cat(b, dim=1))
    torch.testing.assert_close(torch.cat(x, dim=1), expected, rtol=1e-9, atol=1e-9)
    assert not info.breakdown.any().item()


def _kernel_names(fn):
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def test_prox_step_is_one_launch_for_the_whole_meta_batch():
    params = task_list(32, CONV4_SHAPES, torch.float32, "cuda")
    grads = [torch.randn_like(p) for p in params]
    anchors = [torch.randn(p.shape[1:], device="cuda") for p in params]
    buffers = [torch.zeros_like(p) for p in params]
    names = _kernel_names(lambda: ops.prox_sgd_step_(params, grads, anchors, 0.1, 0.5, 0.9, buffers))
    assert len(names) == 1 and "prox_sgd_kernel" in names[0], names


def test_cg_iteration_vector_work_is_two_launches():
    sizes = [p for p in (64 * 9, 64, 64)]
    _, b, hvp = _spd_problem(16, sizes, "cuda", torch.float32)
    iters = 5
    names = _kernel_names(lambda: ops.cg_solve(hvp, b, 1.0, iters=iters))
    ours = [n for n in names if "cg_dot_kernel" in n or "cg_update_kernel" in n]
    assert len(ours) == 1 + 2 * iters, names  # cg_init_ once, then two per iteration


def test_cg_solve_without_host_synchronisation():
    _, b, hvp = _spd_problem(8, [10, 6], "cuda", torch.float32)
    params = task_list(8, CONV4_SHAPES, torch.float32, "cuda")
    grads = [torch.randn_like(p) for p in params]
    anchors = [torch.randn(p.shape[1:], device="cuda") for p in params]
    lr = torch.rand(8, device="cuda")
    ops.cg_solve(hvp, b, 1.0, iters=2)  # warm-up: allocator, lazy init
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x, info = ops.cg_solve(hvp, b, torch.full((8,), 2.0, device="cuda"), iters=5, tol=1e-4)
        ops.prox_sgd_step_(params, grads, anchors, lr, 0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(torch.cat(x, dim=1)).all().item()


def test_cg_solve_captured_in_cuda_graph_replays_identically():
    hessians, b, hvp = _spd_problem(16, [12, 5], "cuda", torch.float32)
    eager_x, eager_info = ops.cg_solve(hvp, b, 0.7, iters=6, tol=1e-5)

    static_b = [t.clone() for t in b]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.cg_solve(hvp, static_b, 0.7, iters=6, tol=1e-5)  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_x, graph_info = ops.cg_solve(hvp, static_b, 0.7, iters=6, tol=1e-5)
    for t in graph_x:
        t.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    for g, e in zip(graph_x, eager_x):
        assert torch.equal(g, e)
    assert torch.equal(graph_info.iterations, eager_info.iterations)
    # Replaying on new data solves the new system.
    for t in static_b:
        t.mul_(2)
    graph.replay()
    for g, e in zip(graph_x, eager_x):
        torch.testing.assert_close(g, 2 * e, rtol=1e-5, atol=1e-5)


def test_many_tasks_and_a_large_tensor():
    big = [torch.randn(2, 12_000_001, device="cuda")]
    grads = [torch.randn_like(big[0])]
    anchors = [torch.randn(12_000_001, device="cuda")]
    expected = [big[0].double()]
    reference.prox_sgd_step_(expected, [grads[0].double()], [anchors[0].double()], [], 0.1, 0.2, 0.0, None, None)
    ops.prox_sgd_step_(big, grads, anchors, 0.1, 0.2)
    torch.testing.assert_close(big[0].double(), expected[0], rtol=1e-5, atol=1e-5)

    sizes = [5, 3]
    _, b, hvp = _spd_problem(4096, sizes, "cuda", torch.float64)
    x, info = ops.cg_solve(hvp, b, 1.0, iters=10)
    assert not info.breakdown.any().item() and info.iterations.min().item() >= 8
