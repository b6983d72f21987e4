"""xbar.runtime (#17 part 4): train.device's resolver, DataLoader workers of lazy sources that read the same
images as the main process, and mixed precision that changes nothing on the CPU."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from xbar.data import load_task_data
from xbar.errors import UserError
from xbar.params import DatasetSpec, ParamsError, parse_params
from xbar.runtime import AUTO_WORKERS, autocast, batches, compute_device, loader_workers, quantized
from xbar.training import BalancedBatches, fit, seed_everything

NO_CUDA = ("train.device: cuda asked for, but no CUDA device is available (torch.cuda.is_available() is False); "
           "use auto or cpu")


def test_auto_is_the_cpu_on_a_machine_without_cuda(monkeypatch):
    if not torch.cuda.is_available():  # this machine: auto as it is
        assert compute_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert compute_device("auto") == compute_device("cpu") == torch.device("cpu")


def test_cuda_without_cuda_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError) as err:
        compute_device("cuda")
    assert str(err.value) == NO_CUDA
    with pytest.raises(UserError, match="^train.device: expected auto, cpu or cuda, got 'tpu'$"):
        compute_device("tpu")


@pytest.mark.parametrize("value", ["gpu", "CUDA", "cuda:1", 0])
def test_the_params_field_takes_auto_cpu_or_cuda_only(value):
    raw = {"source": {"dataset": "optdigits"}, "train": {"device": value}}
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    line = str(err.value)
    assert "\n" not in line and line.startswith("params: train.device: ") and "'auto', 'cpu' or 'cuda'" in line
    assert parse_params({**raw, "train": {"device": "cpu"}}).train.device == "cpu"
    assert parse_params({"source": {"dataset": "optdigits"}}).train.device == "auto"


def _folder(root, classes: int = 3, per_class: int = 8) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")


def _read(dataset, workers: int, epochs: int = 2) -> list[torch.Tensor]:
    sampler = BalancedBatches(len(dataset), 5, 0)
    return [torch.cat([x.flatten(1), y[:, None]], 1) for _ in range(epochs)
            for x, y in batches(dataset, sampler, torch.device("cpu"), workers)]


def test_workers_read_an_augmented_lazy_source_exactly_as_the_main_process(tmp_path):
    _folder(tmp_path)
    spec = DatasetSpec(source="imagefolder", root=str(tmp_path), image_size=16, crop=12, channels=3,
                       test_fraction=0.25, augment={"scale": [0.3, 1.0], "flip": True})
    fresh = lambda: load_task_data(spec, 0).fit_train  # noqa: E731 (the augmentation's generator starts anew)
    alone, two = _read(fresh(), 0), _read(fresh(), 2)
    assert all(torch.equal(a, b) for a, b in zip(alone, two, strict=True))
    assert not torch.equal(alone[0], alone[len(alone) // 2])  # the second epoch draws other crops
    # QAT reads a subset of the augmented split: the same holds through the Subset
    subset = lambda: Subset(fresh(), [0, 2, 3, 5, 7, 8, 11])  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(_read(subset(), 0), _read(subset(), 2), strict=True))
    # what the main process's draw prevents: workers drawing from copies of one generator
    def plain(workers: int) -> list[torch.Tensor]:
        data = fresh()
        return [x.long() for x, _ in DataLoader(data, batch_sampler=BalancedBatches(len(data), 5, 0),
                                                num_workers=workers)]

    same = [torch.equal(a[:, :-1].reshape(p.shape), p) for a, p in zip(alone, plain(0))]
    assert same and all(same)
    assert not all(torch.equal(a[:, :-1].reshape(p.shape), p) for a, p in zip(alone, plain(2)))


def test_workers_only_for_lazy_sources(tmp_path):
    _folder(tmp_path)
    lazy = load_task_data(DatasetSpec(source="imagefolder", root=str(tmp_path), image_size=16, channels=3), 0).train
    memory = TensorDataset(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert loader_workers(lazy, cpu) == 0 and loader_workers(lazy, cuda) == min(AUTO_WORKERS, os.cpu_count() or 1)
    assert loader_workers(lazy, cpu, 3) == loader_workers(lazy, cuda, 3) == 3
    assert loader_workers(memory, cuda) == loader_workers(Subset(memory, [0, 1]), cuda, 3) == 0


def test_mixed_precision_changes_nothing_on_the_cpu_and_never_runs_a_quantizer():
    from xbar.models import build_model
    from xbar.params import ModelParams
    from xbar.quant import quantize_model

    data = TensorDataset(torch.randint(0, 256, (24, 1, 12, 12), dtype=torch.uint8), torch.arange(24) % 3)

    def trained(mixed: bool) -> list[torch.Tensor]:
        seed_everything(0)
        net = build_model(ModelParams(width=4, blocks=1), 3, 1)
        fit(net, data, [torch.optim.SGD(net.parameters(), lr=0.05)], 1, 8, 0, "t", mixed_precision=mixed)
        return [p.detach() for p in net.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(trained(True), trained(False), strict=True))
    net = build_model(ModelParams(width=4, blocks=1), 3, 1)
    assert not quantized(net) and quantized(quantize_model(net))
    assert isinstance(autocast(net, True), type(autocast(net, False)))  # the CPU: no autocast either way


def test_artifacts_on_the_cpu_are_saved_as_they_are():
    # a state_dict keeps its type and its _metadata (BN's version, read by load_state_dict): saving a CPU
    # checkpoint through to_cpu writes the same bytes as before the GPU work
    import io

    from xbar.models import build_model
    from xbar.params import ModelParams
    from xbar.runtime import to_cpu

    state = build_model(ModelParams(width=4, blocks=1), 3, 1).state_dict()
    checkpoint = {"state_dict": state, "num_classes": 3, "layers": [torch.zeros(2), (1, "a")]}
    assert to_cpu(checkpoint) is checkpoint and to_cpu(state) is state
    a, b = io.BytesIO(), io.BytesIO()
    torch.save(checkpoint, a)
    torch.save(to_cpu(checkpoint), b)
    assert a.getvalue() == b.getvalue()
