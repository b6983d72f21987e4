"""Zero forgetting, proven on two tasks learned in sequence (tiny backbone, real offline data).

For every mask method, task 1's test-set predictions after task 2 are identical
(not only the accuracy) and the backbone's integer levels are byte-identical;
`finetune_shared` on the same two tasks forgets measurably, so the test can fail.
"""

from __future__ import annotations

import copy

import pytest
import torch

from project import tiny_params
from xbar.data import load_task_data
from xbar.methods import (build_task_model, chip_view, crossbar_spec, deploy_cells, export_task, get,
                          load_task_model, names, quantized_net, train_task)
from xbar.params import parse_params
from xbar.ranking import rank_batch, rank_pes
from xbar.training import predict, seed_everything

pytestmark = pytest.mark.slow  # trains 12 small tasks: minutes on 2 cores

METHODS = [m for m in names() if get(m).gated]  # every method the no-forgetting gate holds to


def level_bytes(levels: dict) -> bytes:
    return b"".join(levels[k]["levels"].numpy().tobytes() + levels[k]["scale"].numpy().tobytes()
                    for k in sorted(levels))


@pytest.fixture(scope="module")
def setup():
    from tiny_backbone import pretrained_backbone

    # per-task BN: the harder case for forgetting (each task.pt holds its own BN); a backbone with features,
    # so every method trains (on a random one the divergence guard can stop a mask method)
    raw = tiny_params({"first": {"dataset": "optdigits", "epochs": 2}, "second": {"dataset": "lfw_faces", "epochs": 2}})
    raw["train"]["bn"] = "per_task"
    raw["model"]["width"] = 8  # at width 4, XBM's binary column masks ended above the closed-form head (the guard)
    params = parse_params(raw)
    _, quant, levels = pretrained_backbone(width=params.model.width)
    seed_everything(0, 2)
    data = {name: load_task_data(spec.dataset, 0) for name, spec in params.tasks.items()}
    return params, quant, levels, data


def learn(params, quant, levels, data, task: str, method: str, start: dict | None = None) -> dict:
    spec = params.tasks[task].model_copy(update={"method": method})
    seed_everything(params.seed, params.train.threads)
    spare = None
    if method == "xma2":
        net = quantized_net(params, quant["num_classes"], 1)
        net.load_state_dict(quant["state_dict"])
        deploy_cells(net, levels, crossbar_spec(params))
        x, y = rank_batch(data[task].train, spec.rank_batch_size, params.seed)
        table, _ = rank_pes(net, x, y, data[task].num_classes, spec.spare_ratio)
        spare = torch.tensor(table.filter(table["selected"])["pe"].to_list())
    model = build_task_model(params, spec, quant, levels, data[task].num_classes, spare_pes=spare, start=start)
    train_task(model, data[task].train, spec, params.train, params.seed, f"{task} {method}")
    return export_task(model, data[task].num_classes, 1, data[task].digest)


@pytest.mark.parametrize("method", METHODS)
def test_mask_methods_never_forget(setup, method):
    params, quant, levels, data = setup
    before = level_bytes(levels)
    first = learn(params, quant, levels, data, "first", method)
    preds_at_learn, _ = predict(load_task_model(first, levels, params).net, data["first"].test)
    learn(params, quant, levels, data, "second", method)
    after = load_task_model(copy.deepcopy(first), levels, params).net
    preds_now, labels = predict(after, data["first"].test)
    assert torch.equal(preds_now, preds_at_learn)
    assert level_bytes(levels) == before
    if method != "piggyback":  # a binary mask over a random, untrained tiny backbone with frozen BN learns little
        assert (preds_now == labels).float().mean() > 0.2  # it learned something (10 classes)


def test_finetune_shared_forgets(setup):
    params, quant, levels, data = setup
    first = learn(params, quant, levels, data, "first", "finetune_shared")
    preds_at_learn, labels = predict(load_task_model(first, levels, params).net, data["first"].test)
    second = learn(params, quant, levels, data, "second", "finetune_shared", start=first)
    preds_now, _ = predict(load_task_model(chip_view({"first": first, "second": second}, "first"), levels, params).net, data["first"].test)
    at_learn = (preds_at_learn == labels).float().mean().item()
    now = (preds_now == labels).float().mean().item()
    assert not torch.equal(preds_now, preds_at_learn)
    assert at_learn - now > 0.05  # measurable forgetting
