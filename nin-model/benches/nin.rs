//! criterion benchmarks of the workloads the performance issue tracks:
//! forward at batch 1 and 64 and a training step (forward, cross-entropy,
//! backward, SGD update) per preset. For the comparison with PyTorch see
//! `bench/compare.sh`.
//!
//! cargo bench -p nin-model --bench nin

use candle_core::{Device, Tensor};
use candle_nn::{ModuleT, Optimizer};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use nin_model::{Nin, NinConfig};

fn inputs(config: &NinConfig, batch: usize) -> (Tensor, Tensor) {
    let s = config.input_size;
    let x = Tensor::rand(0f32, 1f32, (batch, config.in_channels, s, s), &Device::Cpu).unwrap();
    let labels: Vec<u32> = (0..batch as u32)
        .map(|i| i % config.num_classes as u32)
        .collect();
    (x, Tensor::from_vec(labels, batch, &Device::Cpu).unwrap())
}

fn forward(c: &mut Criterion) {
    let mut group = c.benchmark_group("forward");
    group.sample_size(20);
    for preset in ["compact", "d2l"] {
        let config = NinConfig::preset(preset).unwrap();
        // Fixed parameters, as a server runs loaded weights.
        let (_, varmap) = Nin::init(&config, 0, &Device::Cpu).unwrap();
        let model = Nin::snapshot(&config, &varmap).unwrap();
        for batch in [1, 64] {
            let (x, _) = inputs(&config, batch);
            group.throughput(Throughput::Elements(batch as u64));
            group.bench_with_input(BenchmarkId::new(preset, batch), &x, |b, x| {
                b.iter(|| model.forward_t(x, false).unwrap())
            });
        }
    }
    group.finish();
}

fn train_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("train_step");
    group.sample_size(10);
    for (preset, batch) in [("compact", 128), ("d2l", 16)] {
        let config = NinConfig::preset(preset).unwrap();
        let (model, varmap) = Nin::init(&config, 0, &Device::Cpu).unwrap();
        let mut sgd = candle_nn::SGD::new(varmap.all_vars(), 1e-3).unwrap();
        let (x, y) = inputs(&config, batch);
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(BenchmarkId::new(preset, batch), |b| {
            b.iter(|| {
                let pass = model.forward_train(&x).unwrap();
                let loss = candle_nn::loss::cross_entropy(pass.logits(), &y).unwrap();
                sgd.step(&pass.backward(&loss).unwrap()).unwrap();
            })
        });
    }
    group.finish();
}

criterion_group!(benches, forward, train_step);
criterion_main!(benches);
