//! Images per second of one workload, printed as one JSON line.
//!
//! nin's half of `bench/compare.sh`, which runs the peers
//! (`bench/peers.py`) on the same workloads beside it. Workloads: `forward` (inference on
//! fixed tensors, as a server runs loaded weights) and `train` (forward,
//! cross-entropy, backward, plain SGD update on variables).
//! The network is a preset, a `NinConfig` JSON file, or a weights file
//! (`forward` only): the very network a server loads, as `bench/load.sh`
//! uses it to measure the model's raw batched throughput beside the server's.
//!
//! Options `--kernels native|generic` (or `NIN_KERNELS`) and `--device D`
//! (or `NIN_DEVICE`, default cpu) choose where and with which kernel set,
//! `--precision fp32|bf16` (or `NIN_PRECISION`) what the native kernels'
//! matrix multiplies compute in.
//! `--onnx FILE` also writes the measured network (`forward` only) as ONNX,
//! so that `bench/compare.sh` runs ONNX Runtime and OpenVINO on the very
//! weights nin ran.
//!
//! cargo run --release -p nin-model --example throughput -- compact train 128 10
//! cargo run --release -p nin-model --example throughput -- weights/nin-fashion-mnist.safetensors forward 32 10
//! cargo run --release -p nin-model --example throughput -- --kernels generic compact forward 64 5

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use candle_core::{DType, Tensor};
use candle_nn::{ModuleT, Optimizer};
use nin_model::device::select_device;
use nin_model::weights::{Provenance, WeightsMetadata};
use nin_model::{onnx, summary, weights, Compute, Kernels, Nin, NinConfig, Precision};

/// jemalloc, started with the workspace's options (thp:always, transparent
/// huge pages; set once for every binary in `.cargo/config.toml`).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    let mut kernels = std::env::var("NIN_KERNELS").ok();
    let mut device = std::env::var("NIN_DEVICE").unwrap_or_else(|_| "cpu".into());
    let mut precision = std::env::var("NIN_PRECISION").unwrap_or_else(|_| "fp32".into());
    let mut onnx_out = None;
    let mut args = Vec::new();
    let mut rest = std::env::args().skip(1);
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--kernels" => kernels = Some(rest.next().context("--kernels needs a value")?),
            "--device" => device = rest.next().context("--device needs a value")?,
            "--precision" => precision = rest.next().context("--precision needs a value")?,
            "--onnx" => onnx_out = Some(rest.next().context("--onnx needs a file")?),
            _ => args.push(arg),
        }
    }
    let [arch, mode, batch, seconds] = args.as_slice() else {
        bail!(
            "usage: throughput [--kernels native|generic] [--device D] [--precision fp32|bf16] [--onnx FILE] <d2l|compact|config.json|weights.safetensors> <forward|train> <batch> <seconds>"
        )
    };
    let batch: usize = batch.parse().context("batch")?;
    let budget = Duration::from_secs_f64(seconds.parse().context("seconds")?);
    let kernels = kernels
        .map(|k| k.parse::<Kernels>().map_err(anyhow::Error::msg))
        .transpose()?;
    let precision = precision.parse::<Precision>().map_err(anyhow::Error::msg)?;
    let compute = Compute::new(select_device(&device)?, kernels)?.with_precision(precision)?;
    let device = compute.device.clone();
    if onnx_out.is_some() && mode != "forward" {
        bail!("--onnx exports the network `forward` measures");
    }
    let (config, trained) = if arch.ends_with(".safetensors") {
        if mode != "forward" {
            bail!(
                "a weights file can only be measured with `forward`; give its config JSON to train"
            );
        }
        let (model, metadata) = weights::load(Path::new(arch), &device)?;
        (metadata.config.clone(), Some((model, metadata)))
    } else if arch.ends_with(".json") {
        (serde_json::from_str(&std::fs::read_to_string(arch)?)?, None)
    } else {
        (NinConfig::preset(arch)?, None)
    };
    let (fresh, varmap) = Nin::init(&config, 0, &device)?;
    // `train` updates `varmap`, so it must run the fresh network built on it;
    // `forward` runs on fixed tensors, as a server does with loaded weights.
    let (mut model, metadata) = match (trained, mode.as_str()) {
        (Some((trained, metadata)), _) => (trained, Some(metadata)),
        (None, "forward") => (Nin::snapshot(&config, &varmap)?, None),
        (None, _) => (fresh, None),
    };
    model.set_compute(&compute)?;
    if let Some(path) = &onnx_out {
        let metadata = metadata.unwrap_or_else(|| {
            WeightsMetadata::fashion_mnist(config.clone(), Provenance::default())
        });
        weights::write_atomically(Path::new(path), &onnx::export(&model, &metadata)?)
            .with_context(|| format!("writing {path}"))?;
    }
    let s = config.input_size;
    let x = Tensor::rand(0f32, 1f32, (batch, config.in_channels, s, s), &device)?;
    let labels = Tensor::from_vec(
        (0..batch as u32)
            .map(|i| i % config.num_classes as u32)
            .collect(),
        batch,
        &device,
    )?;
    let mut sgd = candle_nn::SGD::new(varmap.all_vars(), 1e-3)?;
    let mut step = || -> anyhow::Result<()> {
        match mode.as_str() {
            "forward" => {
                model.forward_t(&x, false)?.to_dtype(DType::F32)?;
            }
            "train" => {
                let pass = model.forward_train(&x)?;
                let loss = candle_nn::loss::cross_entropy(pass.logits(), &labels)?;
                sgd.step(&pass.backward(&loss)?)?;
            }
            other => bail!("unknown mode {other}"),
        }
        Ok(())
    };
    // This thread runs the passes as a worker of their pool, as a
    // server's model thread does.
    let (start, steps) = nin_model::threads::as_pool_worker(|| -> anyhow::Result<_> {
        step()?; // warm-up
        let start = Instant::now();
        let mut steps = 0usize;
        while start.elapsed() < budget || steps < 3 {
            step()?;
            steps += 1;
        }
        Ok((start, steps))
    })?;
    device.synchronize()?; // a GPU queues work: count it done
    let elapsed = start.elapsed().as_secs_f64();
    let flops = summary::summarize(&config, batch, summary::OptimizerKind::Sgd)?;
    let per_step = if mode == "train" {
        flops.training_step_flops
    } else {
        flops.forward_flops
    } as f64;
    println!(
        "{{\"impl\":\"nin\",\"kernels\":\"{}\",\"precision\":\"{}\",\"arch\":\"{arch}\",\"mode\":\"{mode}\",\"batch\":{batch},\"images_per_s\":{:.1},\"gflops\":{:.2}}}",
        compute.kernels,
        compute.precision,
        (steps * batch) as f64 / elapsed,
        per_step * steps as f64 / elapsed / 1e9
    );
    Ok(())
}
