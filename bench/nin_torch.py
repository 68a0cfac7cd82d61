"""The PyTorch half of bench/compare.sh: the same NiN, the same workload.

The network is built from the NinConfig JSON that nin-summary prints, so
the two sides cannot drift apart. Prints one JSON line like the Rust
`throughput` example:

    python bench/nin_torch.py --config config.json --mode train --batch 128 --seconds 10
"""
import argparse
import json
import time

import torch
from torch import nn


def nin(config):
    """torch.nn twin of nin_model::Nin for a NinConfig dict."""
    layers = []
    channels_in = config["in_channels"]

    def unit(cin, cout, k, s, p):
        bn = config["batch_norm"]
        mods = [nn.Conv2d(cin, cout, k, s, p, bias=not bn)]
        if bn:
            mods.append(nn.BatchNorm2d(cout))
        mods.append(nn.ReLU())
        return mods

    def block(cin, cout, conv):
        mods = unit(cin, cout, conv["kernel"], conv["stride"], conv["padding"])
        for _ in range(config["mlp_convs"]):
            mods += unit(cout, cout, 1, 1, 0)
        return mods

    for b in config["blocks"]:
        layers += block(channels_in, b["channels"], b["conv"])
        if b["pool"]:
            p = b["pool"]
            layers.append(nn.MaxPool2d(p["kernel"], p["stride"], p["padding"]))
        channels_in = b["channels"]
    if config["dropout"] > 0:
        layers.append(nn.Dropout(config["dropout"]))
    layers += block(channels_in, config["num_classes"], config["head"])
    layers += [nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten()]
    return nn.Sequential(*layers)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, help="NinConfig JSON file")
    ap.add_argument("--arch", default="custom", help="name to print")
    ap.add_argument("--mode", choices=["forward", "train"], required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with open(args.config) as f:
        config = json.load(f)
    model = nin(config)
    s = config["input_size"]
    x = torch.rand(args.batch, config["in_channels"], s, s)
    y = torch.arange(args.batch) % config["num_classes"]
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        if args.mode == "forward":
            model.eval()
            with torch.inference_mode():
                model(x)
        else:
            model.train()
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()

    step()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds or steps < 3:
        step()
        steps += 1
    elapsed = time.perf_counter() - start
    print(json.dumps({"impl": "torch", "arch": args.arch, "mode": args.mode,
                      "batch": args.batch,
                      "images_per_s": round(steps * args.batch / elapsed, 1)}))


if __name__ == "__main__":
    main()
