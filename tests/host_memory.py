"""Shared test probe: how many tensors read from a checkpoint are still alive when the next is read."""

import gc
import weakref

from grok.checkpoint import pickles


class LiveTensors:
    """Patches `pickles.load_tensor` (for one test) to count, before each read, the earlier
    tensors still referenced; `peak` is the most seen, `reads` the number of reads."""

    def __init__(self, monkeypatch) -> None:
        self.peak = 0
        self._alive: list[weakref.ref] = []
        original = pickles.load_tensor

        def tracking_load(path):
            gc.collect()
            self.peak = max(self.peak, sum(ref() is not None for ref in self._alive))
            weight = original(path)
            self._alive.append(weakref.ref(getattr(weight, "weight", weight)))
            return weight

        monkeypatch.setattr(pickles, "load_tensor", tracking_load)

    @property
    def reads(self) -> int:
        return len(self._alive)
