"""``EngineConfig(roll_back=True)``: Betty 0.2's warm start. A problem with parents caches its
state when its inner loop starts (``StepSchedule.roll_back_cache``) and, after its parents'
step, goes back to it and steps once more on its last batch with the updated parents."""

from __future__ import annotations

import copy


class RollBack:
    """``Problem``'s roll-back: Betty's ``cache_states``, ``recover_states``, ``step_after_roll_back``."""

    def cache_states(self) -> None:
        """Keeps the module's parameters and buffers and the optimizer's state at the inner loop's start."""
        optimizer = None if self.optimizer is None else copy.deepcopy(self.optimizer.state_dict())
        self.schedule.roll_back_cache = (copy.deepcopy(self.module.state_dict()), optimizer)

    def recover_states(self) -> None:
        """Restores what ``cache_states`` kept (and forgets it)."""
        cache, self.schedule.roll_back_cache = self.schedule.roll_back_cache, None
        if cache is None:
            raise RuntimeError(f'problem "{self.name}": recover_states() without a cache_states() before it')
        module, optimizer = cache
        self.module.load_state_dict(module)
        if optimizer is not None:
            self.optimizer.load_state_dict(optimizer)

    def step_after_roll_back(self) -> None:
        """After the parents' step: back to the inner loop's start, one step on the last batch with
        the updated parents, the scheduler's step; then the same for the parents (Betty's order)."""
        if self.check_ready() and self.schedule.training and self.schedule.roll_back:
            self.recover_states()
            self.one_step_descent(batch=self.cur_batch)
            self.step_scheduler()
            for parent in self._parents:
                parent.schedule.mark_ready(parent.children.index(self))
                parent.step_after_roll_back()
        self.schedule.reset_ready(len(self._children))


__all__ = ["RollBack"]
