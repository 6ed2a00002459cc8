"""Model FLOPs per training sample, counted once at start-up, for achieved TFLOP/s and MFU.

Training FLOPs are taken as 3x the forward pass (backward ~2x forward), the convention MFU
numbers are quoted in; MFU is measured against the accelerator's dense bf16/fp16 tensor peak
(whatever precision the run uses), so runs on one card compare directly.

What is counted is what torch's FlopCounterMode counts: the multiply-adds of matmuls and
convolutions (2 FLOPs each; biases, activations, normalisation and pooling are not counted).
A model made of the layer vocabulary is counted from its layers' shapes, found by one forward
pass on the example rows. FlopCounterMode itself is used only for other models, and only
where MFU can be computed: its first use imports torch._dynamo (~1 s and ~70 MiB on every
run), which a CPU run with no known peak should not pay for a figure it cannot use.
"""

from __future__ import annotations

import torch
from torch import nn

# Dense (no sparsity) bf16/fp16 tensor peaks, TFLOP/s per GPU, by a substring of
# torch.cuda.get_device_name(); first match wins (specific names first). `train.peak_tflops`
# overrides it or fills in for any other device (a CPU included).
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("V100", 125.0),
)

# Leaf modules whose forward has no matmul or convolution: 0 counted FLOPs, as in
# FlopCounterMode (elementwise work is not part of the MFU convention).
_UNCOUNTED = (
    nn.Identity,
    nn.Flatten,
    nn.Dropout,
    nn.ReLU,
    nn.LeakyReLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.GELU,
    nn.Softmax,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
)


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def train_flops_per_sample(
    net: torch.nn.Module, example: torch.Tensor, counter: bool | None = None
) -> float | None:
    """3x the forward FLOPs of one sample, or None when the model cannot be counted (then only
    samples/s is logged).

    A model of known layers is counted analytically. Any other model is counted with
    FlopCounterMode when `counter` is true; `counter=None` means "where a peak is known for
    the example's device" (a known GPU). Callers that know `train.peak_tflops` pass
    `counter=peak is not None`.

    No side effects on training: eval mode (batch-norm statistics untouched, dropout draws no
    random numbers), no autograd, and `net.forward` directly (a compiled model is not traced
    a second time)."""
    flops = layer_flops(net, example)
    if flops is None:
        if counter is None:
            counter = peak_tflops(example.device, None) is not None
        flops = counted_flops(net, example) if counter else None
    return 3.0 * flops / len(example) if flops else None


def layer_flops(net: torch.nn.Module, example: torch.Tensor) -> int | None:
    """Forward FLOPs of `example` through a model built only from known modules (Linear,
    Conv2d, the uncounted elementwise/normalisation/pooling layers, and the containers that
    only chain them), from the shapes one forward pass records; None for any other model."""
    from dist_train.model.net import Net, Standardize

    leaves = []
    for module in net.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, Standardize, *_UNCOUNTED)):
            leaves.append(module)
        elif type(module) not in (nn.Sequential, Net):  # a forward of its own: unknown work
            return None
    total = 0

    def count(module, inputs, output) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):  # [..., in] @ [in, out]: 2 FLOPs per multiply-add
            total += 2 * module.in_features * output.numel()
        elif isinstance(module, nn.Conv2d):  # each output value: (in/groups) x kh x kw MACs
            per_out = module.weight[0].numel()
            total += 2 * per_out * output.numel()

    hooks = [leaf.register_forward_hook(count) for leaf in leaves]
    try:
        out = _side_effect_free_forward(net, example)
    except Exception:  # best effort, as below: a model that cannot run the example loses MFU
        return None
    finally:
        for hook in hooks:
            hook.remove()
    if leaves and leaves[0] is net:  # a bare layer: `net.forward` bypassed its own hook
        count(net, (example,), out)
    return total


def counted_flops(net: torch.nn.Module, example: torch.Tensor) -> int | None:
    """Forward FLOPs as torch's FlopCounterMode traces them (any model; imports torch._dynamo)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            _side_effect_free_forward(net, example)
        return counter.get_total_flops()
    except Exception:  # best effort: a user module the counter cannot follow loses MFU only
        return None


def _side_effect_free_forward(net: torch.nn.Module, example: torch.Tensor):
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            return net.forward(example)
    finally:
        net.train(was_training)
