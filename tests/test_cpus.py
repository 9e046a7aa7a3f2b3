"""Thread sizing: the CPUs a process owns, and the governor that follows what other processes leave free."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hpc_calo import cpus


@pytest.fixture
def cpu_limits(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """Set (affinity CPUs, SLURM_CPUS_PER_TASK or None, cgroup cpu.max text or None)."""

    def limit(affinity: int, slurm: str | None, cpu_max: str | None) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)))
        if slurm is None:
            monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
        else:
            monkeypatch.setenv("SLURM_CPUS_PER_TASK", slurm)
        path = tmp_path / "cpu.max"
        if cpu_max is not None:
            path.write_text(cpu_max + "\n")
        monkeypatch.setattr(cpus, "CGROUP_CPU_MAX", str(path))

    return limit


@pytest.mark.parametrize(
    ("affinity", "slurm", "cpu_max", "owned"),
    [
        (8, None, None, 8),  # only the affinity mask
        (8, "3", None, 3),  # a SLURM task's share
        (8, None, "150000 100000", 2),  # a quota of 1.5 CPUs: a second thread still gets half a CPU
        (8, None, "max 100000", 8),  # no quota
        (2, "4", "400000 100000", 2),  # the mask is the smallest
        (8, "", "garbage", 8),  # unreadable values limit nothing
        (8, None, "50000 100000", 1),  # never below one
    ],
)
def test_owned_cpus_is_the_smallest_limit(cpu_limits, affinity, slurm, cpu_max, owned):
    cpu_limits(affinity, slurm, cpu_max)
    assert cpus.owned_cpus() == owned


@pytest.mark.parametrize(
    ("threads", "batches", "split"),
    [
        (2, 10, (2, 1)),  # a batch per thread
        (2, 1, (1, 2)),  # one batch: both threads inside it
        (8, 2, (2, 4)),
        (4, 3, (3, 1)),  # a leftover thread stays idle rather than unbalance the lanes
        (1, 5, (1, 1)),
    ],
)
def test_batch_lanes_prefer_whole_batches_per_thread(threads, batches, split):
    assert cpus.batch_lanes(threads, batches) == split


def test_torch_threads_follow_the_owned_cpus_unless_given(cpu_limits):
    import torch

    before = torch.get_num_threads()
    try:
        cpu_limits(8, "3", None)
        assert cpus.torch_threads() == 3 == torch.get_num_threads()
        assert cpus.torch_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_importing_hpc_calo_touches_neither_openmp_nor_torch():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = "import os, sys, hpc_calo; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.split() == ["None", "False"]


class FakeHost:
    """/proc/stat for two CPUs and this process's CPU time, advanced by hand: ``run(seconds, ours, others)``."""

    HZ = 100

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
        self.now, self.busy, self.idle, self.own = 0.0, [500, 500], [9000, 9000], 0.0
        self.path = tmp_path / "stat"
        self.write()
        monkeypatch.setattr(cpus, "PROC_STAT", str(self.path))
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
        monkeypatch.setattr(cpus, "own_ticks", lambda: self.own * self.HZ)
        monkeypatch.setattr(cpus.time, "sleep", lambda s: self.run(s, 0.0, 0.0))

    def write(self) -> None:
        total = [b + i for b, i in zip(self.busy, self.idle, strict=True)]
        lines = [f"cpu  {sum(self.busy)} 0 0 {sum(self.idle)} 0 0 0 0 0 0"]
        lines += [f"cpu{k} {b} 0 0 {i} 0 0 0 0 0 0" for k, (b, i) in enumerate(zip(self.busy, self.idle, strict=True))]
        self.path.write_text("\n".join(lines) + f"\nintr {sum(total)}\nctxt 1\n")

    def run(self, seconds: float, ours: float, others: float) -> None:
        """``ours`` and ``others``: CPUs each keeps busy over the next ``seconds``, spread over both CPUs."""
        ticks = round(seconds * self.HZ)
        for k in (0, 1):
            used = min(ticks, round((ours + others) / 2 * ticks))
            self.busy[k] += used
            self.idle[k] += ticks - used
        self.own += ours * seconds
        self.now += seconds
        self.write()


def test_the_governor_gives_up_a_thread_to_a_busy_competitor_and_takes_it_back(monkeypatch, tmp_path):
    host = FakeHost(monkeypatch, tmp_path)
    seen: list[int] = []
    gov = cpus.ThreadGovernor(2, set_threads=seen.append, clock=lambda: host.now)
    assert gov.start() == 2  # nothing else runs

    host.run(0.5, 2.0, 0.0)
    assert gov.poll() is None  # not a period yet
    host.run(0.5, 2.0, 0.0)
    assert gov.poll() is None and gov.others == 0.0  # a period: still free
    host.run(1.0, 1.5, 0.5)  # a competitor arrives and takes half a CPU from our spinning threads
    assert gov.poll() == 1 and gov.threads == 1 and seen[-1] == 1
    assert gov.others == pytest.approx(0.5)
    for _ in range(5):
        host.run(1.0, 1.0, 1.0)  # our thread on one CPU, the competitor on the other
        assert gov.poll() is None
    host.run(1.0, 1.0, 0.05)  # the competitor leaves; the kernel's own work stays under the threshold
    assert gov.poll() is None  # one look is not enough to add a thread back
    host.run(1.0, 1.0, 1.0)  # it was back: the count of agreeing looks starts again
    assert gov.poll() is None
    for expected in (None, None, 2):
        host.run(1.0, 1.0, 0.05)
        assert gov.poll() == expected
    assert seen == [2, 1, 2]


def test_the_governor_starts_with_the_cpus_others_leave_free(monkeypatch, tmp_path):
    host = FakeHost(monkeypatch, tmp_path)
    monkeypatch.setattr(cpus.time, "sleep", lambda s: host.run(s, 0.0, 1.0))
    seen: list[int] = []
    assert cpus.ThreadGovernor(2, set_threads=seen.append, clock=lambda: host.now).start() == 1
    assert seen == [2, 1]
    # given threads are exact: no look at the CPUs at all
    fixed = cpus.ThreadGovernor(2, governed=False, set_threads=seen.append, clock=lambda: host.now)
    assert fixed.start() == 2
    host.run(5.0, 1.0, 1.0)
    assert fixed.poll() is None and fixed.threads == 2


def test_the_governor_keeps_the_ceiling_where_proc_stat_is_unreadable(monkeypatch, tmp_path):
    host = FakeHost(monkeypatch, tmp_path)
    monkeypatch.setattr(cpus, "PROC_STAT", str(tmp_path / "missing"))
    gov = cpus.ThreadGovernor(2, set_threads=lambda n: None, clock=lambda: host.now)
    assert gov.start() == 2
    host.run(2.0, 1.0, 1.0)
    assert gov.poll() is None and gov.threads == 2


def _flow3_step(preset: str):
    import torch

    from bench.train import raw_pairs
    from hpc_calo.flows.presets import get_preset
    from hpc_calo.geometry import DS2
    from hpc_calo.models import FlowModel

    model, b = FlowModel.from_preset(3, DS2, preset), get_preset(preset).batch_size

    def loss(g: torch.Generator) -> torch.Tensor:
        return model(raw_pairs(DS2.voxels_per_layer, b, g))

    return model, loss


def _classifier_step():
    import torch

    from hpc_calo.evaluate.classifier import ClassifierConfig, build_dnn

    model, dim = build_dnn(1 + 6480, ClassifierConfig()), 1 + 6480

    def loss(g: torch.Generator) -> torch.Tensor:
        x, y = torch.rand(500, dim, generator=g), (torch.rand(500, generator=g) > 0.5).float()
        return torch.nn.functional.binary_cross_entropy_with_logits(model(x).reshape(-1), y)

    return model, loss


@pytest.mark.parametrize("case", ["flow3-tiny", "flow3-small", "classifier"])
def test_training_steps_do_not_depend_on_the_thread_count(case):
    """What lets the governor change the count mid-run: a run stays bit-exact (and resumes so) whatever it did.
    The flows of ``hpc_calo.train`` and the evaluation's classifier, the two loops it governs."""
    import torch

    def train(schedule: list[int]) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model, loss_of = _classifier_step() if case == "classifier" else _flow3_step(case.removeprefix("flow3-"))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
        g = torch.Generator().manual_seed(0)
        for n in schedule:
            torch.set_num_threads(n)
            loss = loss_of(g)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    before = torch.get_num_threads()
    try:
        one, two, mixed = train([1, 1, 1]), train([2, 2, 2]), train([1, 2, 1])
    finally:
        torch.set_num_threads(before)
    for a, b, c in zip(one, two, mixed, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
