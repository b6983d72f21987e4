"""Tier-1 PE ranking (XMA2 section 3.2, after SNIP): which PEs matter most to the new task.

A PE mask m_PE (ones) multiplies every weight of its PE; ONE forward/backward
on ONE seeded mini-batch of the new task through the frozen quantized
backbone gives dL/dm_PE = sum over the PE's weights of w * dL/dw. The score is
|dL/dm_PE| normalized to sum 1 over all PEs; the top ceil(P * n_PEs) PEs are
selected as spare PEs.

The loss needs a head for the new task's classes. A random head would give a
random gradient direction, so the head is fit in closed form (ridge
regression of one-hot labels on the batch's pooled features, float64) from the
features of the same forward pass, detached: the backbone still sees exactly
one forward and one backward pass.
"""

from __future__ import annotations

import polars as pl
import torch
import torch.nn.functional as F
from torch import nn

from xbar.crossbar import spare_pe_count
from xbar.errors import UserError
from xbar.methods import CrossbarLayer, ridge_head
from xbar.runtime import model_device
from xbar.training import as_input


def rank_batch(data, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001 (Dataset)
    """The seeded mini-batch (images uint8, labels) that ranks the PEs."""
    n = len(data)
    if batch_size > n:
        raise UserError(f"rank_batch_size: {batch_size} is larger than the task's training set ({n} images)")
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:batch_size].sort().values
    xs, ys = zip(*(data[int(i)] for i in idx))
    return torch.stack(xs), torch.as_tensor(ys, dtype=torch.int64)


def rank_pes(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
             spare_ratio: float) -> tuple[pl.DataFrame, float]:
    """Score every PE of `net` (its mapped layers are CrossbarLayers) on one batch.

    Returns the table (pe, layer, score, rank, selected), sorted by pe, and the batch loss.
    """
    layers = {n: m for n, m in net.named_modules() if isinstance(m, CrossbarLayer)}
    if not layers:
        raise ValueError("rank_pes needs a network whose mapped layers are CrossbarLayers (methods.deploy_cells)")
    net.eval()  # the frozen backbone: BN with its running statistics
    for p in net.parameters():
        p.requires_grad_(False)
    pe_masks = {n: layer.attach_pe_mask() for n, layer in layers.items()}
    device = model_device(net)  # the batch goes where the network is (xbar.runtime)
    images, labels = images.to(device), labels.to(device)
    try:
        features = net.features(as_input(images))
        weight, bias = ridge_head(features, labels, num_classes)
        loss = F.cross_entropy(features @ weight.T + bias, labels)
        loss.backward()
        grads = {n: m.grad.detach().clone() for n, m in pe_masks.items()}
    finally:
        for layer in layers.values():
            layer.pe_mask, layer.pe_local = None, None
    rows = []
    for name, layer in layers.items():
        for i, g in enumerate(grads[name].abs().double().tolist()):
            rows.append((layer.lm.first_pe + i, name, g))
    df = pl.DataFrame(rows, schema={"pe": pl.Int64, "layer": pl.String, "score": pl.Float64}, orient="row")
    total = df["score"].sum()
    df = df.with_columns(score=pl.col("score") / total if total > 0 else pl.lit(0.0))
    # rank 1 = largest |dL/dm_PE|; ties broken by PE id, so the order is total and deterministic
    order = df.sort(["score", "pe"], descending=[True, False])["pe"]
    rank = pl.DataFrame({"pe": order, "rank": pl.int_range(1, len(order) + 1, eager=True)})
    top = spare_pe_count(spare_ratio, len(df))
    df = df.join(rank, on="pe").with_columns(selected=pl.col("rank") <= top).sort("pe")
    return df.select("pe", "layer", "score", "rank", "selected"), loss.item()
