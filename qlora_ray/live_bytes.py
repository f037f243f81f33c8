"""Live tensor bytes of whatever runs inside `with counter.mode():`, exact to the storage.

A `TorchDispatchMode` sees every aten op's outputs (forward, backward, recomputation,
optimizer, bitsandbytes' torch.library ops); each new storage is added, and a weakref
finalizer subtracts it when freed. On a GPU the same sum is `torch.cuda.memory_allocated()`
before rounding (docs/memory.md, "Measuring without a GPU", says why not torch.profiler).
"""

from __future__ import annotations

import gc
import weakref
from collections import Counter
from typing import Any


def _storage(t: Any) -> Any:
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, meta, functional wrappers
        return None


class LiveBytes:
    """Live tensor bytes, counted per storage, with an event log to explain the peak.

    Use `with counter.mode():` around the code to watch. `mark()` starts a new phase: its
    peak is measured from the bytes live at that moment.
    """

    def __init__(self) -> None:
        self.live: dict[int, tuple[int, int]] = {}  # storage key -> (bytes, tag index)
        self.current = 0
        self.peak = 0
        self.tags: list[str] = []
        self._tag_ids: dict[str, int] = {}
        self.events: list[tuple[int, int, int]] = []  # (storage key, +bytes / -bytes, tag)
        self._peak_event = 0
        self.ops: set[str] = set()
        # Named stretches of a phase (`region`), each with its own peak and its event index.
        self.region: str | None = None
        self.region_peaks: dict[str, tuple[int, int]] = {}

    def _tag(self, text: str) -> int:
        if text not in self._tag_ids:
            self._tag_ids[text] = len(self.tags)
            self.tags.append(text)
        return self._tag_ids[text]

    def add(self, t: Any, tag: str) -> None:
        st = _storage(t)
        if st is None or t.device.type == "meta":
            return
        key = st._cdata
        if key in self.live:
            return
        n = st.nbytes()
        tid = self._tag(tag)
        self.live[key] = (n, tid)
        self.current += n
        self.events.append((key, n, tid))
        if self.current > self.peak:
            self.peak = self.current
            self._peak_event = len(self.events)
        if self.region is not None and self.current > self.region_peaks.get(self.region, (0, 0))[0]:
            self.region_peaks[self.region] = (self.current, len(self.events))
        weakref.finalize(st, self._free, key)

    def set_region(self, name: str | None) -> None:
        """From now on, peaks also count toward region `name`."""
        self.region = name
        if name is not None and self.current > self.region_peaks.get(name, (0, 0))[0]:
            self.region_peaks[name] = (self.current, len(self.events))

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.current -= entry[0]
            self.events.append((key, -entry[0], entry[1]))

    def register_alive(self, tag: str = "static") -> int:
        """Count every tensor the garbage collector can reach; returns their bytes."""
        import warnings

        import torch

        gc.collect()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # isinstance() on deprecated module attributes warns
            for obj in gc.get_objects():
                try:
                    if isinstance(obj, torch.Tensor):
                        self.add(obj, f"{tag} {obj.dtype}")
                except (ReferenceError, RuntimeError):
                    continue
        return self.current

    def mark(self) -> None:
        """Start a phase: its peak counts from what is live now."""
        gc.collect()
        self.peak = self.current
        self._peak_event = len(self.events)

    def composition_at_peak(self, top: int = 40, region: str | None = None) -> list[tuple[str, int]]:
        """Bytes live at the current phase's peak (or a region's), by tag, largest first."""
        end = self._peak_event if region is None else self.region_peaks.get(region, (0, 0))[1]
        live: dict[int, tuple[int, int]] = {}
        for key, n, tid in self.events[:end]:
            if n > 0:
                live[key] = (n, tid)
            else:
                live.pop(key, None)
        by_tag: Counter[str] = Counter()
        for n, tid in live.values():
            by_tag[self.tags[tid]] += n
        return by_tag.most_common(top)

    def mode(self) -> Any:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                out = func(*args, **(kwargs or {}))
                name = func.overloadpacket.__name__
                if "attention" in name or "gemm" in name or "dequantize" in name:
                    counter.ops.add(name)
                backward = torch._C._current_graph_task_id() != -1
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        counter.add(t, f"{'bwd' if backward else 'fwd'} {name} {str(t.dtype)[6:]} "
                                                   f"{list(t.shape)}")
                return out

        return _Mode()
