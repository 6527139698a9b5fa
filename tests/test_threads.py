"""ThreadGovernor: probes 1 and n threads, keeps the faster, probes again (doubling gaps,
or at once when a step turns slow).  A fake clock stands for the load: each step costs
what the current load says for the thread count torch is set to."""

import torch

from mendis_ray.train.threads import ThreadGovernor


class Load:
    """A clock whose steps cost ``cost[threads]`` seconds under the current load."""

    def __init__(self, cost: dict[int, float]) -> None:
        self.t, self.cost = 0.0, cost

    def __call__(self) -> float:
        return self.t

    def step(self, gov: ThreadGovernor) -> int:
        gov.before_step()
        n = torch.get_num_threads()
        self.t += self.cost[n]
        gov.after_step()
        return n


def test_the_faster_setting_wins_and_a_change_of_load_is_followed():
    initial = torch.get_num_threads()
    idle, busy = {1: 1.3, 4: 1.0}, {1: 1.3, 4: 40.0}
    load = Load(idle)
    gov = ThreadGovernor(n_max=4, probe=3, first_gap=10, max_gap=40, clock=load)
    try:
        used = [load.step(gov) for _ in range(6)]
        assert used == [1, 1, 1, 4, 4, 4]  # the probe: one thread first
        assert [load.step(gov) for _ in range(10)] == [4] * 10  # idle: every core
        assert [load.step(gov) for _ in range(6)] == [1, 1, 1, 4, 4, 4]  # probe again
        assert gov.gap == 20  # the same winner: twice the gap
        load.cost = busy  # another process takes a core: the next step is slow
        assert load.step(gov) == 4
        assert [load.step(gov) for _ in range(6)] == [1, 1, 1, 4, 4, 4]  # probed at once
        assert [load.step(gov) for _ in range(10)] == [1] * 10 and gov.gap == 10
        load.cost = idle
        while gov.left > 0:  # one thread stays until its gap ends (its steps are not slow)
            assert load.step(gov) == 1
        [load.step(gov) for _ in range(6)]
        assert gov.choice == 4
    finally:
        gov.restore()
    assert torch.get_num_threads() == initial


def test_one_thread_machines_are_left_alone():
    initial = torch.get_num_threads()
    gov = ThreadGovernor(n_max=1)
    for _ in range(5):
        gov.before_step()
        gov.after_step()
    assert not gov.active and not gov.history and torch.get_num_threads() == initial
