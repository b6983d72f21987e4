"""Where the library computes: the CPU or a CUDA GPU (`train.device`), how batches get there, and where
mixed precision is used (docs/gpu.md).

**Device.** `compute_device(params.train.device)`: `auto` is CUDA when torch.cuda.is_available(), else
the CPU; `cuda` on a machine without it is a one-line UserError. The model decides where a loop runs:
every loop (`xbar.training.fit` / `predict`, the recipe's head fit and BN passes, the PE ranking) moves
its batches to the device of the model it runs, so a stage or the comparison moves the model once
(`xbar.step` for ranking, learning and evaluation; the pretrain and quantize stages). The chip
simulation (`xbar.chip`: seeded per-cell draws, the ADC, the shift-add) stays on the CPU, and so do
the deployment state and the energy model (arithmetic on tables, no network runs). Artifacts are
always CPU tensors (`to_cpu`: `export_task`, `workflow.io.save_torch`), so a task learned on a GPU
loads on a CPU machine.

**Determinism.** Every shuffle, the Gumbel noise of the column masks and the augmentation draws come
from seeded generators on the CPU, so they are the same on either device. On CUDA, `compute_device`
also asks for deterministic kernels (cuDNN without autotuning, torch.use_deterministic_algorithms in
warn-only mode, cuBLAS's fixed workspace): the same params on the same GPU give the same masks. CUDA
results are not bit-identical to the CPU's (its kernels sum in another order).

**Mixed precision: only where no quantizer runs.** Training a network without quantizers -- the fp32
pretraining, the comparison's fp32 ceiling (finetune_fp32) -- runs under bf16 autocast on CUDA
(`train.mixed_precision`, `autocast`). A quantized
network (QAT, PE ranking, every method's training, evaluation) always computes in fp32: a 4-bit level
times its layer's fp32 scale is not representable in bf16 (8 significant bits) and mostly not in fp16
(11), and neither are the activation quantizer's outputs, so autocast would move weights and
activations off their quantization grid -- the chip would compute something other than what was
trained, and a task rebuilt from task.pt would no longer predict bit for bit as the trained one.
(Running the crossbar layers on the integer codes, exact in bf16 with fp32 accumulation, and scaling
after would bring them there; not done.) On the CPU nothing changes.

**Loading.** A lazy source (torchvision, imagefolder) is read by DataLoader workers (`train.workers`;
None: 4, at most the CPU count, when the model is on CUDA, else 0) into pinned memory on CUDA; an
in-memory source is tensors already and never uses workers. Batches come in the order of the main
process's seeded samplers, and a dataset's seeded per-image draw (`draw`: the train-time augmentation
of xbar.augment) runs in the main process in read order: the same images with any number of workers.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from xbar.errors import UserError

AUTO_WORKERS = 4  # DataLoader workers of a lazy source on CUDA when train.workers is not set


def compute_device(name: str = "auto") -> torch.device:
    """The torch device of `train.device` (auto | cpu | cuda); on CUDA, deterministic kernels (module doc)."""
    if name not in ("auto", "cpu", "cuda"):
        raise UserError(f"train.device: expected auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device: cuda asked for, but no CUDA device is available "
                        "(torch.cuda.is_available() is False); use auto or cpu")
    device = torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts: fixed reductions
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
    return device


def model_device(model: nn.Module) -> torch.device:
    """Where `model` computes: the device of its first parameter or buffer (the CPU if it has none)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _root(data: Dataset) -> Dataset:
    """The dataset at the bottom of the wrappers (Subset's `dataset`, xbar.augment's `base`)."""
    while True:
        inner = getattr(data, "dataset", None) if isinstance(data, Subset) else getattr(data, "base", None)
        if not isinstance(inner, Dataset):
            return data
        data = inner


def loader_workers(data: Dataset, device: torch.device, workers: int | None = None) -> int:
    """DataLoader workers for `data`: 0 for an in-memory source; `workers`, else AUTO_WORKERS on CUDA."""
    if isinstance(_root(data), TensorDataset):
        return 0
    if workers is not None:
        return workers
    return min(AUTO_WORKERS, os.cpu_count() or 1) if device.type == "cuda" else 0


def _split_draw(data: Dataset) -> tuple[Dataset, Any]:
    """(what the workers read, the seeded per-image draw this process applies after, or None)."""
    if isinstance(data, Subset) and hasattr(data.dataset, "draw"):
        return Subset(data.dataset.base, data.indices), data.dataset.draw
    if hasattr(data, "draw") and hasattr(data, "base"):
        return data.base, data.draw
    return data, None


def batches(data: Dataset, batch_sampler: Iterable[list[int]], device: torch.device,
            workers: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, labels) on `device` for each list of indices of `batch_sampler`, in its order."""
    source, draw = _split_draw(data)
    n = loader_workers(source, device, workers)
    cuda = device.type == "cuda"
    for x, y in DataLoader(source, batch_sampler=batch_sampler, num_workers=n, pin_memory=cuda and draw is None):
        if draw is not None:
            x = torch.stack([draw(image) for image in x])
        yield x.to(device, non_blocking=cuda), torch.as_tensor(y).to(device, non_blocking=cuda)


def quantized(model: nn.Module) -> bool:
    """Whether any quantizer runs in `model` (then it computes in fp32 only, module doc)."""
    from xbar.quant import ActQuantizer, WeightQuantizer

    return any(isinstance(m, WeightQuantizer | ActQuantizer) for m in model.modules())


def autocast(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast for a step of `model` where the module doc allows it (CUDA, no quantizer, bf16
    supported, `enabled`); else a context that changes nothing."""
    device = model_device(model)
    if enabled and device.type == "cuda" and torch.cuda.is_bf16_supported() and not quantized(model):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_cpu(obj: Any) -> Any:
    """`obj` with every tensor inside (dicts, lists, tuples) on the CPU: what artifacts hold. A container
    whose tensors are all on the CPU comes back as it is; a dict keeps its type and a state_dict's
    `_metadata` (module versions that load_state_dict reads)."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        items = {k: to_cpu(v) for k, v in obj.items()}
        if all(items[k] is v for k, v in obj.items()):
            return obj
        out = type(obj)()
        out.update(items)
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata
        return out
    if isinstance(obj, list | tuple):
        items = [to_cpu(v) for v in obj]
        return obj if all(a is b for a, b in zip(items, obj)) else type(obj)(items)
    return obj
