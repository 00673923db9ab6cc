"""MACs accounting with torch's own FLOP counter (MACs = FLOPs / 2), one image at the model's resolution."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where MACs are counted, so the accounting helpers stay light
    from torch import nn


def count_macs(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one forward pass of ``model`` on a [1, C, H, W] input."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_size))
    model.train(was_training)
    return int(counter.get_total_flops() // 2)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def cascade_macs(little_macs: float, big_macs: float, escalation_rate: float) -> float:
    """Expected MACs per image: little always runs, big on the escalated fraction."""
    return little_macs + escalation_rate * big_macs


def macs_saved(little_macs: float, big_macs: float, escalation_rate: float) -> float:
    """Fraction of big-alone MACs the cascade saves."""
    return 1.0 - cascade_macs(little_macs, big_macs, escalation_rate) / big_macs
