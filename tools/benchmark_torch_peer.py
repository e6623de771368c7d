"""The PyTorch AdvProp recipe, timed: the peer tools/benchmark_methods.py compares us with.

Run by an interpreter that has torch and timm (not this project's environment):
  /path/to/torch-venv/bin/python tools/benchmark_torch_peer.py --batch_size=32 --resolution=64
or through `python tools/benchmark_methods.py --torch_python=/path/to/torch-venv/bin/python`.

The recipe of the PyTorch AdvProp re-implementations: timm's EfficientNet-B0 with every
BatchNorm2d replaced by a two-BN module (main + auxiliary); the attack (targeted PGD-1,
epsilon 1 pixel, step 1, toward a random wrong class) runs in eval mode through the
auxiliary BN; then ONE forward/backward of [clean; adversarial], the first half through
the main BN and the second through the auxiliary one, and an RMSprop step. Inputs are
[-1, 1] (AdvProp's normalization). Prints one JSON line: seconds per step (median).
"""

import argparse
import json
import statistics
import time

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F


class TwoDomainBatchNorm(nn.Module):
    """A main and an auxiliary BatchNorm2d; `route` is "main", "aux" or "split" (first half main)."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.main = bn
        self.aux = nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum)
        self.aux.load_state_dict(bn.state_dict())
        self.route = "main"

    def forward(self, x):
        if self.route == "main":
            return self.main(x)
        if self.route == "aux":
            return self.aux(x)
        half = x.shape[0] // 2
        return torch.cat([self.main(x[:half]), self.aux(x[half:])], 0)


def with_two_bns(module):
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, TwoDomainBatchNorm(child))
        else:
            with_two_bns(child)
    return module


def set_route(model, route):
    for m in model.modules():
        if isinstance(m, TwoDomainBatchNorm):
            m.route = route


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, size, classes = args.batch_size, args.resolution, args.num_classes
    pixels = torch.rand(n, 3, size, size) * 255.0
    labels = torch.randint(0, classes, (n,))
    scale = 2.0 / 255.0

    def make(advprop):
        model = timm.create_model("efficientnet_b0", num_classes=classes)
        if advprop:
            with_two_bns(model)
        optimizer = torch.optim.RMSprop(model.parameters(), lr=0.01, alpha=0.9, momentum=0.9, eps=1e-3)
        return model, optimizer

    def vanilla_step(model, optimizer):
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(pixels * scale - 1.0), labels)
        loss.backward()
        optimizer.step()
        return loss.item()

    def advprop_step(model, optimizer):
        # targeted PGD-1 through the auxiliary BN in eval mode, no weight gradients
        model.eval()
        set_route(model, "aux")
        target = (labels + torch.randint(1, classes, (n,))) % classes
        x = pixels.clone().requires_grad_(True)
        attack_loss = F.cross_entropy(model(x * scale - 1.0), target)
        (grad,) = torch.autograd.grad(attack_loss, x)
        adv = torch.clamp(torch.minimum(torch.maximum(x.detach() - grad.sign(), pixels - 1.0), pixels + 1.0), 0, 255)
        # one update on [clean; adv], each half through its own BN
        model.train()
        set_route(model, "split")
        optimizer.zero_grad(set_to_none=True)
        logits = model(torch.cat([pixels, adv], 0) * scale - 1.0)
        loss = F.cross_entropy(logits[:n], labels) + F.cross_entropy(logits[n:], labels)
        loss.backward()
        optimizer.step()
        set_route(model, "main")
        return loss.item()

    runs = {"vanilla": (vanilla_step, *make(False)), "advprop_pgd1": (advprop_step, *make(True))}
    for fn, model, optimizer in runs.values():
        for _ in range(3):
            fn(model, optimizer)
    samples = {name: [] for name in runs}
    for _ in range(args.rounds):  # interleaved rounds, medians: as advprop_tf.benchmarking.time_interleaved
        for name, (fn, model, optimizer) in runs.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                fn(model, optimizer)
            samples[name].append((time.perf_counter() - start) / args.steps)
    seconds = {name: statistics.median(s) for name, s in samples.items()}
    print(json.dumps({"torch": torch.__version__, "timm": timm.__version__, "threads": torch.get_num_threads(),
                      **{f"{k}_s": round(v, 4) for k, v in seconds.items()}}))


if __name__ == "__main__":
    main()
