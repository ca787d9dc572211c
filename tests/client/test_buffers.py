"""Models with buffers: BatchNorm's running statistics travel, are aggregated and saved, so the saved model scores
what the run reported."""

import numpy as np
import torch
from torch import nn

from fedloom.build import build_clients, build_strategy
from fedloom.client.torch_work import TorchClientWork, get_params, param_names, set_params
from fedloom.config import load_config
from fedloom.paramfiles import load_params
from fedloom.simulation.runner import simulate

SETTINGS = ["data.dataset=\"digits\"", "data.partition=\"dirichlet\"", "data.num_clients=20", "model.name=\"mlp\"",
            "client.lr=0.05", "server.clients_per_round=5", "run.rounds=4", "eval.every=4"]


def batchnorm_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))


def test_buffers_travel_with_the_parameters():
    model = batchnorm_mlp()
    names = param_names(model)
    assert names[-2:] == ["2.running_mean", "2.running_var"] and "2.num_batches_tracked" not in names
    params = get_params(model)
    params[-2] = np.full(32, 3.0, np.float32)
    set_params(model, params)
    np.testing.assert_array_equal(model[2].running_mean.numpy(), np.full(32, 3.0))


def test_the_saved_model_scores_what_the_run_reported(tmp_path):
    cfg = load_config(None, [*SETTINGS, f"run.out_dir=\"{tmp_path}\""])
    result = simulate(cfg, progress=False, model_fn=batchnorm_mlp)
    names, arrays = load_params(result.run_dir / "model.npz")
    assert "2.running_mean" in names and not np.allclose(arrays[names.index("2.running_mean")], 0.0)
    fresh = batchnorm_mlp()
    fresh.load_state_dict(torch.load(result.run_dir / "model.pt", weights_only=True))
    work = TorchClientWork(lambda: fresh)
    x, y = build_clients(cfg)[1].test_union()
    assert work.evaluate_params(get_params(fresh), x, y).accuracy == result.final_accuracy
    other = TorchClientWork(batchnorm_mlp)
    assert other.evaluate_params(arrays, x, y).accuracy == result.final_accuracy  # model.npz by name order


def test_the_last_client_to_train_does_not_change_the_global_models_score():
    cfg = load_config(None, SETTINGS)
    _, data = build_clients(cfg)
    work = TorchClientWork(batchnorm_mlp)
    params = work.initial_params(0)
    x, y = data.test_union()
    before = work.evaluate_params(params, x, y)
    work.train(params, data[3], build_strategy(cfg, len(data)).train)  # moves the shared model's statistics
    assert work.evaluate_params(params, x, y) == before


def test_engines_agree_on_a_model_with_buffers():
    runs = [simulate(load_config(None, [*SETTINGS, f"engine.executor=\"{e}\"", "engine.workers=2"]), progress=False,
                     write=False, model_fn=batchnorm_mlp) for e in ("sequential", "vectorized", "process")]
    for other in runs[1:]:
        for a, b in zip(runs[0].params, other.params):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

