"""A CPU model actor computes on as many torch threads as the CPUs Ray reserved for it (ModelSpec.torch_threads=None)."""

from __future__ import annotations

import pytest

from pipeline.model.spec import ModelSpec
from pipeline.model.worker import cpu_threads


def test_explicit_threads_win(monkeypatch):
    monkeypatch.setenv("ICAR_TORCH_THREADS", "5")
    assert cpu_threads(ModelSpec(torch_threads=3)) == 3
    assert cpu_threads(ModelSpec()) == 5


def test_bad_env_names_the_variable(monkeypatch):
    monkeypatch.setenv("ICAR_TORCH_THREADS", "two")
    with pytest.raises(ValueError, match="ICAR_TORCH_THREADS"):
        cpu_threads(ModelSpec())


def test_outside_an_actor_one_thread(monkeypatch):
    monkeypatch.delenv("ICAR_TORCH_THREADS", raising=False)
    assert cpu_threads(ModelSpec()) == 1


def test_actor_threads_follow_its_cpu_reservation(ray_session, monkeypatch):
    ray = ray_session
    monkeypatch.delenv("ICAR_TORCH_THREADS", raising=False)

    @ray.remote
    class Probe:
        def threads(self, spec):
            import torch

            from pipeline.model.worker import cpu_threads

            torch.set_num_threads(cpu_threads(spec))
            return cpu_threads(spec), torch.get_num_threads()

    assert cpu_threads(ModelSpec()) == 1  # this driver, with Ray up, reserves nothing
    for cpus, spec, want in ((2, ModelSpec(), 2), (1, ModelSpec(), 1), (0.5, ModelSpec(), 1),
                             (2, ModelSpec(torch_threads=1), 1)):
        actor = Probe.options(num_cpus=cpus).remote()
        try:
            assert ray.get(actor.threads.remote(spec), timeout=120) == (want, want), (cpus, spec)
        finally:
            ray.kill(actor)
