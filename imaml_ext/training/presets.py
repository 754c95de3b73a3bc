"""The iMAML paper's Omniglot and Mini-ImageNet settings as named presets: ``imaml-train --preset omniglot-5w1s``.

A preset sets the defaults of the options below; any option given on the command line
wins. The values, and where they come from:

- 5-way (1 and 5 shots): the iMAML authors' code, aravindr93/imaml_dev
  (examples/README.md, the command its authors give for the paper's table): 16 inner
  steps at lr 0.1, lambda 2, 5 CG steps with damping 1 (``--cg_damping 1 --lam_damping 10``
  here, this command line's spelling of the same system), 32 tasks per meta-step, Adam at
  1e-3, 20,000 meta-steps, and as many query images per class as support images.
- 20-way: the paper's Table 3 caption (Rajeswaran et al. 2019): iMAML-GD uses 25 inner
  steps for 20-way (16 for 5-way), lambda 2 and 5 CG steps. The paper does not give the
  20-way meta-batch; 16 is MAML's for 20-way Omniglot (Finn et al. 2017), which the paper
  compares against with the same network. The rest as for 5-way.

The model is the paper's Conv4 with 64 channels (``--hidden_size 64``). The table is
meta-test accuracy on 600 test tasks. The authors fine-tune at test time without the
proximal term (``measure_accuracy.py --lam 0.0``), and so do the Omniglot presets
(``--eval_lam 0``); without a preset, the final evaluation adapts as training does (lambda of
--lam). docs/accuracy-protocol.md sets their protocol beside ours.

Mini-ImageNet (``--task mini-imagenet``, docs/mini-imagenet.md): the iMAML paper reports
5-way 1-shot only, with the network of the prior work it compares against, MAML's: Conv4
with 32 channels on 84x84 RGB (``--hidden_size 32``; Finn et al. 2017, Section 5.2, which
also gives the values marked MAML below). The paper does not give its other Mini-ImageNet
values, so these are choices, not the paper's:

- lambda 2, 16 inner steps, 5 CG iterations with the authors' damping, Adam at 1e-3: iMAML's
  5-way Omniglot values above;
- inner learning rate 0.01, 15 query images per class, 4 tasks per meta-step (2 for 5-shot),
  60,000 meta-steps: MAML's Mini-ImageNet values;
- 600 test tasks, as for Omniglot (and MAML), adapted at test time as in training (lambda 2).

5-way 5-shot is the same with 5 shots and MAML's 5-shot meta-batch; the paper has no 5-shot
Mini-ImageNet figure.
"""

from __future__ import annotations

from typing import Dict

_COMMON = {
    "task": "omniglot", "split": "finn", "algo": "imaml", "base_lr": 0.1, "lam": 2.0, "cg_iterations": 5,
    "cg_damping": 1.0, "lam_damping": 10.0, "hidden_size": 64, "meta_lr": 1e-3, "optimizer": "adam",
    "scheduler": "none", "steps": 20000, "eval_tasks": 600, "eval_lam": 0.0,
}
_FIVE_WAY = {"ways": 5, "inner_steps": 16, "meta_batch_size": 32}
_TWENTY_WAY = {"ways": 20, "inner_steps": 25, "meta_batch_size": 16}

_MINI_IMAGENET = {
    "task": "mini-imagenet", "model": "conv4", "hidden_size": 32, "algo": "imaml", "ways": 5, "query": 15,
    "inner_steps": 16, "base_lr": 0.01, "lam": 2.0, "cg_iterations": 5, "cg_damping": 1.0, "lam_damping": 10.0,
    "meta_lr": 1e-3, "optimizer": "adam", "scheduler": "none", "steps": 60000, "eval_tasks": 600,
}

PRESETS: Dict[str, Dict[str, object]] = {
    "omniglot-5w1s": {**_COMMON, **_FIVE_WAY, "shots": 1, "query": 1},
    "omniglot-5w5s": {**_COMMON, **_FIVE_WAY, "shots": 5, "query": 5},
    "omniglot-20w1s": {**_COMMON, **_TWENTY_WAY, "shots": 1, "query": 1},
    "omniglot-20w5s": {**_COMMON, **_TWENTY_WAY, "shots": 5, "query": 5},
    "mini-imagenet-5w1s": {**_MINI_IMAGENET, "shots": 1, "meta_batch_size": 4},
    "mini-imagenet-5w5s": {**_MINI_IMAGENET, "shots": 5, "meta_batch_size": 2},
}

# Meta-test accuracy (%) beside which a run of each preset is reported (benchmarks/reproduce.py):
# the iMAML paper's Table 3 (iMAML, GD), and Betty's README (its implicit-MAML example).
PAPER_ACCURACY = {"omniglot-5w1s": 99.16, "omniglot-5w5s": 99.67, "omniglot-20w1s": 94.46, "omniglot-20w5s": 98.69}
BETTY_ACCURACY = {"omniglot-5w1s": 98.68, "omniglot-5w5s": 99.58, "omniglot-20w1s": 92.90, "omniglot-20w5s": 98.04}
