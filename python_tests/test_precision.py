"""IMAML(precision="bf16"): every forward under bfloat16 autocast, float32 master weights, phi,
gradients and CG. Its meta-gradient is compared with a float64 one, beside float32's error on
the same inputs, at a meta-trained theta (where training spends its steps) and at a random one.

Why the bound is loose: rounding phi to bfloat16 in the forward (8 bits of mantissa) loses
part of the inner loop's small displacement phi - theta, and at a random theta the meta-gradient
is sensitive to it (see the README's *Mixed precision*)."""

import copy
from pathlib import Path

import pytest
import torch

from imaml_ext import IMAML
from imaml_ext.models import Conv4
from test_batched import conv4, random_tasks

FIXTURE = Path(__file__).parent / "fixtures" / "conv4_32_omniglot_5w1s_demo.pt"  # `make demo`'s theta, 2026-11-28


def meta_gradient(model, batch, precision="fp32", double=False, steps=5, cg=5):
    model = copy.deepcopy(model)
    if double:
        model = model.double()
        batch = [t.double() if t.is_floating_point() else t for t in batch]
    IMAML(model, steps, 0.1, 2.0, cg, check_labels=False, cg_damping=1.0, lam_damping=10.0,
          precision=precision).meta_step(*batch)
    return torch.cat([p.grad.flatten().double() for p in model.parameters()])


def relative(a, b):
    return float((a - b).norm() / b.norm())


def cosine(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def omniglot(query):
    from imaml_ext.data import find_data_root, omniglot_tasks

    try:
        find_data_root()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    return omniglot_tasks(5, 1, query, seed=torch.initial_seed() % 2**31)


def test_bf16_meta_gradient_at_a_trained_theta_is_bounded():
    tasks = omniglot(query=5)
    model = Conv4(5, 32)
    model.load_state_dict(torch.load(FIXTURE, weights_only=True))
    batch = tasks.train.sample(8)
    exact = meta_gradient(model, batch, double=True)
    fp32, bf16 = meta_gradient(model, batch), meta_gradient(model, batch, "bf16")
    assert relative(fp32, exact) < 1e-3
    assert relative(bf16, exact) > 30 * relative(fp32, exact)  # bf16 really ran
    assert relative(bf16, exact) < 0.35 and cosine(bf16, exact) > 0.95

    # What training sees: adapted query accuracy over 100 test tasks, bf16 against float32.
    test = tasks.test.sample(100)
    accuracy = {p: IMAML(model, 5, 0.1, 2.0, 1, precision=p).evaluate(*test)[1].item() for p in ("fp32", "bf16")}
    assert abs(accuracy["bf16"] - accuracy["fp32"]) < 0.03, accuracy
    assert accuracy["fp32"] > 0.75, accuracy  # the demo run: 87 % on its meta-test, 60 % from its random start


def test_bf16_query_gradient_at_a_random_theta_is_bounded():
    """No inner step, one CG iteration: the query gradient itself, through one bf16 forward."""
    model = conv4(hidden=16, dtype=torch.float32)
    batch = random_tasks(4, dtype=torch.float32, query=3)
    exact = meta_gradient(model, batch, double=True, steps=0, cg=1)
    fp32, bf16 = meta_gradient(model, batch, steps=0, cg=1), meta_gradient(model, batch, "bf16", steps=0, cg=1)
    assert relative(fp32, exact) < 1e-4
    assert 30 * relative(fp32, exact) < relative(bf16, exact) < 0.35
    assert cosine(bf16, exact) > 0.93


def test_precision_arguments_are_checked():
    model = conv4(hidden=4, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"IMAML: precision must be one of 'fp32', 'bf16'; got 'fp16' \(fp16 needs a "
                                         r"loss scaler, not built yet"):
        IMAML(model, precision="fp16")
    with pytest.raises(ValueError, match=r"IMAML: precision must be one of 'fp32', 'bf16'; got 'half'$"):
        IMAML(model, precision="half")
    with pytest.raises(ValueError, match=r"precision='bf16' runs a float32 model's forward in bfloat16 .*got a model "
                                         r"with parameters of dtype torch.float64"):
        IMAML(conv4(hidden=4), precision="bf16")
