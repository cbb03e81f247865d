"""Where a call of a denoiser sits in a generation: the runtimes that keep per-step state share this."""

from __future__ import annotations


class StepSlots:
    """The denoising step and the *slot* of the current call (its position within the step).

    Inside a pipeline the scheduler hook sets ``step_hooked`` and calls ``end_step()`` after each step; a
    two-call CFG pipeline then makes two calls per step, slots 0 (conditional) and 1 (unconditional). A bare
    module has one slot. ``next_call()`` runs on every call, also the ones another cfg rank computes, so
    slots stay aligned across ranks."""

    step_hooked = False

    def reset_steps(self) -> None:
        self.step = 0
        self.call_in_step = 0
        self.slot = 0

    def end_step(self) -> None:
        self.step += 1
        self.call_in_step = 0

    def next_call(self) -> None:
        self.slot = self.call_in_step if self.step_hooked else 0
        self.call_in_step += 1
