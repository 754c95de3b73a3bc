"""Run folder RUN's checkpoint adapted with other test-time inner steps and lambdas, on N validation tasks:
    python adaptation_steps.py RUN N STEPS,STEPS LAM,LAM   (lambda 0: plain SGD from theta)"""
import sys, dataclasses, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[4]))  # the repository root
torch.set_num_threads(1)
from imaml_ext.training.run_folder import RunFolder, read_checkpoint
from imaml_ext.training.arguments import recorded_run
from imaml_ext.training.tasks import make_tasks
from imaml_ext.training.learner import build_model, build_imaml
from imaml_ext.training.evaluation import evaluate, summarise
from imaml_ext.batched import MAML
folder = RunFolder(sys.argv[1])
ck = read_checkpoint(folder, "--evaluate")
run = recorded_run(ck["config"], "x")
run = dataclasses.replace(run, data=None, progress=False)
tasks = make_tasks(run, torch.device("cpu"))
model = build_model(run); model.load_state_dict(ck["model"])
val = tasks.valid if hasattr(tasks, "valid") else tasks.validation
idx = val.sample_indices(int(sys.argv[2]))
for steps in [int(s) for s in sys.argv[3].split(",")]:
    for lam in [float(l) for l in sys.argv[4].split(",")]:
        if lam == 0:
            l = MAML(model, inner_steps=steps, inner_lr=run.base_lr, first_order=True, ways=run.ways, check_labels=False, forward="loop")
        else:
            l = build_imaml(model, dataclasses.replace(run, inner_steps=steps, lam=lam, forward="loop", tuning_cache="none"))
        r = summarise(evaluate(l, val, idx, 16)["accuracy"])
        print(f"steps {steps} lam {lam}: {r['accuracy']:.2f} ± {r['ci95']:.2f} ({r['tasks']})", flush=True)
