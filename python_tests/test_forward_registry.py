"""The forward registry (imaml_ext/batched/forwards): names, parsing of recorded labels, the one
"auto" table, the docs' lists, and adding a forward by one file, the docs' worked example, run here
and checked against the loop in float64."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from imaml_ext import EngineConfig
from imaml_ext.batched import IMAML, forwards, stacked
from imaml_ext.training.arguments import build_parser

DOCS = Path(__file__).resolve().parents[1] / "docs" / "batched-imaml.md"
f64 = torch.float64


def test_names_labels_and_the_one_auto_table():
    assert forwards.names() == ("auto", "vmap", "loop", "stacked", "im2col", "channels_last", "loop+fused",
                                "vmap+fused", "stacked+fused", "im2col+fused")
    plan = forwards.parse("stacked/8+fused")
    assert (plan.forward.name, plan.fused, plan.chunk, plan.label) == ("stacked", True, 8, "stacked/8+fused")
    for bad in ("channels_last+fused", "fast", "stacked/0", "stacked/x", "auto"):
        with pytest.raises(ValueError, match=re.escape(f"got {bad!r}")):
            forwards.parse(bad)
    assert [p.label for p in forwards.auto_plans("cpu", fusable=False, num_tasks=16)] == [
        "loop", "stacked", "stacked/8", "stacked/4"]
    assert [p.label for p in forwards.auto_plans("cpu", fusable=True, num_tasks=4, chunks=False)] == [
        "loop", "stacked", "loop+fused", "stacked+fused"]
    assert [p.label for p in forwards.auto_plans("cuda", fusable=True, num_tasks=32)] == [
        "vmap", "stacked", "im2col", "channels_last"]
    assert forwards.auto_plans("mps", fusable=True, num_tasks=4) == []


def test_register_refuses_a_taken_or_malformed_name(scratch_registry):
    for name in ("stacked", "auto", "a/b", "a+b", ""):
        with pytest.raises(ValueError, match=re.escape(f"got {name!r}")):
            forwards.register(forwards.Forward(name, "x"))
    with pytest.raises(TypeError, match="register: forward must be a Forward; got str"):
        forwards.register("stacked")
    with pytest.raises(ValueError, match="add_conv2d_rule: kind must be a new name starting with 'conv2d'; got 'conv2d'"):
        stacked.add_conv2d_rule("conv2d", lambda *a: None, lambda a: True)
    with pytest.raises(ValueError, match=r"StackedLayers: conv2d_rules must be a sequence of conv2d rules .*got 'conv2d'"):
        stacked.StackedLayers("conv2d")


def test_help_and_docs_list_every_registered_forward():
    help_text = " ".join(build_parser().format_help().split())
    docs = DOCS.read_text()
    for forward in forwards.registered():
        assert " ".join(forward.summary.split()) in help_text, forward.name
        assert f'- `"{forward.name}"`' in docs, forward.name


def example_block() -> str:
    text = DOCS.read_text()
    start = text.index("<!-- example: adding a forward -->")
    return text[start:].split("```python\n", 1)[1].split("```", 1)[0]


def conv_net():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, stride=2), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, dilation=2), nn.Flatten(), nn.Linear(4 * 3 * 3, 3)).to(f64)


def test_the_docs_example_adds_a_forward_that_every_entry_point_takes_and_that_equals_the_loop(scratch_registry,
                                                                                               monkeypatch):
    exec(compile(example_block(), str(DOCS), "exec"), {"__name__": "docs_example"})
    assert "unfold" in forwards.names() and "unfold+fused" in forwards.names()
    assert EngineConfig(task_batching_forward="unfold+fused").task_batching_forward == "unfold+fused"
    assert build_parser().parse_args(["--forward", "unfold"]).forward == "unfold"
    ran = []
    rule = stacked._RULES["conv2d_unfold"]
    monkeypatch.setitem(stacked._RULES, "conv2d_unfold", (lambda *a: ran.append(1) or rule[0](*a), *rule[1:]))
    torch.manual_seed(0)
    model = conv_net()
    batch = (torch.randn(4, 3, 1, 28, 28, dtype=f64), torch.randint(0, 3, (4, 3)),
             torch.randn(4, 3, 1, 28, 28, dtype=f64), torch.randint(0, 3, (4, 3)))
    grads = {}
    for forward in ("loop", "unfold", "unfold+fused"):
        for hvp in ("reverse", "forward"):
            copied = copy.deepcopy(model)
            IMAML(copied, inner_steps=2, cg_iterations=3, check_labels=False, forward=forward, hvp=hvp).meta_step(*batch)
            grads[forward, hvp] = torch.cat([p.grad.flatten() for p in copied.parameters()])
    assert ran  # the first convolution ran by the example's rule (the dilated one too: unfold takes dilation)
    reference = grads["loop", "reverse"]
    for key, grad in grads.items():
        assert torch.allclose(grad, reference, rtol=1e-10, atol=1e-12), key
