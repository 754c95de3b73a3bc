"""Meta-test evaluation: per-task accuracy after adaptation, its mean with a 95 % interval,
the final evaluation of a run (results.json) and --evaluate RUN_FOLDER (evaluations.jsonl)."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import platform
import time
from datetime import datetime, timezone
from typing import Dict, List, Optional

import torch

from ..batched import IMAML
from ..batched.choice import key_text
from ..data import NUM_DRAWERS, TaskIndices, TaskSampler
from ..logging import to_json
from .arguments import recorded_run
from .config import RunConfig
from .distributed import Distributed
from .errors import RunError
from .learner import build_evaluator, build_model, evaluation_lam
from .run_folder import RunFolder, read_checkpoint
from .tasks import make_tasks


def slice_indices(indices: TaskIndices, start: int, stop: int) -> TaskIndices:
    return TaskIndices(*(t[start:stop] for t in indices))


def evaluate(imaml: IMAML, sampler: TaskSampler, indices: TaskIndices, batch: int) -> Dict[str, torch.Tensor]:
    """Per-task query accuracy and loss after the proximal inner loop, ``batch`` tasks at a time."""
    accuracy, loss = [], []
    total = indices.classes.shape[0]
    for start in range(0, total, batch):
        task_loss, task_accuracy = imaml.evaluate(*sampler.gather(slice_indices(indices, start, start + batch)),
                                                  per_task=True)
        loss.append(task_loss)
        accuracy.append(task_accuracy)
    return {"accuracy": torch.cat(accuracy), "loss": torch.cat(loss)}


def evaluation_batch_sizes(args: RunConfig) -> List[int]:
    """The meta-batch sizes the validations and the final evaluation run: --eval_batch and the remainders."""
    sizes = set()
    for total in (args.valid_tasks if args.valid_every else 0, args.eval_tasks):
        if total:
            sizes.add(min(args.eval_batch, total))
            if total % args.eval_batch and total > args.eval_batch:
                sizes.add(total % args.eval_batch)
    return sorted(sizes)


def time_evaluation_shapes(imaml: IMAML, sampler: TaskSampler, args: RunConfig) -> None:
    """forward="auto" times each input shape at its first call. A run's evaluation shapes are timed
    here, at its start, so that every checkpoint holds their choices and a resumed run evaluates as
    the uninterrupted one would. Runs the evaluation on one task drawn and put back (the sampler's
    generator and every RNG as they were), repeated to each batch size, with --query and
    --eval_query query images."""
    if imaml.forward != "auto":
        return
    sizes = evaluation_batch_sizes(args)
    if not sizes:
        return
    state = sampler.generator.get_state()
    ones = []
    for drawn in {sampler.query: sampler, eval_query(args): evaluation_sampler(sampler, args)}.values():
        ones.append(drawn.gather(drawn.sample_indices(1)))
        sampler.generator.set_state(state)
    with torch.random.fork_rng(devices=[]):
        for one in ones:
            for size in sizes:
                imaml.evaluate(*(t.expand(size, *t.shape[1:]).contiguous() for t in one), per_task=True)


def eval_query(args: RunConfig) -> int:
    """Query images per class of the final evaluation: --eval_query, by default --query."""
    return args.query if args.eval_query is None else args.eval_query


def evaluation_sampler(sampler: TaskSampler, args: RunConfig) -> TaskSampler:
    """``sampler`` with --eval_query query images per class. It draws from the same generator as
    ``sampler`` and the same numbers (the support images come first in each class's drawer order), so
    the tasks are the same, with more or fewer query images."""
    query = eval_query(args)
    if query == sampler.query:
        return sampler
    if sampler.shots + query > sampler.drawers:  # Omniglot's was checked with the options; Mini-ImageNet's here
        raise RunError(f"--shots + --eval_query must be <= {sampler.drawers} (the images per class; support and "
                       f"query images are distinct); got {sampler.shots} + {query}")
    other = copy.copy(sampler)
    other.query = query
    return other


def summarise(per_task_accuracy: torch.Tensor) -> Dict[str, float]:
    """Mean accuracy in percent with the half-width of its 95 % confidence interval."""
    acc = per_task_accuracy.double().cpu() * 100.0
    n = acc.numel()
    std = acc.std(unbiased=True).item() if n > 1 else float("nan")
    return {"accuracy": acc.mean().item(), "ci95": 1.96 * std / math.sqrt(n), "tasks": n}


def evaluate_run(args: RunConfig) -> Dict[str, object]:
    """``--evaluate RUN_FOLDER``: the checkpoint's model, adapted to --eval_tasks test tasks, beside
    the same adaptation from the run's random initialisation (--no-baseline skips it); nothing
    is trained. The test tasks are drawn as the run's own final evaluation draws them, so the
    same --eval_tasks gives the same tasks. The result is appended to evaluations.jsonl."""
    folder = RunFolder(args.evaluate)
    ckpt = read_checkpoint(folder, "--evaluate")
    run = recorded_run(ckpt["config"], f"--evaluate: {folder.checkpoint}")
    given = {name: getattr(args, name) for name in ("eval_tasks", "baseline", "eval_lam", "eval_query", "device",
                                                     "data", "download", "progress")}
    if args.eval_batch is not None:
        given["eval_batch"] = args.eval_batch
    run = dataclasses.replace(run, **given)
    if args.eval_query is not None and run.task == "omniglot" and run.shots + args.eval_query > NUM_DRAWERS:
        raise RunError(f"--shots + --eval_query must be <= {NUM_DRAWERS} (Omniglot's drawers per character); the "
                       f"run's --shots is {run.shots}; got --eval_query {args.eval_query}")
    tasks = make_tasks(run, Distributed(1, 0, 0).device(run.device))
    model = build_model(run)
    model.load_state_dict(ckpt["model"])
    results = final_evaluation(run, model, tasks.test, folder, write=False, choices=ckpt.get("timed_choices"))
    results.update(step=ckpt["step"], eval_batch=run.eval_batch, ways=run.ways, shots=run.shots)
    with open(folder.path / "evaluations.jsonl", "a") as f:
        f.write(to_json(results, sort_keys=True) + "\n")
    return results


def final_evaluation(args: RunConfig, model: torch.nn.Module, test_sampler: TaskSampler, folder: RunFolder,
                     write: bool = True, choices: Optional[dict] = None) -> Dict[str, object]:
    """The trained ``model`` adapted to --eval_tasks test tasks with --eval_lam's inner loop, beside
    the same adaptation from the random initialisation (--baseline); written to results.json.
    ``choices``: the run's timed choices (IMAML.timed_choices), so "auto" runs what the run chose."""

    def evaluator(of: torch.nn.Module) -> IMAML:
        learner = build_evaluator(of, args)
        learner.keep_timed_choices(choices)
        return learner

    results: Dict[str, object] = {
        "out": str(folder.path),
        "steps": args.steps,
        "machine": _machine(args.device),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "eval_lam": evaluation_lam(args),
        "eval_query": eval_query(args),
    }
    if args.eval_tasks:
        test_sampler = evaluation_sampler(test_sampler, args)
        indices = test_sampler.sample_indices(args.eval_tasks)  # the same tasks for both models
        start = time.perf_counter()
        results["test"] = summarise(evaluate(evaluator(model), test_sampler, indices,
                                             args.eval_batch)["accuracy"])
        results["test"]["seconds"] = time.perf_counter() - start
        if args.baseline:
            baseline = evaluator(build_model(args))
            results["baseline"] = summarise(evaluate(baseline, test_sampler, indices, args.eval_batch)["accuracy"])
    if choices:  # what "auto" ran, so that a figure says which kernels made it
        results["timed_choices"] = readable_choices(choices)
    if write:
        folder.write_json(folder.results, results)
    return results


def readable_choices(choices: dict) -> Dict[str, Dict[str, str]]:
    """IMAML.timed_choices() as JSON: per kind ("forward", "hvp"), each key's fields joined into one
    string (shape, dtype, grad mode, ...) and the mode chosen for it."""
    return {kind: {key_text(key): choice[kind] for key, choice in timed.items()} for kind, timed in choices.items()}


def _machine(device: str) -> str:
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__}"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}"


def format_results(args: RunConfig, results: Dict[str, object]) -> str:
    lines = []
    setting = f"{results.get('ways', args.ways)}-way {results.get('shots', args.shots)}-shot"
    if "test" in results:
        t = results["test"]
        protocol = f"{results['eval_query']} query images per class, lambda {results['eval_lam']:g}"
        lines.append(f"meta-test accuracy, {setting}, {t['tasks']} tasks ({protocol}): {t['accuracy']:.2f} ± "
                     f"{t['ci95']:.2f} % (95% CI)")
        if "baseline" in results:
            b = results["baseline"]
            lines.append(f"same adaptation from the random initialisation: {b['accuracy']:.2f} ± {b['ci95']:.2f} %")
    lines.append(f"run folder: {results['out']}")
    return "\n".join(lines)


