//! Gradients flow end to end: a NiN memorises a small batch of real
//! Fashion-MNIST images (the committed test slice) within a few hundred
//! steps, trained through the pass `nin-train` uses (`forward_train` and
//! its explicit backward), not candle's autograd.

use std::path::Path;

use candle_core::Device;
use candle_nn::ModuleT;
use nin_model::preprocess::Preprocessing;
use nin_model::{Nin, NinConfig};
use nin_train::data::{load_split, Split};
use nin_train::loader::batch;
use nin_train::optim::{Optimizer, OptimizerConfig};

#[test]
fn nin_overfits_a_small_real_batch() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data");
    let data = load_split(&dir, Split::Test).unwrap();
    // The compact design at reduced width keeps this test to seconds; the
    // mechanism (overlapping pools, 1x1 convs, GAP head) is all there.
    let mut config = NinConfig::compact();
    for (block, width) in config.blocks.iter_mut().zip([16, 32, 48]) {
        block.channels = width;
    }
    config.dropout = 0.0;
    let device = Device::Cpu;
    let indices: Vec<usize> = (0..32).collect();
    let (x, y) = batch(
        &data,
        &indices,
        &Preprocessing::fashion_mnist(28),
        None,
        &device,
    )
    .unwrap();

    let (model, varmap) = Nin::init(&config, 3, &device).unwrap();
    let adamw = OptimizerConfig::Adamw {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let mut optimizer = Optimizer::new(adamw, &varmap);
    let eval_loss = || {
        let logits = model.forward_t(&x, false).unwrap();
        let loss = candle_nn::loss::cross_entropy(&logits, &y).unwrap();
        loss.to_scalar::<f32>().unwrap()
    };
    let first = eval_loss();
    for _ in 0..150 {
        let pass = model.forward_train(&x).unwrap();
        let loss = candle_nn::loss::cross_entropy(pass.logits(), &y).unwrap();
        let grads = pass.backward(&loss).unwrap();
        optimizer.step(&grads, 3e-3, 1.0).unwrap();
    }
    let last = eval_loss();
    let predictions = model.forward_t(&x, false).unwrap().argmax(1).unwrap();
    let correct = predictions
        .eq(&y)
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap();
    let accuracy = correct.mean_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(
        first > 2.0,
        "an untrained 10-class model starts near ln 10: {first}"
    );
    assert!(last < 0.2 * first, "loss went from {first} to {last}");
    assert!(accuracy > 0.9, "memorised only {accuracy} of the batch");
}
