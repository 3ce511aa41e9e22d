import pytest
import torch

from utils.batch_size import plan_batches, probe_max_batch_size


@pytest.mark.parametrize(
    "effective, max_batch, processes, expected",
    [
        (32, 16, 1, (16, 2)),  # the spec's example
        (32, 64, 1, (32, 1)),  # never larger than the effective batch
        (32, 22, 1, (16, 2)),  # even split rather than 22 + 10
        (32, 5, 1, (4, 8)),
        (32, 8, 2, (8, 2)),  # two processes share the effective batch
        (30, 64, 4, (8, 1)),  # rounded up to cover it
        (1, 64, 1, (1, 1)),
    ],
)
def test_plan_reaches_the_effective_batch(effective, max_batch, processes, expected):
    plan = plan_batches(effective, max_batch, processes)
    assert (plan.batch_size, plan.accumulation) == expected
    assert plan.batch_size <= max_batch
    assert plan.effective >= effective


def test_plan_describes_itself():
    plan = plan_batches(32, 16, 1, probed_max=16)
    assert plan.describe("NVIDIA T4, 14.6 GiB free") == (
        "batch 16 x accumulation 2 = effective 32 on NVIDIA T4, 14.6 GiB free (largest that fits: 16)"
    )


def test_cpu_has_nothing_to_probe():
    calls = []
    result = probe_max_batch_size(torch.nn.Linear(2, 2), lambda m, o, b: calls.append(b), torch.device("cpu"), limit=64)
    assert result == 64 and calls == []


@pytest.mark.gpu
def test_probe_on_gpu_finds_a_batch_that_fits():
    model = torch.nn.Conv2d(3, 8, 3, padding=1)
    device = torch.device("cuda")

    def step(m, optimizer, batch):
        x = torch.randn(batch, 3, 64, 64, device=device)
        m(x).square().mean().backward()
        optimizer.step()

    assert probe_max_batch_size(model, step, device, limit=64) == 64
