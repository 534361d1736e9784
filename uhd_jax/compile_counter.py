"""Counts XLA compilations, to check that steady-state steps do not recompile."""

import contextlib
import threading

import jax

_EVENT = "/jax/core/compile/backend_compile_duration"
_lock = threading.Lock()
_counters: list["CompileCounter"] = []
_registered = False


class CompileCounter:
    count: int = 0


def _listener(event, duration, **kwargs):
    if event == _EVENT:
        with _lock:
            for c in _counters:
                c.count += 1


@contextlib.contextmanager
def count_compilations():
    """`with count_compilations() as c: ...` then `c.count` is the number of backend compiles inside."""
    global _registered
    with _lock:
        if not _registered:
            jax.monitoring.register_event_duration_secs_listener(_listener)
            _registered = True
        c = CompileCounter()
        _counters.append(c)
    try:
        yield c
    finally:
        with _lock:
            _counters.remove(c)
