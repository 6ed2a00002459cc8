"""Model FLOPs per training sample, counted once at start-up, for achieved TFLOP/s and MFU.

Training FLOPs are taken as 3x the forward pass (backward ~2x forward), the convention MFU
numbers are quoted in; MFU is measured against the accelerator's dense bf16/fp16 tensor peak
(whatever precision the run uses), so runs on one card compare directly.
"""

from __future__ import annotations

import torch

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


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def train_flops_per_sample(net: torch.nn.Module, example: torch.Tensor) -> float | None:
    """3x the forward FLOPs of one sample (matmuls and convolutions, as torch's FlopCounterMode
    counts them), or None when the model cannot be counted (then only samples/s is logged).

    No side effects on training: eval mode (batch-norm statistics untouched, dropout draws no
    random numbers), no autograd, and `net.forward` directly (a compiled model is not traced
    a second time)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = net.training
    net.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net.forward(example)
        flops = counter.get_total_flops()
    except Exception:  # best effort: a user module the counter cannot follow loses MFU only
        return None
    finally:
        net.train(was_training)
    return 3.0 * flops / len(example) if flops else None
