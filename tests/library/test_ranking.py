import math

import polars as pl
import pytest
import torch

from tiny_backbone import random_task
from xbar.errors import UserError
from xbar.methods import CrossbarLayer, backbone_net, crossbar_spec, deploy_cells
from xbar.ranking import rank_batch, rank_pes
from xbar.training import as_input


def ranked(backbone, ratio: float, seed: int = 0) -> pl.DataFrame:
    params, quant, levels = backbone
    net = backbone_net(params, quant)
    deploy_cells(net, levels, crossbar_spec(params))
    x, y = rank_batch(random_task(), 32, seed)
    return rank_pes(net, x, y, 3, ratio)[0]


def test_ranking_is_deterministic_and_selects_top_p(backbone):
    a, b = ranked(backbone, 0.1), ranked(backbone, 0.1)
    assert a.equals(b)
    n = a.height
    assert a.columns == ["pe", "layer", "score", "rank", "selected"]
    assert a["pe"].to_list() == list(range(n))
    assert sorted(a["rank"].to_list()) == list(range(1, n + 1))
    assert a["selected"].sum() == math.ceil(0.1 * n)
    assert a["score"].sum() == pytest.approx(1.0)
    top = a.filter("selected")["score"].min()
    assert (a.filter(~pl.col("selected"))["score"] <= top).all()
    assert ranked(backbone, 1.0)["selected"].all()
    assert ranked(backbone, 0.5)["selected"].sum() == math.ceil(0.5 * n)


def test_pe_mask_gradient_is_sum_of_w_times_weight_gradient(backbone):
    """dL/dm_PE must equal sum over the PE's weights of w * dL/dw (what the PE mask stands for)."""
    params, quant, levels = backbone
    net = backbone_net(params, quant)
    deploy_cells(net, levels, crossbar_spec(params))
    net.eval()
    layer = next(m for m in net.modules() if isinstance(m, CrossbarLayer) and m.lm.n_pes > 1)
    x = as_input(rank_batch(random_task(), 16, 0)[0])
    pe_mask = layer.attach_pe_mask()
    captured = {}
    original = layer.weight

    def weight():  # capture the masked weight to get dL/dw
        w = original()
        w.retain_grad()
        captured["w"] = w
        return w

    layer.weight = weight
    net.features(x).pow(2).sum().backward()
    w, g = captured["w"], captured["w"].grad
    pe = layer.lm.index_tensors()[1].long() - layer.lm.first_pe
    manual = torch.zeros(layer.lm.n_pes).index_add_(0, pe.flatten(), (w * g).detach().flatten())
    assert torch.allclose(pe_mask.grad, manual, rtol=1e-4, atol=1e-6)


def test_rank_batch_is_seeded_and_bounded():
    data = random_task(40)
    a, b = rank_batch(data, 16, 3), rank_batch(data, 16, 3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], rank_batch(data, 16, 4)[0])
    with pytest.raises(UserError, match="larger than the task's training set"):
        rank_batch(data, 41, 0)


def test_ranking_takes_one_forward_and_one_backward_pass(backbone, monkeypatch):
    """The paper's budget: one mini-batch, at most two forward/backward passes (we take one of each)."""
    params, quant, levels = backbone
    net = backbone_net(params, quant)
    deploy_cells(net, levels, crossbar_spec(params))
    first = next(m for m in net.modules() if isinstance(m, CrossbarLayer))
    forwards, backwards, batches = [], [], []

    def count(module, args, out) -> None:  # noqa: ANN001 (a forward hook returns None: keeps the output)
        forwards.append(1)
        batches.append(args[0].shape[0])

    first.register_forward_hook(count)
    real_backward = torch.autograd.backward
    monkeypatch.setattr(torch.autograd, "backward", lambda *a, **k: (backwards.append(1), real_backward(*a, **k))[1])
    x, y = rank_batch(random_task(), 32, 0)
    rank_pes(net, x, y, 3, 0.1)
    assert len(forwards) == 1 and len(backwards) == 1 and batches == [32]
