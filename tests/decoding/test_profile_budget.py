"""The verify-cost profile behind --verify auto keeps to its time budget on a slow target."""

import pytest
import torch

from spectool.decoding.draft_length import profile_verify_cost, profiled_sizes


class SlowSession:
    """A target session whose forward over n tokens takes ``base + per_token * n`` seconds of a fake clock."""

    def __init__(self, clock, base, per_token):
        self.clock, self.base, self.per_token = clock, base, per_token
        self.model = torch.nn.Embedding(50, 4)
        self.model.get_input_embeddings = lambda: self.model
        self.length, self.forwards = 0, 0

    def forward(self, ids):
        self.clock[0] += self.base + self.per_token * ids.shape[1]
        self.length += ids.shape[1]
        self.forwards += 1

    def crop(self, length):
        self.length = length

    def reset(self):
        self.length = 0


@pytest.mark.parametrize(
    ("base", "per_token", "sweeps"),
    [(0.5, 0.01, 1), (0.001, 0.0001, 7), (0.01, 0.0003, 3)],
    ids=["slow", "fast", "mid"],
)
def test_profile_keeps_to_its_time_budget(monkeypatch, base, per_token, sweeps):
    """A slow target (a large model on a CPU) gets fewer sweeps and, past the budget, fewer sizes, interpolated;
    the profile still covers every size and follows the (linear) cost."""
    from spectool.decoding import draft_length

    clock = [0.0]
    monkeypatch.setattr(draft_length.time, "perf_counter", lambda: clock[0])
    session = SlowSession(clock, base, per_token)
    profile = profile_verify_cost(session, 40, context_length=8, budget_seconds=2.0)
    warm_up = 3  # the context, then 1, 1 and 40 tokens
    assert clock[0] <= 2.0 + (base + 40 * per_token) * warm_up + base + 8 * per_token
    timed_forwards = session.forwards - 1 - warm_up
    sizes = draft_length.profiled_sizes(40, int(2.0 / (base + 20.5 * per_token)))
    assert timed_forwards == sweeps * len(sizes)
    assert (len(sizes) < 40) == (sweeps == 1)
    assert len(profile.seconds) == 40 and session.length == 0
    for n, seconds in enumerate(profile.seconds, start=1):
        assert seconds == pytest.approx(base + per_token * n)


def test_profiled_sizes_keep_both_ends():
    assert profiled_sizes(5, 10) == [1, 2, 3, 4, 5]
    sizes = profiled_sizes(61, 6)
    assert sizes[0] == 1 and sizes[-1] == 61 and len(sizes) <= 7 and sizes == sorted(set(sizes))
    assert profiled_sizes(61, 0)[:: len(profiled_sizes(61, 0)) - 1] == [1, 61]
