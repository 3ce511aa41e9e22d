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
@pytest.mark.parametrize("share, expected", [(1 / 24, 16), (1 / 48, 32)])
def test_probe_on_gpu_finds_the_largest_batch_memory_allows(share, expected):
    """Each sample of the step holds ``share`` of the usable memory (as activations would): batch ``expected``
    takes 2/3 of it and twice that cannot fit (out of memory or past the 0.9 headroom), whatever the card."""
    device = torch.device("cuda")
    free, total = torch.cuda.mem_get_info(device)
    per_sample = int(min(free, 0.9 * total) * share)
    model = torch.nn.Linear(16, 16)
    tried = []

    def step(m, optimizer, batch):
        tried.append(batch)
        activations = torch.empty(batch * per_sample, dtype=torch.uint8, device=device)  # the batch's activations
        x = torch.randn(batch, 16, device=device)
        (m(x).square().mean() + 0 * activations[:1].float().sum()).backward()
        optimizer.step()

    assert probe_max_batch_size(model, step, device, limit=1024) == expected
    assert tried == [2**k for k in range(expected.bit_length() + 1)]  # doubling, stopped by memory, not by the limit
