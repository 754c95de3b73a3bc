"""Shared pieces of the meta-learning tests: an Env that feeds one task of a
[T, ...] batch per step, an Engine that steps it at each inner loop's start
(the tutorial's MAMLEngine.train_step), and the tutorial's query-loss Upper."""

import torch.nn.functional as F

from imaml_ext import Engine, Env, ImplicitProblem


class QueryUpper(ImplicitProblem):
    """The tutorial's Upper: the lower's query loss; keeps theta's gradient when it steps."""

    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.lower(x), y)

    def get_batch(self):
        return self.env.batch["test"]

    def grad_callback(self, params):
        self.captured = [p.grad.clone() for p in params]


class TaskEnv(Env):
    def __init__(self, tasks):
        super().__init__()
        self.tasks, self.index, self.batch = tasks, -1, None

    def step(self):
        self.index += 1
        sx, sy, qx, qy = (t[self.index] for t in self.tasks)
        self.batch = {"train": (sx, sy), "test": (qx, qy)}


def per_task_engine(inner_steps):
    class TaskEngine(Engine):
        def train_step(self):
            if self.global_step % inner_steps == 1 or inner_steps == 1:
                self.env.step()
            for leaf in self.leaves:
                leaf.step(global_step=self.global_step)

    return TaskEngine
