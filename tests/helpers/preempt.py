"""Preemption for the exit-training tests: the trainer dies right after it checkpoints its first epoch."""

from __future__ import annotations

from pipeline.training import exits as et


def preempt_after_first_epoch(monkeypatch, saves: list | None = None):
    """Make ExitTrainer raise KeyboardInterrupt right after it checkpoints epoch 0, as a preempted node would;
    ``saves`` (if given) collects every checkpointed epoch. Returns the real ``_save_checkpoint``."""
    original = et.ExitTrainer._save_checkpoint

    def crash_after_first_epoch(self, epoch, *args):
        original(self, epoch, *args)
        if saves is not None:
            saves.append(epoch)
        if epoch == 0:
            raise KeyboardInterrupt("preempted")

    monkeypatch.setattr(et.ExitTrainer, "_save_checkpoint", crash_after_first_epoch)
    return original
