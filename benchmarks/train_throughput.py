"""Training throughput (img/s) of candidate backbones and input sizes on this machine: fwd+bwd+AdamW step.

Usage: python benchmarks/train_throughput.py [--batch 64] [--steps 3] [arch:size ...]
Run candidates side by side in one process: this machine's speed drifts between runs.
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

DEFAULT = ["resnet18:160", "resnet18:192", "resnet18:224", "resnet18d:192", "resnet26:160"]


def measure(
    arch: str, size: int, batch: int, steps: int, bf16: bool, channels_last: bool, compile: bool = False
) -> float:
    model = timm.create_model(arch, in_chans=1, num_classes=4)
    opt = torch.optim.AdamW(model.parameters())
    x, y = torch.randn(batch, 1, size, size), torch.randint(0, 4, (batch,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model)
    warm = 3 if compile else 1  # the first compiled steps build the kernels
    for i in range(steps + warm):
        if i == warm:
            t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("candidates", nargs="*", default=DEFAULT)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--fp32", action="store_true")
    ap.add_argument("--no-channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")
    a = ap.parse_args()
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {a.batch}, bf16 {not a.fp32}, "
        f"channels-last {not a.no_channels_last}, compile {a.compile}"
    )
    for c in a.candidates:
        arch, size = c.split(":")
        ips = measure(arch, int(size), a.batch, a.steps, not a.fp32, not a.no_channels_last, a.compile)
        print(f"{arch:12s} {size:>4s} px  {ips:6.1f} img/s{'  (torch.compile)' if a.compile else ''}")


if __name__ == "__main__":
    main()
