"""Any classification `nn.Module` as an xbar backbone: its classifier Linear becomes `head`, the rest
`body`, an `InputNorm` in front (`Classifier`); `module_backbone` makes the registry entry for it.

What the wrapper does to the module (`wrap`), in this order:
1. load a local state_dict into it (`load_state`: a key that does not fit is named);
2. find the classifier: the Linear at `head`, or the last Linear under a child named fc, classifier, head or
   heads (torchvision's names); the features are that Linear's input;
3. adapt the first conv to the input channels (the RGB filters averaged: a grey image is all three at once);
4. make attention mappable (`MappedAttention`: its projections become Linear layers on crossbars; the
   activation-by-activation products stay digital) and refuse any other layer with a weight matrix that
   is not a Conv2d or a Linear (`check_mappable`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from xbar.errors import UserError

HEAD_PARENTS = ("fc", "classifier", "head", "heads")  # torchvision's classifier modules
AUX_NAMES = ("aux1", "aux2", "AuxLogits")  # training-only auxiliary classifiers (GoogLeNet, Inception v3)


class InputNorm(nn.Module):
    """Per-channel (x - mean) / std, digital, ahead of the first layer's DACs (identity until set)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    @torch.no_grad()
    def set(self, mean: list[float] | torch.Tensor, std: list[float] | torch.Tensor) -> None:
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.std.copy_(torch.as_tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)


class Classifier(nn.Module):
    """`body` (the module, its classifier replaced by the identity) and a fresh `head` on its features."""

    def __init__(self, body: nn.Module, features: int, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.input_norm = InputNorm(in_channels)  # the order of registration is the mapping's: keep it
        self.head = nn.Linear(features, num_classes)
        self.body = body

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.input_norm(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MappedAttention(nn.Module):
    """nn.MultiheadAttention (self-attention) with its projections as Linear layers the crossbars hold
    (`in_proj`, `out_proj`); the products of activations (q k^T, softmax, x v) are digital."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.heads, self.batch_first, self.dropout = mha.num_heads, mha.batch_first, mha.dropout
        dim = mha.embed_dim
        self.in_proj = nn.Linear(dim, 3 * dim, bias=mha.in_proj_bias is not None)
        self.in_proj.weight = nn.Parameter(mha.in_proj_weight.detach().clone())
        if mha.in_proj_bias is not None:
            self.in_proj.bias = nn.Parameter(mha.in_proj_bias.detach().clone())
        self.out_proj = nn.Linear(dim, dim, bias=mha.out_proj.bias is not None)
        self.out_proj.load_state_dict(mha.out_proj.state_dict())

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                need_weights: bool = False, **_: object) -> tuple[torch.Tensor, None]:
        x = query if self.batch_first else query.transpose(0, 1)  # [batch, tokens, dim]
        b, n, d = x.shape
        q, k, v = self.in_proj(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, d))
        return (out if self.batch_first else out.transpose(0, 1)), None


def read_state(path: Path | str) -> dict:
    """A state_dict file, read without running code (weights_only); a mistake is one line."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # missing, truncated, not a torch file, or pickled code (refused)
        raise UserError(f"model.weights: cannot read {str(path)!r} as a torch state_dict ({type(err).__name__})") from None
    if not isinstance(state, dict):
        raise UserError(f"model.weights: {str(path)!r} holds a {type(state).__name__}, not a state_dict")
    return state


def first_misfit(state: dict, own: dict) -> str | None:
    """The first key of `state` that does not fit `own` (a module's state_dict), as words; None if all fit."""
    for key, value in state.items():
        if key not in own:
            return f"key {key!r} is not in the model"
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(own[key].shape):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            return f"key {key!r} has shape {got}, the model {tuple(own[key].shape)}"
    missing = [k for k in own if k not in state]
    return f"key {missing[0]!r} is missing" if missing else None


def load_state(module: nn.Module, path: Path | str, name: str) -> None:
    """Load a local state_dict into `module`; weights of another architecture name the first key that
    does not fit."""
    state = read_state(path)
    why = first_misfit(state, module.state_dict())
    if why:
        raise UserError(f"model.weights: {str(path)!r} does not fit {name} ({why}: weights of another architecture?)")
    module.load_state_dict(state)


def _find_head(module: nn.Module, head: str | None, name: str) -> str:
    if head is not None:
        try:
            found = module.get_submodule(head)
        except AttributeError:
            found = None
        if not isinstance(found, nn.Linear):
            raise UserError(f"model.name: {name}: its classifier head {head!r} is "
                            f"{type(found).__name__ if found is not None else 'missing'}, not a Linear layer")
        return head
    linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and n.split(".")[0] in HEAD_PARENTS]
    if not linears:
        raise UserError(f"model.name: {name}: no classifier head found (a Linear layer under "
                        f"{', '.join(HEAD_PARENTS)}); register it with module_backbone(..., head='<its path>')")
    return linears[-1]


def _replace(module: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, child, new)


def _adapt_channels(module: nn.Module, in_channels: int) -> None:
    """The first conv takes `in_channels` channels: its filters averaged over the channels it had."""
    first = next(((n, m) for n, m in module.named_modules() if isinstance(m, nn.Conv2d)), None)
    if first is None or first[1].in_channels == in_channels:
        return
    n, old = first
    if old.groups != 1:
        raise UserError(f"model.name: the first conv {n} is grouped; it cannot take {in_channels} channel(s)")
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                    bias=old.bias is not None, padding_mode=old.padding_mode)
    new.weight.data = old.weight.data.mean(1, keepdim=True).repeat(1, in_channels, 1, 1)
    if old.bias is not None:
        new.bias.data = old.bias.data.clone()
    _replace(module, n, new)


def check_mappable(module: nn.Module) -> None:
    """Refuse a layer with a weight matrix the crossbars cannot hold: only Conv2d and Linear are mapped
    (norms, scales and biases are digital, per channel)."""
    for n, m in module.named_modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            continue
        for p_name, p in m.named_parameters(recurse=False):
            if "weight" in p_name and p.dim() >= 2:
                raise UserError(f"model: layer {n or '(top)'} ({type(m).__name__}) holds a weight matrix "
                                f"{tuple(p.shape)} that cannot be mapped onto crossbars (only Conv2d and Linear)")


def wrap(make: Callable[[], nn.Module], name: str, num_classes: int, in_channels: int,
         weights: Path | None, head: str | None = None) -> Classifier:
    """`make()` as an xbar backbone (module doc); `weights` a local state_dict of the module as `make` builds it."""
    try:
        module = make()
    except (RuntimeError, NotImplementedError):  # an initializer the meta device cannot run: shapes from the CPU
        if torch.empty(0).device.type != "meta":
            raise
        with torch.device("cpu"):
            module = make().to("meta")
    if not isinstance(module, nn.Module):
        raise UserError(f"model.name: {name}: its build returned {type(module).__name__}, not a torch nn.Module")
    if weights is not None:
        load_state(module, weights, name)
    if getattr(module, "aux_logits", False):  # GoogLeNet / Inception: the auxiliary classifiers train only
        module.aux_logits = False
        for aux in AUX_NAMES:
            if hasattr(module, aux):
                setattr(module, aux, None)
    path = _find_head(module, head, name)
    features = module.get_submodule(path).in_features
    _replace(module, path, nn.Identity())
    _adapt_channels(module, in_channels)
    for n, m in list(module.named_modules()):
        if isinstance(m, nn.MultiheadAttention):
            _replace(module, n, MappedAttention(m))
    check_mappable(module)
    return Classifier(module, features, num_classes, in_channels)


def module_backbone(name: str, make: Callable[[], nn.Module], head: str | None = None,
                    imagenet_stats: tuple | None = None, usual: tuple[int, int] = (1000, 3)):  # noqa: ANN201
    """The registry entry for a plain classification module: `make()` builds it (no arguments; a local
    state_dict given as model.weights must fit what it builds), `head` is its classifier Linear's dotted
    path (None: found under fc / classifier / head / heads). For params.yaml's `plugins:`:
    `register(module_backbone("my_net", MyNet, head="fc"))`."""
    from xbar.backbones.registry import Backbone

    def build(params, num_classes: int, in_channels: int, weights: Path | None) -> Classifier:  # noqa: ANN001
        return wrap(make, name, num_classes, in_channels, weights, head)

    return Backbone(name, build, imagenet_stats=imagenet_stats, usual=usual, head=head)
