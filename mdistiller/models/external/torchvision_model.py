"""torchvision classification CNNs with our feature contract, their taps found by one probe forward.

torchvision has no per-model feature API, so the taps are found generically once, when the model is built: a
forward of a blank image at the data's size (eval mode, no gradient) records every module call. Then
- the classifier is the last nn.Linear called (its output is the logits); its input is "pooled_feat";
- the body ends at the global pool: the last adaptive pooling module directly under the model (resnet's avgpool,
  mobilenet's, ...), else at the classifier (models that pool functionally: densenet, mobilenet_v2, shufflenet);
- "feats" are, walking back from the body's last square NCHW map, the last module output at each larger size:
  the output of each stage, and of the stem (for resnets: relu, layer1..layer4, as ours). Outputs inside a block
  that shrinks the map, at its input's size (an inverted residual's expansion before its strided conv), are not
  stage outputs and are skipped; squeeze-excitation pools (1x1, smaller than their block's map) are passed over.
"preact_feats" are the same tensors (no pre-activation taps). At every forward the same module calls are captured
with hooks. torchvision's transformers have no such stages (ViT: refused; Swin: its patch embedding and last map
only): use timm for them.
"""

import bisect
import difflib
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from ...utils.errors import ConfigError
from .contract import LibraryFeatures, adopt, is_square_map
from .pretrained import pretrained_weights_file, torchvision_weights

_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


class TorchvisionFeatures(LibraryFeatures):
    _taps = ()  # ((module name, which call of it), ...) whose outputs are "feats"
    _head = ("", 0)  # the classifier nn.Linear's (name, call)

    def forward(self, x):
        outputs, handles = {}, []
        wanted = {}
        for name, call in self._taps:
            wanted.setdefault(name, set()).add(call)
        counts = dict.fromkeys(wanted, 0)

        def tap(name):
            def hook(module, args, out):
                if counts[name] in wanted[name]:
                    outputs[(name, counts[name])] = out
                counts[name] += 1
            return hook

        head_calls = [0]

        def head_input(module, args):
            if head_calls[0] == self._head[1]:
                outputs["pooled"] = args[0]
            head_calls[0] += 1

        try:
            for name in wanted:
                handles.append(self.get_submodule(name).register_forward_hook(tap(name)))
            handles.append(self.get_submodule(self._head[0]).register_forward_pre_hook(head_input))
            logits = self.library_forward(x)
        finally:
            for h in handles:
                h.remove()
        if not torch.is_tensor(logits):
            raise ConfigError(f"{self.library_name} returns {type(logits).__name__} in training mode, not logits "
                              "(auxiliary heads); pick another torchvision model")
        feats = [outputs[t] for t in self._taps]
        return logits, self.make_features(feats, feats, outputs["pooled"].flatten(1))


class Call(NamedTuple):
    name: str  # the module's name in the model
    call: int  # which call of that module in the forward (0: the first)
    module: nn.Module
    in_size: Optional[int]  # its input's map size, when that is a square NCHW map
    out: object


def _size(t):
    return t.shape[-1] if is_square_map(t) else None


def probe(net, image_size):
    """([Call] of every module call of one forward, in completion order; the output). The model's mode and
    BatchNorm statistics are left as they were."""
    records, counts, handles = [], {}, []

    def record(name):
        def hook(module, args, out):
            size = _size(args[0]) if args else None
            records.append(Call(name, counts.get(name, 0), module, size, out))
            counts[name] = counts.get(name, 0) + 1
        return hook

    training = net.training
    try:
        for name, module in net.named_modules():
            if name:
                handles.append(module.register_forward_hook(record(name)))
        net.eval()
        with torch.no_grad():
            out = net(torch.zeros(1, 3, image_size, image_size))
    finally:
        for h in handles:
            h.remove()
        net.train(training)
    return records, out


def inside_shrinking_block(records, i, calls_of):
    """Whether call i runs inside a call of an enclosing module whose input is at call i's size and whose output
    is smaller: a block's internals before its strided conv, not a stage output."""
    size, parts = _size(records[i].out), records[i].name.split(".")
    for k in range(1, len(parts)):
        later = calls_of.get(".".join(parts[:k]), [])
        j = bisect.bisect_right(later, i)  # the enclosing call completes after its children
        if j < len(later):
            outer = records[later[j]]
            if outer.in_size == size and _size(outer.out) != size:
                return True
    return False


def find_taps(net, name, image_size):
    """((stage taps), head tap, [channels of the taps], feat_dim) of a torchvision CNN (see the module doc)."""
    try:
        records, out = probe(net, image_size)
    except Exception as e:  # the library refuses the input size, or the model is not a plain classifier
        raise ConfigError(f"{name} does not run on {image_size}x{image_size} images ({type(e).__name__}: {e})") \
            from None
    linears = [i for i, r in enumerate(records) if isinstance(r.module, nn.Linear)]
    if not linears or not torch.is_tensor(out) or records[linears[-1]].out.shape != out.shape:
        raise ConfigError(f"{name} has no final nn.Linear classifier whose output is its logits, which its "
                          "pooled features are read from; pick another torchvision model")
    head = linears[-1]
    pools = [i for i, r in enumerate(records[:head]) if isinstance(r.module, _POOLS) and "." not in r.name]
    end = pools[-1] if pools else head
    calls_of = {}
    for i, r in enumerate(records):
        calls_of.setdefault(r.name, []).append(i)
    body = [r for i, r in enumerate(records[:end]) if is_square_map(r.out) and not isinstance(r.module, _POOLS)
            and not inside_shrinking_block(records, i, calls_of)]
    taps = []
    for r in reversed(body):
        if not taps or r.out.shape[-1] > taps[-1].out.shape[-1]:
            taps.append(r)
    taps.reverse()
    if len(taps) < 2:
        raise ConfigError(f"{name} has no CNN stages (NCHW maps that shrink stage by stage) to read features "
                          "from, e.g. a vision transformer: use the timm version (timm:<name>) for those")
    return ([(r.name, r.call) for r in taps], (records[head].name, records[head].call),
            [r.out.shape[1] for r in taps], records[head].module.in_features)


def _classification_models(tvm):
    return tvm.list_models(module=tvm)


def _with_new_head(pretrained, fresh):
    """`fresh` (built for our class count) with every pretrained weight whose shape it shares: all but the
    classifier's, which keep the library's initialisation."""
    own = fresh.state_dict()
    kept = {k: v for k, v in pretrained.state_dict().items() if k in own and own[k].shape == v.shape}
    fresh.load_state_dict(kept, strict=False)
    return fresh


def build_torchvision(model, name, num_classes, image_size, pretrained, pretrained_key):
    """torchvision classification model `model` with our contract; `pretrained`: its DEFAULT weights from torch's
    hub cache (a new classifier head when num_classes differs from theirs)."""
    import torchvision.models as tvm

    known = _classification_models(tvm)
    if model not in known:
        close = difflib.get_close_matches(model, known, n=5)
        raise ConfigError(f"unknown torchvision classification model '{model}' in '{name}'"
                          f"{'; close: ' + ', '.join(close) if close else ''} (all: "
                          "torchvision.models.list_models(module=torchvision.models))")
    if pretrained:
        pretrained_weights_file(name, pretrained_key)  # present in the cache, else its one-line error
        weights, _ = torchvision_weights(model, name, pretrained_key)
        net = tvm.get_model(model, weights=weights)
        if len(weights.meta["categories"]) != num_classes:
            net = _with_new_head(net, tvm.get_model(model, num_classes=num_classes))
    else:
        net = tvm.get_model(model, num_classes=num_classes)
    taps, head, channels, feat_dim = find_taps(net, name, image_size)
    adopt(net, TorchvisionFeatures, name, channels, feat_dim)
    net._taps, net._head = tuple(taps), head
    return net
