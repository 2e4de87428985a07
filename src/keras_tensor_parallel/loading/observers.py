"""Called after each variable is placed, on every engine
(`memory.PeakMemory` and `place_torch.peak_ratio` sample here, so a peak
between two variables is never missed). Imports no backend."""

OBSERVERS: list = []


def notify() -> None:
    """Call every observer."""
    for observe in OBSERVERS:
        observe()
