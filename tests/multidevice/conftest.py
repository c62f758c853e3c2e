"""Tests of the sharded programs on 8 CPU devices.

They need ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` set before JAX starts, so
``make test`` runs this folder in its own pytest process with it (the main run leaves the
folder out). Run by hand:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest tests/multidevice
"""

from __future__ import annotations

import jax
import pytest

N_DEVICES = 8


def pytest_collection_modifyitems(config, items):
    if jax.device_count() >= N_DEVICES:
        return
    reason = (f"needs {N_DEVICES} devices, found {jax.device_count()}: run with "
              f"XLA_FLAGS=--xla_force_host_platform_device_count={N_DEVICES} (make test does)")
    for item in items:
        if "multidevice" in str(item.fspath):
            item.add_marker(pytest.mark.skip(reason=reason))
