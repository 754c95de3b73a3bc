"""Seconds per meta-step on the GPU, the figures of benchmarks/results/meta_step-NVIDIA-H200-2026-11-27.md:
Omniglot-shaped 5-way 1-shot (15 query per class), Conv4-64, T=32, 5 inner steps, 5 CG, lam 2:
our IMAML eager (vmap, loop), its CUDA-graph replay, and a plain PyTorch per-task loop
(double-backward HVP, Betty-style CG on torch.cat-flattened vectors). Run from the repo root."""
import sys, torch
sys.path.insert(0, "examples/implicit_maml"); sys.path.insert(0, ".")
from tutorial import ConvNet
from imaml_ext import IMAML
torch.manual_seed(0)
dev = "cuda"
T, ways, shots, query = 32, 5, 1, 15
sx = torch.rand(T, ways * shots, 1, 28, 28, device=dev); sy = torch.arange(ways, device=dev).repeat_interleave(shots).repeat(T, 1)
qx = torch.rand(T, ways * query, 1, 28, 28, device=dev); qy = torch.arange(ways, device=dev).repeat_interleave(query).repeat(T, 1)
model = ConvNet(ways, 64).to(dev)
print(torch.cuda.get_device_name(), torch.__version__)

def timeit(fn, reps=5):
    fn(); torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); torch.cuda.synchronize(); times.append(s.elapsed_time(e) / 1e3)
    times.sort(); return times[len(times) // 2]

res = {}
for mode in ("vmap", "loop"):
    im = IMAML(model, 5, 0.1, 2.0, 5, forward=mode, check_labels=False)
    res[f"ours_{mode}"] = timeit(lambda: im.meta_step(sx, sy, qx, qy))
    print(mode, res[f"ours_{mode}"], flush=True)
im = IMAML(model, 5, 0.1, 2.0, 5, forward="vmap", check_labels=False)
model.zero_grad(); im.meta_step(sx, sy, qx, qy); eager = [p.grad.clone() for p in model.parameters()]
cap = im.capture(sx, sy, qx, qy)
model.zero_grad(); cap.step(sx, sy, qx, qy); diff = max(((p.grad - e).abs().max() / e.abs().max()).item() for p, e in zip(model.parameters(), eager))
res["ours_captured"] = timeit(lambda: cap.step(sx, sy, qx, qy))
print("captured", res["ours_captured"], "max rel diff vs eager", diff, flush=True)

from torch.func import functional_call
names = [n for n, _ in model.named_parameters()]
def plain_loop():
    theta = [p.detach() for p in model.parameters()]
    for t in range(T):
        phi = [p.clone().requires_grad_(True) for p in theta]
        for _ in range(5):
            out = functional_call(model, dict(zip(names, phi)), (sx[t],))
            g = torch.autograd.grad(torch.nn.functional.cross_entropy(out, sy[t]), phi)
            phi = [(p - 0.1 * (gi + 2.0 * (p - q))).detach().requires_grad_(True) for p, gi, q in zip(phi, g, theta)]
        v = torch.autograd.grad(torch.nn.functional.cross_entropy(functional_call(model, dict(zip(names, phi)), (qx[t],)), qy[t]), phi)
        sg = torch.autograd.grad(torch.nn.functional.cross_entropy(functional_call(model, dict(zip(names, phi)), (sx[t],)), sy[t]), phi, create_graph=True)
        x = [torch.zeros_like(a) for a in v]; r = [a.clone() for a in v]; p = [a.clone() for a in v]
        rr = torch.dot(torch.cat([a.flatten() for a in r]), torch.cat([a.flatten() for a in r]))
        for _ in range(5):
            hv = torch.autograd.grad(sg, phi, grad_outputs=p, retain_graph=True)
            ap = [pi + h / 2.0 for pi, h in zip(p, hv)]
            alpha = rr / torch.dot(torch.cat([a.flatten() for a in p]), torch.cat([a.flatten() for a in ap]))
            x = [xi + alpha * pi for xi, pi in zip(x, p)]; r = [ri - alpha * a for ri, a in zip(r, ap)]
            rr_new = torch.dot(torch.cat([a.flatten() for a in r]), torch.cat([a.flatten() for a in r]))
            p = [ri + (rr_new / rr) * pi for ri, pi in zip(r, p)]; rr = rr_new
res["plain_loop"] = timeit(plain_loop, reps=3)
print("plain_loop", res["plain_loop"], flush=True)
for k, v in res.items():
    print(f"| {k} | {v*1e3:.1f} ms | {T/v:.0f} tasks/s | {res['plain_loop']/v:.1f}x vs plain loop |")
