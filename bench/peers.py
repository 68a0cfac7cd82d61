"""The peers' half of bench/compare.sh: one workload on one engine.

Every engine runs the network nin measured: ONNX Runtime and OpenVINO load
the ONNX file that nin's `throughput --onnx` exported; PyTorch builds the
twin from the same NinConfig (nin_torch.py) and takes its weights from that
file too. Each engine runs in the configuration its users would pick for
speed on a CPU:

  torch      PyTorch eager, NCHW (its default layout)
  torch-cl   PyTorch eager, channels_last (model and input)
  ort        ONNX Runtime, CPU execution provider, every graph optimisation,
             intra-op threads = --threads
  openvino   OpenVINO, f32 (INFERENCE_PRECISION_HINT), --threads threads,
             performance hint LATENCY at batch 1 and THROUGHPUT above it
             (then as many requests in flight as it says is optimal)

and, for nin's bf16 mode, the peers' own low-precision defaults:

  torch-bf16     torch-cl under torch.autocast("cpu", dtype=torch.bfloat16)
  openvino-bf16  openvino with no precision hint: its default, bf16 on a
                 CPU with bf16 units (the chosen precision is printed)

Prints one JSON line like the Rust `throughput` example:

    python bench/peers.py --engine ort --onnx net.onnx --config net.json \
        --mode forward --batch 64 --seconds 4 --threads 2
"""
import argparse
import json
import time

import numpy as np


def run_for(seconds, step, batch):
    """Images per second of `step` (one batch each) over `seconds`, after a
    warm-up step; at least 3 steps."""
    step()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or steps < 3:
        step()
        steps += 1
    return steps * batch / (time.perf_counter() - start)


def torch_workload(args, config, x):
    import onnx
    import torch
    from onnx import numpy_helper
    from torch import nn

    import nin_torch

    torch.set_num_threads(args.threads)
    model = nin_torch.nin(config)
    if args.onnx:
        load_onnx_weights(model, onnx.load(args.onnx), numpy_helper, torch)
    x = torch.from_numpy(x)
    if args.engine in ("torch-cl", "torch-bf16"):
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.arange(args.batch) % config["num_classes"]
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.engine == "torch-bf16")

    def step():
        if args.mode == "forward":
            with torch.inference_mode(), autocast:
                model(x)
        else:
            opt.zero_grad(set_to_none=True)
            with autocast:
                loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()

    model.train(args.mode == "train")
    return run_for(args.seconds, step, args.batch)


def load_onnx_weights(model, graph_model, numpy_helper, torch):
    """Copies the exported initializers into the twin, node by node: the
    ONNX Conv and BatchNormalization nodes come in the order of the twin's
    Conv2d and BatchNorm2d modules."""
    init = {t.name: numpy_helper.to_array(t) for t in graph_model.graph.initializer}
    nodes = [n for n in graph_model.graph.node if n.op_type in ("Conv", "BatchNormalization")]
    modules = [m for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d))]
    if len(nodes) != len(modules):
        raise SystemExit(f"the ONNX file has {len(nodes)} conv/norm nodes, the twin {len(modules)}")
    with torch.no_grad():
        for node, module in zip(nodes, modules):
            if isinstance(module, torch.nn.Conv2d):
                targets = [module.weight, module.bias]
            else:
                targets = [module.weight, module.bias, module.running_mean, module.running_var]
            names = list(node.input[1:])
            for target, name in zip(targets, names):
                value = torch.from_numpy(init[name].copy())
                if target is None or target.shape != value.shape:
                    raise SystemExit(f"{name}: shape {tuple(value.shape)} does not fit the twin")
                target.copy_(value)


def ort_workload(args, x):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(args.onnx, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return run_for(args.seconds, lambda: session.run(None, {name: x}), args.batch)


def openvino_workload(args, x):
    import openvino as ov

    core = ov.Core()
    hint = "LATENCY" if args.batch == 1 else "THROUGHPUT"
    config = {"INFERENCE_NUM_THREADS": args.threads, "PERFORMANCE_HINT": hint}
    if args.engine == "openvino":
        config["INFERENCE_PRECISION_HINT"] = "f32"
    compiled = core.compile_model(args.onnx, "CPU", config)
    chosen = compiled.get_property("INFERENCE_PRECISION_HINT")
    args.precision = chosen.get_type_name() if hasattr(chosen, "get_type_name") else str(chosen)
    if hint == "LATENCY":
        request = compiled.create_infer_request()
        return run_for(args.seconds, lambda: request.infer({0: x}), args.batch)
    jobs = compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
    queue = ov.AsyncInferQueue(compiled, jobs)

    def step():  # `jobs` batches in flight, counted as `jobs` steps' images
        for _ in range(jobs):
            queue.start_async({0: x})
        queue.wait_all()

    return run_for(args.seconds, step, args.batch * jobs)


def main():
    ap = argparse.ArgumentParser()
    engines = ["torch", "torch-cl", "torch-bf16", "ort", "openvino", "openvino-bf16"]
    ap.add_argument("--engine", choices=engines, required=True)
    ap.add_argument("--config", required=True, help="NinConfig JSON file")
    ap.add_argument("--onnx", help="the network as nin exported it (forward; weights for torch)")
    ap.add_argument("--arch", default="custom", help="name to print")
    ap.add_argument("--mode", choices=["forward", "train"], required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    with open(args.config) as f:
        config = json.load(f)
    s = config["input_size"]
    x = np.random.default_rng(0).random((args.batch, config["in_channels"], s, s),
                                        dtype=np.float32)
    args.precision = "bf16" if args.engine == "torch-bf16" else "f32"
    if args.engine.startswith("torch"):
        rate = torch_workload(args, config, x)
    elif args.mode != "forward" or not args.onnx:
        raise SystemExit(f"{args.engine} runs `forward` on an --onnx file only")
    elif args.engine == "ort":
        rate = ort_workload(args, x)
    else:
        rate = openvino_workload(args, x)
    print(json.dumps({"impl": args.engine, "arch": args.arch, "mode": args.mode,
                      "batch": args.batch, "precision": args.precision,
                      "images_per_s": round(rate, 1)}))


if __name__ == "__main__":
    main()
