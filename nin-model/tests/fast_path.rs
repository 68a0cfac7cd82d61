//! The CPU fast path computes what the plain candle path computes: same
//! logits, same gradients, same batch-norm running statistics, within
//! float rounding (relative 1e-4; the two sum in different orders).

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use candle_nn::ModuleT;
use nin_model::{Nin, NinConfig, Window};

fn batch(n: usize, size: usize, seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..n * size * size)
        .map(|_| rng.random::<f32>() * 2.0 - 0.5)
        .collect();
    Tensor::from_vec(v, (n, 1, size, size), &Device::Cpu).unwrap()
}

fn assert_close(what: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.dims(), b.dims(), "{what}");
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-4 * scale,
            "{what}[{i}]: fast {x} vs plain {y} (scale {scale})"
        );
    }
}

/// Two copies of the same seeded network, one per path, run on the same
/// batch: logits, loss gradients for every variable, running statistics.
fn compare(config: &NinConfig, n: usize) {
    let (mut plain, plain_vars) = Nin::init(config, 11, &Device::Cpu).unwrap();
    let (fast, fast_vars) = Nin::init(config, 11, &Device::Cpu).unwrap();
    let (taped, taped_vars) = Nin::init(config, 11, &Device::Cpu).unwrap();
    plain.set_fast_path(false);
    let x = batch(n, config.input_size, 5);
    let labels =
        Tensor::from_vec((0..n as u32).map(|i| i % 10).collect(), n, &Device::Cpu).unwrap();

    let plain_eval = plain.forward_t(&x, false).unwrap();
    assert_close(
        "eval logits",
        &fast.forward_t(&x, false).unwrap(),
        &plain_eval,
    );
    // Twice: the second pass runs on buffers the first one left behind.
    assert_close(
        "eval logits",
        &fast.forward_t(&x, false).unwrap(),
        &plain_eval,
    );
    // Every layer's output on the way; the last is exactly forward_t's
    // (a server's explanation must not change its answer).
    let fast_trace = fast.forward_trace(&x, false).unwrap();
    let plain_trace = plain.forward_trace(&x, false).unwrap();
    assert_eq!(fast_trace.len(), plain_trace.len());
    for ((name, f), (plain_name, p)) in fast_trace.iter().zip(&plain_trace) {
        assert_eq!(name, plain_name);
        assert_close(name, f, p);
    }
    let exact = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let traced_logits = &fast_trace.last().unwrap().1;
    assert_eq!(
        exact(traced_logits),
        exact(&fast.forward_t(&x, false).unwrap())
    );
    // Fixed (non-variable) tensors, as loaded from a file: the fast path
    // keeps their weight matrices from the first call.
    let frozen = Nin::snapshot(config, &fast_vars).unwrap();
    for _ in 0..2 {
        let logits = frozen.forward_t(&x, false).unwrap();
        assert_close("frozen logits", &logits, &plain_eval);
    }

    let step = |model: &Nin| {
        let logits = model.forward_t(&x, true).unwrap();
        let loss = candle_nn::loss::cross_entropy(&logits, &labels).unwrap();
        (logits, loss.backward().unwrap())
    };
    let (fast_logits, fast_grads) = step(&fast);
    let (plain_logits, plain_grads) = step(&plain);
    assert_close("train logits", &fast_logits, &plain_logits);
    // The hand-written backward of `forward_train` (after a first step, so
    // that its buffers are reused; the copy's parameters do not change).
    // Running statistics only after the first: the second updates them again.
    for first in [true, false] {
        let pass = taped.forward_train(&x).unwrap();
        assert_close("tape logits", pass.logits(), &plain_logits);
        let loss = candle_nn::loss::cross_entropy(pass.logits(), &labels).unwrap();
        let grads = pass.backward(&loss).unwrap();
        compare_vars(&taped_vars, &grads, &plain_vars, &plain_grads, first);
    }
    compare_vars(&fast_vars, &fast_grads, &plain_vars, &plain_grads, true);
}

/// Same gradient for every variable, or same value for buffers (batch
/// norm's running statistics, which have none).
fn compare_vars(
    fast_vars: &candle_nn::VarMap,
    fast_grads: &GradStore,
    plain_vars: &candle_nn::VarMap,
    plain_grads: &GradStore,
    buffers: bool,
) {
    let fast_vars = fast_vars.data().lock().unwrap();
    let plain_vars = plain_vars.data().lock().unwrap();
    for (name, plain_var) in plain_vars.iter() {
        let fast_var = &fast_vars[name];
        match (fast_grads.get(fast_var), plain_grads.get(plain_var)) {
            (Some(f), Some(p)) => assert_close(&format!("grad {name}"), f, p),
            (None, None) if !buffers => {}
            (None, None) => assert_close(
                &format!("buffer {name}"),
                fast_var.as_tensor(),
                plain_var.as_tensor(),
            ),
            _ => panic!("{name}: gradient on one path only"),
        }
    }
}

fn no_dropout(config: NinConfig) -> NinConfig {
    // Masks are drawn in each path's own memory order; compare without them.
    NinConfig {
        dropout: 0.0,
        ..config
    }
}

#[test]
fn compact_paths_agree() {
    compare(&no_dropout(NinConfig::compact()), 4);
}

#[test]
fn batch_norm_paths_agree() {
    let config = NinConfig {
        batch_norm: true,
        ..no_dropout(NinConfig::compact())
    };
    compare(&config, 4);
}

#[test]
fn padded_pools_and_single_mlp_conv_agree() {
    let mut config = no_dropout(NinConfig::compact());
    config.mlp_convs = 1;
    config.batch_norm = true;
    for (block, channels) in config.blocks.iter_mut().zip([16, 24, 32]) {
        block.channels = channels;
        block.conv = Window::new(3, 1, 1);
        block.pool = Some(Window::new(3, 2, 1));
    }
    compare(&config, 3);
}

#[test]
fn d2l_geometry_agrees() {
    // The book's strides and kernels (11/4, 5/2 padded, 3/2 pools) at a
    // width and size that keep the test fast.
    let mut config = no_dropout(NinConfig::d2l());
    config.input_size = 67;
    for (block, channels) in config.blocks.iter_mut().zip([8, 12, 16]) {
        block.channels = channels;
    }
    compare(&config, 2);
}

#[test]
fn dropout_on_the_fast_path_is_seeded_too() {
    let config = NinConfig::compact();
    let (a, _) = Nin::init(&config, 3, &Device::Cpu).unwrap();
    let (b, _) = Nin::init(&config, 3, &Device::Cpu).unwrap();
    let x = batch(2, 28, 1);
    let ya = a.forward_t(&x, true).unwrap();
    let yb = b.forward_t(&x, true).unwrap();
    assert_eq!(
        ya.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        yb.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    assert_eq!(ya.dtype(), DType::F32);
}

#[test]
fn an_empty_batch_is_empty_logits_or_an_error_never_a_panic() {
    for batch_norm in [false, true] {
        let config = NinConfig {
            batch_norm,
            ..NinConfig::compact()
        };
        let (model, _) = Nin::init(&config, 1, &Device::Cpu).unwrap();
        let empty = Tensor::zeros((0, 1, 28, 28), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(model.forward_t(&empty, false).unwrap().dims(), &[0, 10]);
        let pass = model.forward_train(&empty);
        if batch_norm {
            let err = pass.err().expect("batch statistics of nothing");
            assert!(err.to_string().contains("non-empty batch"), "{err}");
        } else {
            assert_eq!(pass.unwrap().logits().dims(), &[0, 10]);
        }
    }
}

/// With dropout on, the hand-written backward pass and candle's autograd
/// over the fast path's custom ops draw the same masks and agree.
#[test]
fn dropout_gradients_match_autograd() {
    let config = NinConfig::compact();
    let (autograd, autograd_vars) = Nin::init(&config, 7, &Device::Cpu).unwrap();
    let (taped, taped_vars) = Nin::init(&config, 7, &Device::Cpu).unwrap();
    let x = batch(3, 28, 2);
    let labels = Tensor::from_vec(vec![1u32, 4, 9], 3, &Device::Cpu).unwrap();
    let logits = autograd.forward_t(&x, true).unwrap();
    let loss = candle_nn::loss::cross_entropy(&logits, &labels).unwrap();
    let autograd_grads = loss.backward().unwrap();
    let pass = taped.forward_train(&x).unwrap();
    assert_close("logits", pass.logits(), &logits);
    let loss = candle_nn::loss::cross_entropy(pass.logits(), &labels).unwrap();
    let taped_grads = pass.backward(&loss).unwrap();
    compare_vars(
        &taped_vars,
        &taped_grads,
        &autograd_vars,
        &autograd_grads,
        true,
    );
}
