"""Data parallelism: jit over a mesh and pmap give the 1-device loss curve and global BN statistics."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "parallel_probe.py")
STEPS = 20


def _probe(mode: str, devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    out = subprocess.run([sys.executable, PROBE, mode, str(STEPS)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == devices
    return result


@pytest.fixture(scope="module")
def runs():
    return {("jit", 1): _probe("jit", 1), ("jit", 8): _probe("jit", 8), ("pmap", 8): _probe("pmap", 8)}


@pytest.mark.parametrize("mode", ["jit", "pmap"])
def test_eight_devices_follow_the_one_device_loss_curve(runs, mode):
    one = np.array(runs[("jit", 1)]["losses"])
    eight = np.array(runs[(mode, 8)]["losses"])
    assert len(one) == len(eight) == STEPS
    assert one[-1] < one[0]  # it learns
    np.testing.assert_allclose(eight, one, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("mode", ["jit", "pmap"])
def test_batchnorm_statistics_are_those_of_the_global_batch(runs, mode):
    one = runs[("jit", 1)]["batch_stats"]
    eight = runs[(mode, 8)]["batch_stats"]
    assert set(one) == set(eight) and any("var" in k for k in one)
    for key in one:
        np.testing.assert_allclose(np.array(eight[key]), np.array(one[key]), rtol=2e-4, atol=2e-5, err_msg=key)
    # Every pmap replica holds the same statistics.
    assert runs[(mode, 8)]["device_spread"] == 0.0
