"""Process-wide guards for libraries that are not safe with many cycles on threads.

DSPy 3.4's `Evaluate.__call__` and `ParallelExecutor.execute` call
`tqdm.tqdm._instances.clear()` without tqdm's lock. With concurrent cycles another
thread's bar can vanish from the registry between tqdm's `__new__` (add) and `__init__`
(remove), and that `__init__` raises `KeyError: <weakref ...>`: about one cycle in 300
failed that way in a 32-thread batch (and one Evaluate in four in a tight loop).
"""

from __future__ import annotations

import threading
import weakref

_installed = False
_install_lock = threading.Lock()


def guard_tqdm_registry() -> None:
    """Make tqdm's bar registry tolerate DSPy's unlocked `clear()` (idempotent)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        import tqdm

        class _Registry(weakref.WeakSet):
            def clear(self) -> None:
                with tqdm.tqdm.get_lock():
                    super().clear()

            def remove(self, item: object) -> None:
                self.discard(item)  # already cleared away by another thread: fine

        with tqdm.tqdm.get_lock():
            tqdm.tqdm._instances = _Registry(tqdm.tqdm._instances)
        _installed = True
