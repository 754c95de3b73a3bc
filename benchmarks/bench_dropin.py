"""The drop-in promise, timed: a Betty program, unchanged but for the import, on
Omniglot 5-way 1-shot, one meta-step per call, in one process, round-robin. Two
programs (``--layout``): the Betty iMAML tutorial's classes
(examples/implicit_maml/tutorial.py: one lower problem, gradient_accumulation = T,
the Conv4-64), and Betty 0.1.1's own example layout (examples/implicit_maml/siblings.py:
T sibling lower problems, a 3-layer ConvNet, 15 query images per class). Variants:

- ``ours_dropin``: on imaml_ext, EngineConfig's default task_batching="auto" (the
  meta-batch's inner loops run as one batch);
- ``ours_sequential``: the same program with task_batching="off" (task by task);
- ``betty``: the same program on Betty 0.1.1 itself (``--betty FOLDER`` holding its
  ``betty`` package: ``pip install --target FOLDER --no-deps betty-ml==0.1.1``);
- ``imaml``: ``imaml_ext.IMAML`` on tasks from the same sampler (CG, 3 iterations,
  lambda = 2 * reg), the batched API the drop-in path is measured against (tutorial
  layout only).

    PYTHONPATH=. python benchmarks/bench_dropin.py --device cpu --betty /tmp/betty_pkg
    PYTHONPATH=. python benchmarks/bench_dropin.py --layout siblings --betty /tmp/betty_pkg
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _timing import Variant, compare, run_metadata, write_results  # noqa: E402

TUTORIAL = ROOT / "examples" / "implicit_maml" / "tutorial.py"
SIBLINGS = ROOT / "examples" / "implicit_maml" / "siblings.py"
SWAPS = {  # Betty's API, as the tutorial imports it from imaml_ext
    "from imaml_ext.configs import": "from betty.configs import",
    "from imaml_ext.engine import": "from betty.engine import",
    "from imaml_ext.envs import": "from betty.envs import",
    "from imaml_ext.problems import": "from betty.problems import",
}
VARIANTS = ("ours_dropin", "ours_sequential", "betty", "imaml")
SOURCE = {"name": "l2l"}


def load_tutorial(library: str, path: Path = TUTORIAL) -> types.ModuleType:
    """The example program at ``path``, with Betty's imports swapped in for ``library="betty"``."""
    source = path.read_text()
    if library == "betty":
        for ours, theirs in SWAPS.items():
            if ours not in source:
                raise RuntimeError(f"{path} no longer imports {ours!r}; update SWAPS")
            source = source.replace(ours, theirs)
    module = types.ModuleType(f"{path.stem}_{library}")
    module.__file__ = str(path)
    exec(compile(source, str(path), "exec"), module.__dict__)  # noqa: S102 (our own example file)
    return module


class SamplerTasksets:
    """A learn2learn-free stand-in for the tutorial's ``tasksets`` (learn2learn is not on every
    GPU machine): ``.train.sample()`` gives one task's (data [2 * ways * shots, 1, 28, 28], labels),
    support and query interleaved as the tutorial's split_data reads them, from
    imaml_ext.data.omniglot_tasks, or random tensors of those shapes without the data."""

    class _Split:
        def __init__(self, draw):
            self.sample = draw

    def __init__(self, train_ways, train_samples, root=None, **_):
        ways, shots = train_ways, train_samples // 2
        try:
            from imaml_ext.data import omniglot_tasks

            tasks = omniglot_tasks(ways, shots, shots, root=root, seed=0)
            self.note = "Omniglot through imaml_ext.data.omniglot_tasks (learn2learn absent)"
        except (FileNotFoundError, ImportError) as error:
            tasks = None
            self.note = f"RANDOM TENSORS of Omniglot's shapes (no data: {str(error).splitlines()[0][:120]})"

        def draw(split):
            def sample():
                if tasks is None:
                    sx, qx = torch.rand(2, ways * shots, 1, 28, 28)
                    sy = qy = torch.arange(ways).repeat_interleave(shots)
                else:
                    sx, sy, qx, qy = (t[0] for t in getattr(tasks, split).sample(1))
                # support at even indices, query at odd
                return torch.stack([sx, qx], 1).flatten(0, 1), torch.stack([sy, qy], 1).flatten()

            return sample

        self.train, self.test = self._Split(draw("train")), self._Split(draw("test"))


DATA_NOTES = set()


def random_images_without_data() -> None:
    """siblings.py samples through imaml_ext.data.omniglot_tasks: without Omniglot on disk (a GPU
    machine), random images of its shapes stand in, and the results say so."""
    import imaml_ext.data

    real = getattr(imaml_ext.data.omniglot_tasks, "real", imaml_ext.data.omniglot_tasks)

    def omniglot_tasks(*args, **kwargs):
        try:
            return real(*args, **kwargs)
        except FileNotFoundError as error:
            DATA_NOTES.add(f"RANDOM IMAGES of Omniglot's shapes (no data: {str(error).splitlines()[0][:120]})")
            kwargs.pop("root", None)
            return real(*args, images=torch.rand(1623, 20, 28, 28), **kwargs)

    omniglot_tasks.real = real
    imaml_ext.data.omniglot_tasks = omniglot_tasks


def tutorial_engine(library: str, tasks: int, inner_steps: int, device: str, data, task_batching: str,
                    layout: str = "tutorial"):
    if layout == "siblings":  # one meta-step is inner_steps global steps; each task a lower problem
        random_images_without_data()
        tutorial = load_tutorial(library, SIBLINGS)
        argv = ["--task_num", str(tasks), "--inner_steps", str(inner_steps), "--train_iters", str(inner_steps),
                "--valid_step", str(10 ** 9), "--device", device]
        steps = inner_steps
    else:
        tutorial = load_tutorial(library)
        if SOURCE["name"] == "sampler":
            import imaml_ext.data

            imaml_ext.data.l2l_tasksets = SamplerTasksets
        argv = ["--meta_batch_size", str(tasks), "--inner_steps", str(inner_steps), "--train_iters",
                str(tasks * inner_steps), "--valid_step", str(10 ** 9)]
        if library != "betty":  # Betty takes cuda when it is there, as --device does by default
            argv += ["--device", device]
        steps = tasks * inner_steps
    if data:
        argv += ["--data", data]
    engine = tutorial.build(argv)
    if library == "betty":
        # Betty 0.1.1's Env has no .device (later Betty versions, and the tutorial, use it): the one shim.
        engine.env.device = torch.device(device)
    else:
        engine.config.task_batching = task_batching
        engine.task_batcher = None
        engine.task_batching = engine._plan_task_batching()
        expected = task_batching != "off"
        if engine.task_batching.active != expected:
            raise RuntimeError(f"task batching is {engine.task_batching}; the benchmark expected active={expected}")
    engine.train_iters = steps  # one meta-step per run()
    return tutorial, engine


class ImamlOnTutorialTasks:
    """IMAML on T tasks drawn per call from the tutorial's own sampler and split."""

    def __init__(self, tasks: int, inner_steps: int, device: str, data):
        from imaml_ext import IMAML

        self.tutorial, _ = tutorial_engine("imaml_ext", tasks, inner_steps, device, data, "off")
        args = self.tutorial.args
        self.model = self.tutorial.ConvNet(args.ways, args.hidden_size).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=args.meta_lr)
        self.imaml = IMAML(self.model, inner_steps=inner_steps, inner_lr=args.base_lr, lam=2 * args.reg,
                           cg_iterations=3, ways=args.ways)
        self.tasks, self.device = tasks, device

    def run(self):
        args = self.tutorial.args
        batches = []
        for _ in range(self.tasks):
            data, labels = self.tutorial.tasksets.train.sample()
            support = torch.zeros(data.size(0), dtype=torch.bool)
            support[torch.arange(args.shots * args.ways) * 2] = True  # the tutorial's split_data
            batches.append((data[support], labels[support], data[~support], labels[~support]))
        sx, sy, qx, qy = (torch.stack(parts).to(self.device) for parts in zip(*batches))
        self.optimizer.zero_grad(set_to_none=True)
        self.imaml.meta_step(sx, sy, qx, qy)
        self.optimizer.step()


def bench_config(args, tasks: int, inner_steps: int) -> dict:
    device = torch.device(args.device)
    variants, notes = {}, {}
    for name in args.variants:
        if name == "betty":
            if args.betty is None:
                notes[name] = "not run: pass --betty FOLDER holding Betty 0.1.1's betty package"
                continue
            _, engine = tutorial_engine("betty", tasks, inner_steps, args.device, args.data, "off", args.layout)
            variants[name] = Variant(engine.run)
        elif name == "imaml":
            if args.layout != "tutorial":
                notes[name] = "imaml: not run in this layout (its model and query size are the tutorial's)"
                continue
            variants[name] = Variant(ImamlOnTutorialTasks(tasks, inner_steps, args.device, args.data).run)
        else:
            mode = "auto" if name == "ours_dropin" else "off"
            _, engine = tutorial_engine("imaml_ext", tasks, inner_steps, args.device, args.data, mode, args.layout)
            variants[name] = Variant(engine.run)
    stats = compare(variants, device, repeats=args.repeats, warmup=args.warmup)
    row = {"tasks": tasks, "inner_steps": inner_steps, "layout": args.layout, "notes": notes,
           "variants": {name: s.summary() for name, s in stats.items()}}
    ms = {name: s.median_ms for name, s in stats.items()}
    ratios = {}
    if "ours_dropin" in ms:
        for other in ("ours_sequential", "betty", "imaml"):
            if other in ms:
                ratios[f"{other}/ours_dropin"] = ms[other] / ms["ours_dropin"]
    row["ratios"] = ratios
    return row


def render(result: dict) -> str:
    meta = result["meta"]
    if result.get("layout") == "siblings":
        program = ("Betty 0.1.1's example layout (examples/implicit_maml/siblings.py: T sibling lower problems), "
                   "one meta-step")
        what = ("Omniglot 5-way 1-shot with 15 query images per class, its 3-layer ConvNet-64 with running "
                "BatchNorm statistics, darts.")
    else:
        program = "the Betty tutorial's classes, one meta-step"
        what = ("Omniglot 5-way 1-shot, Conv4-64 (the tutorial's), darts as the tutorial is written; imaml: IMAML "
                "with 3 CG iterations.")
    lines = [
        f"# Drop-in task batching: {program} ({meta['machine']}, {meta['date']})",
        "",
        f"{meta['device_name']}, torch {meta['torch']}, {meta['torch_threads']} threads; {what} "
        "Median seconds per meta-step over round-robin samples (data sampling included in every variant). "
        "Betty 0.1.1's Env has no `.device`, which the tutorial's MAMLEnv reads: the benchmark sets it, "
        "the only change to Betty's run.",
        "",
        "| T | inner steps | " + " | ".join(VARIANTS) + " | sequential / drop-in | Betty / drop-in | IMAML / drop-in |",
        "|---|---|" + "---|" * (len(VARIANTS) + 3),
    ]
    for row in result["rows"]:
        cells = []
        for name in VARIANTS:
            v = row["variants"].get(name)
            cells.append(f"{v['median_ms'] / 1e3:.3f}" if v else "not run")
        r = row["ratios"]
        ratio = [f"{r[k]:.2f}x" if k in r else "-" for k in
                 ("ours_sequential/ours_dropin", "betty/ours_dropin", "imaml/ours_dropin")]
        lines.append(f"| {row['tasks']} | {row['inner_steps']} | " + " | ".join(cells + ratio) + " |")
    notes = {n for row in result["rows"] for n in row["notes"].values()} | set(result.get("data_notes", []))
    lines += [""] + [f"- {n}" for n in sorted(notes)]
    if result.get("tasks_source") == "sampler":
        lines.append("- Tasks from imaml_ext's sampler in the tutorial's layout (--tasks-source sampler), not learn2learn's tasksets.")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--configs", default="16x5,32x5,16x16,32x16", help="TxK: tasks per meta-step x inner steps")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--betty", default=None, help="folder holding Betty 0.1.1's betty package")
    p.add_argument("--data", default=None, help="Omniglot root (default: the tutorial's search)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--tasks-source", default="auto", choices=("auto", "l2l", "sampler"),
                   help="the tutorial's learn2learn tasksets, or a stand-in without learn2learn (auto: l2l if installed)")
    p.add_argument("--layout", default="tutorial", choices=("tutorial", "siblings"),
                   help="the tutorial's one lower problem with gradient accumulation, or Betty's T sibling problems")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    if args.tasks_source == "auto":
        args.tasks_source = "l2l" if importlib.util.find_spec("learn2learn") else "sampler"
    SOURCE["name"] = args.tasks_source
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; valid: {', '.join(VARIANTS)}")
    try:
        args.configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    except ValueError:
        p.error(f"--configs must be TxK pairs like 16x5,32x16; got {args.configs!r}")
    if args.betty is not None:
        if not (Path(args.betty) / "betty" / "__init__.py").exists():
            p.error(f"--betty {args.betty}: no betty package there (expected {args.betty}/betty/__init__.py)")
        sys.path.append(str(Path(args.betty)))
    return args


def main(argv=None):
    args = parse_args(argv)
    meta = run_metadata(torch.device(args.device))
    rows = []
    for tasks, inner_steps in args.configs:
        print(f"T={tasks} inner_steps={inner_steps} ...", file=sys.stderr, flush=True)
        rows.append(bench_config(args, tasks, inner_steps))
    result = {"meta": meta, "rows": rows, "tasks_source": args.tasks_source, "layout": args.layout,
              "data_notes": sorted(DATA_NOTES)}
    layout = "" if args.layout == "tutorial" else f"{args.layout}-"
    default = ROOT / "benchmarks" / "results" / f"dropin-{layout}{meta['machine']}-{meta['date']}.json"
    write_results(result, args.out, default, render)


if __name__ == "__main__":
    main()
