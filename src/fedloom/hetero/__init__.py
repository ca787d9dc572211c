"""Device heterogeneity: per-client device profiles, simulated task durations and populations.

A :class:`DeviceProfile` says how fast a virtual client computes and communicates and when it is
online; :func:`task_duration` turns a profile and the real sizes of a task into simulated seconds
(host speed never enters). :func:`mobile` and :func:`silo` draw seeded populations;
:func:`load_population` reads one from a CSV or JSON trace.
"""

from fedloom.hetero.profiles import (
    DAY_S,
    REFERENCE_FLOPS,
    Availability,
    DeviceProfile,
    load_population,
    mobile,
    silo,
    task_duration,
)

__all__ = [
    "DAY_S",
    "REFERENCE_FLOPS",
    "Availability",
    "DeviceProfile",
    "load_population",
    "mobile",
    "silo",
    "task_duration",
]
