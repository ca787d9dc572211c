"""The vectorized engine on a GPU gives what sequential CPU training gives (skipped without CUDA)."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from benchmarks.workloads import WORKLOADS
from fedloom.simulation.runner import simulate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("name", ["wa", "wb"])
def test_cuda_vectorized_equals_cpu_sequential(name):
    cfg = WORKLOADS[name].config
    cfg = replace(cfg, run=replace(cfg.run, rounds=3), eval=replace(cfg.eval, every=3))
    cpu = simulate(cfg, progress=False, write=False)
    gpu = simulate(replace(cfg, engine=replace(cfg.engine, executor="vectorized", device="cuda")), progress=False,
                   write=False)
    for a, b in zip(cpu.params, gpu.params):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    assert gpu.final_accuracy == pytest.approx(cpu.final_accuracy, abs=2e-3)
