"""The training loop's plumbing, without Ray: the shard's batch cycle and the rates a resumed
stage takes (the loop itself runs for real in tests/test_distill.py, test_resume.py and
test_sweep.py)."""

from __future__ import annotations

import pytest
import torch

from dcm.config import ConfigError
from pipelines.train_loop import micro_batches, rate_schedule, rebase_schedule, set_rates


class Shard:
    """What ``ray.train.get_dataset_shard`` hands a worker, cut to ``iter_batches``:
    ``rows`` numbered rows in batches, the last partial batch dropped."""

    def __init__(self, rows: int) -> None:
        self.rows = rows

    def iter_batches(self, batch_size: int, batch_format: str, drop_last: bool):
        assert batch_format == "numpy" and drop_last
        for start in range(0, self.rows - batch_size + 1, batch_size):
            yield {"id": list(range(start, start + batch_size))}


def test_micro_batches_cycle_epochs_and_resume_mid_epoch():
    got = micro_batches(Shard(5), size=2, epoch=0, skip=0)
    seen = [(e, i, rows["id"]) for e, i, rows in (next(got) for _ in range(5))]
    # 5 rows in batches of 2: two whole batches an epoch (row 4 dropped), epochs go on
    assert seen == [
        (0, 0, [0, 1]), (0, 1, [2, 3]), (1, 0, [0, 1]), (1, 1, [2, 3]), (2, 0, [0, 1]),
    ]  # fmt: skip
    # a resumed run (epoch 3, one batch of it done) goes on from its data position
    resumed = micro_batches(Shard(5), size=2, epoch=3, skip=1)
    assert [(e, i) for e, i, _ in (next(resumed) for _ in range(3))] == [(3, 1), (4, 0), (4, 1)]


def test_a_shard_smaller_than_a_batch_is_one_clear_error():
    with pytest.raises(ConfigError, match="fewer than train.global_batch"):
        next(micro_batches(Shard(1), size=2, epoch=0, skip=0))


def test_a_resumed_stage_takes_the_configs_rates_for_student_and_discriminator():
    student = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    student.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-3})
    disc = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=2e-3)
    changed = set_rates({
        "train.lr_detail": (student, 2.5e-4),  # lowered after a divergence
        "train.lr_disc": (disc, 2e-3),  # unchanged: not reported
        "train.lr_semantic": (None, 1.0),  # no such optimiser in this stage
    })  # fmt: skip
    assert [g["lr"] for g in student.param_groups] == [2.5e-4, 2.5e-4]
    assert disc.param_groups[0]["lr"] == 2e-3
    assert changed == {"train.lr_detail": (1e-3, 2.5e-4)}


def test_cosine_rate_falls_to_zero_and_a_resume_rebases_it_on_the_configs_rate():
    """train.lr_decay='cosine': half a cosine over the stage; after a restore the config's
    rate is the new base at the restored step (the config wins, as with a constant rate)."""
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w], lr=0.4)
    assert rate_schedule(opt, "constant", 4) is None
    sched = rate_schedule(opt, "cosine", 4)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.4, 0.4 * (1 + 2**-0.5) / 2, 0.2, 0.4 * (1 - 2**-0.5) / 2])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    # a restored schedule at step 2 of 4, rebased from 0.4 to 0.1
    fresh = torch.optim.SGD([w], lr=0.4)
    restored = rate_schedule(fresh, "cosine", 4)
    state = sched.state_dict()
    state["last_epoch"] = 2
    restored.load_state_dict(state)
    assert rebase_schedule(restored, 0.1) == pytest.approx(0.4)
    assert fresh.param_groups[0]["lr"] == pytest.approx(0.05)
    fresh.step()
    restored.step()
    assert fresh.param_groups[0]["lr"] == pytest.approx(0.1 * (1 - 2**-0.5) / 2)
