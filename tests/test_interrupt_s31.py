"""Interruptions after the session-31 interrupt hunt: a Ctrl-C closes the refit/repair progress bar (the exit line
gets a line of its own)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_mudsc.apply import refit, repair
from hf_mudsc.solve.matchers import Match
from hf_mudsc.spec import Group, HookPoint, Member, PermutationSpec

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------- 1: Ctrl-C inside the refit/repair bar closes it
class TwoLayers(nn.Module):
    """fc1 -> ReLU -> fc2 -> LayerNorm: enough for a refit and a repair of two steps."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2, self.norm = nn.Linear(3, 4), nn.Linear(4, 3), nn.LayerNorm(3)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc2(torch.relu(self.fc1(x))))


SPEC = PermutationSpec(groups=(
    Group("residual", 3, (Member("fc2.weight", 0, "out"), Member("fc2.bias", 0, "out"),
                          Member("norm.weight", 0, "out"), Member("norm.bias", 0, "out")),
          (HookPoint("norm", "output"),)),
    Group("mlp", 4, (Member("fc1.weight", 0, "out"), Member("fc1.bias", 0, "out"), Member("fc2.weight", 1, "in")),
          (HookPoint("fc2", "input"),), width_key="intermediate_size"),
))


def _match(clusters: list[int], merged: int) -> Match:
    return Match(cluster_of=torch.tensor(clusters), merge_weight=torch.full((len(clusters),), 0.5,
                                                                            dtype=torch.float64),
                 num_merged=merged, value=1.0)


@pytest.mark.parametrize("stage", ["refit", "repair"])
def test_ctrl_c_inside_the_refit_or_repair_loop_closes_its_progress_bar(stage, monkeypatch):
    """The bar was closed after the try/finally: a Ctrl-C left it open, and the CLI's exit line was drawn onto it."""
    module = refit if stage == "refit" else repair
    bars = []

    class Recorded(module.Progress):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.closed = False
            bars.append(self)

        def close(self) -> None:
            self.closed = True
            super().close()

    monkeypatch.setattr(module, "Progress", Recorded)
    generator = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(7, 3, generator=generator)} for _ in range(2)]

    def batches():
        if bars:  # a pass inside the bar's loop: Ctrl-C
            raise KeyboardInterrupt
        return iter(data)

    merged, parents = TwoLayers(3), [TwoLayers(1), TwoLayers(2)]
    matches = [_match([1, 0, 2, 2, 1, 0], 3), _match([2, 0, 3, 1, 0, 3, 1, 2], 4)]
    with pytest.raises(KeyboardInterrupt):
        if stage == "refit":
            refit.refit_model(merged, parents, SPEC, matches, batches, progress=True)
        else:
            repair.repair_model(merged, parents, SPEC, matches, batches, scope="all", progress=True)
    assert len(bars) == 1 and bars[0].closed
