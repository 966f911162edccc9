"""CUDA-event timing shared by the PyTorch GPU scripts in this folder."""

import statistics

import torch


def timed(fn, launches, repeats):
    """Median milliseconds per call of fn, over `repeats` samples of `launches` calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(repeats):
        start.record()
        for _ in range(launches):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / launches)
    return statistics.median(samples)
