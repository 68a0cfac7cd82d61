"""PyTorch's twin of nin's network, for bench/peers.py.

The network is built from a NinConfig (the JSON that nin-summary prints, or
a weights file's config), so the two sides cannot drift apart.
"""
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
