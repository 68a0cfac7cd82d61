//! Both kernel sets compute what candle's autograd computes on the plain
//! path: same logits, same gradients, same batch-norm running statistics,
//! and agree with each other in evaluation. Dropout is on, with the same
//! masks everywhere (drawn in channels-last order on every path), and some
//! inputs are blank so that pooling windows tie (all zero after ReLU).
//!
//! Tolerances are per element: |a - b| <= 1e-5 + 1e-3 |b| (the paths sum
//! in different orders, and native batch norm takes its statistics in F64,
//! the generic set in F32).

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use candle_nn::ModuleT;
use nin_model::{Kernels, Nin, NinConfig, Window};

/// `n` random images; with `blanks`, every other one is blank in its top
/// half (pooling ties after the first ReLU, as on Fashion-MNIST's black
/// background).
fn batch(n: usize, size: usize, seed: u64, blanks: bool) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..n * size * size)
        .map(|i| {
            let (image, row) = (i / (size * size), i / size % size);
            let value = rng.random::<f32>() * 2.0 - 0.5;
            if blanks && image % 2 == 1 && row < size / 2 {
                0.0
            } else {
                value
            }
        })
        .collect();
    Tensor::from_vec(v, (n, 1, size, size), &Device::Cpu).unwrap()
}

fn assert_close(what: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.dims(), b.dims(), "{what}");
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 + 1e-3 * y.abs(),
            "{what}[{i}]: {x} vs reference {y}"
        );
    }
}

fn compare(config: &NinConfig, n: usize) {
    let x = batch(n, config.input_size, 5, false);
    compare_on(config, &x, Reference::Autograd);
    // Blank regions: pooling windows that tie (all zero after ReLU).
    let x = batch(n, config.input_size, 6, true);
    compare_on(config, &x, Reference::Native);
}

/// What the kernel sets' training passes are held to.
#[derive(Debug)]
enum Reference {
    /// candle's autograd on the plain path.
    Autograd,
    /// The native kernels: candle's ReLU passes a gradient where its input
    /// is exactly 0 (it tests >= 0), PyTorch and both kernel sets do not
    /// (> 0), so on blank inputs, whose pre-activations are exactly 0,
    /// only the kernel sets can be compared.
    Native,
}

/// Seeded copies of one network, one per kernel set and one for the
/// reference, run on the same batch `x`.
fn compare_on(config: &NinConfig, x: &Tensor, reference: Reference) {
    let n = x.dim(0).unwrap();
    let labels =
        Tensor::from_vec((0..n as u32).map(|i| i % 10).collect(), n, &Device::Cpu).unwrap();
    let (reference_model, reference_vars) = Nin::init(config, 11, &Device::Cpu).unwrap();
    let (reference_logits, reference_grads) = match reference {
        Reference::Autograd => {
            let logits = reference_model.forward_t(x, true).unwrap();
            let loss = candle_nn::loss::cross_entropy(&logits, &labels).unwrap();
            (logits, loss.backward().unwrap())
        }
        Reference::Native => {
            let pass = reference_model.forward_train(x).unwrap();
            let loss = candle_nn::loss::cross_entropy(pass.logits(), &labels).unwrap();
            (pass.logits().clone(), pass.backward(&loss).unwrap())
        }
    };

    // The mask the reference drew first from the network's own stream,
    // given to the kernel sets (as a trainer gives it), so all drop the
    // same values on every pass.
    let mask = reference_model.mask_plan().map(|plan| {
        let values = plan.draw(n, &mut nin_model::init::rng_for(11, "dropout"));
        plan.tensor(&Tensor::new(values.as_slice(), &Device::Cpu).unwrap(), n)
            .unwrap()
    });

    let mut evaluations = Vec::new();
    for kernels in [Kernels::Native, Kernels::Generic] {
        let what = |s: &str| format!("{kernels} against {reference:?}: {s}");
        let (mut model, vars) = Nin::init(config, 11, &Device::Cpu).unwrap();
        model.set_kernels(kernels).unwrap();
        // Twice: the second pass runs on buffers the first one left behind
        // (the parameters do not change; the running statistics move
        // again, so they are compared after the first only).
        for first in [true, false] {
            let pass = model.forward_train_with(x, mask.as_ref()).unwrap();
            assert_close(&what("train logits"), pass.logits(), &reference_logits);
            let loss = candle_nn::loss::cross_entropy(pass.logits(), &labels).unwrap();
            let grads = pass.backward(&loss).unwrap();
            compare_vars(
                &what("vars"),
                &vars,
                &grads,
                &reference_vars,
                &reference_grads,
                first,
            );
        }
        let eval = model.forward_t(x, false).unwrap();
        assert!(!eval.track_op(), "{}", what("evaluation built a graph"));
        // Every layer's output on the way; the last is exactly forward_t's
        // (a server's explanation must not change its answer).
        let trace = model.forward_trace(x, false).unwrap();
        let exact = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(exact(&trace.last().unwrap().1), exact(&eval));
        // Fixed (non-variable) tensors, as loaded from a file: the native
        // set keeps their weight matrices from the first call.
        let mut frozen = Nin::snapshot(config, &vars).unwrap();
        frozen.set_kernels(kernels).unwrap();
        for _ in 0..2 {
            assert_close(
                &what("frozen logits"),
                &frozen.forward_t(x, false).unwrap(),
                &eval,
            );
        }
        evaluations.push((trace, eval));
    }
    let (native, generic) = (&evaluations[0], &evaluations[1]);
    assert_close("generic eval logits", &generic.1, &native.1);
    assert_eq!(native.0.len(), generic.0.len());
    for ((name, n), (generic_name, g)) in native.0.iter().zip(&generic.0) {
        assert_eq!(name, generic_name);
        assert_close(&format!("generic {name}"), g, n);
    }
}

/// Same gradient for every variable, or same value for buffers (batch
/// norm's running statistics, which have none).
fn compare_vars(
    what: &str,
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
            (Some(f), Some(p)) => assert_close(&format!("{what}: grad {name}"), f, p),
            (None, None) if !buffers => {}
            (None, None) => assert_close(
                &format!("{what}: buffer {name}"),
                fast_var.as_tensor(),
                plain_var.as_tensor(),
            ),
            _ => panic!("{what}: {name}: gradient on one path only"),
        }
    }
}

#[test]
fn compact_paths_agree() {
    compare(&NinConfig::compact(), 4);
}

#[test]
fn batch_norm_paths_agree() {
    let config = NinConfig {
        batch_norm: true,
        ..NinConfig::compact()
    };
    compare(&config, 4);
}

#[test]
fn padded_pools_and_single_mlp_conv_agree() {
    let mut config = NinConfig::compact();
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
    let mut config = NinConfig::d2l();
    config.input_size = 67;
    for (block, channels) in config.blocks.iter_mut().zip([8, 12, 16]) {
        block.channels = channels;
    }
    compare(&config, 2);
}

#[test]
fn an_empty_batch_is_empty_logits_or_an_error_never_a_panic() {
    let cases = [false, true].map(|b| [(b, Kernels::Native), (b, Kernels::Generic)]);
    for (batch_norm, kernels) in cases.into_iter().flatten() {
        let config = NinConfig {
            batch_norm,
            ..NinConfig::compact()
        };
        let (mut model, _) = Nin::init(&config, 1, &Device::Cpu).unwrap();
        model.set_kernels(kernels).unwrap();
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

#[test]
fn a_batch_gives_each_image_the_logits_it_gets_alone() {
    // Inference splits a batch into passes that threads run side by side:
    // however it is cut (odd sizes, more passes than threads), no image
    // sees another's values.
    let config = NinConfig {
        batch_norm: true,
        ..NinConfig::compact()
    };
    let (mut model, _) = Nin::init(&config, 3, &Device::Cpu).unwrap();
    model.set_kernels(Kernels::Native).unwrap();
    let x = batch(37, config.input_size, 9, true);
    let alone: Vec<Tensor> = (0..37)
        .map(|i| model.forward_t(&x.narrow(0, i, 1).unwrap(), false).unwrap())
        .collect();
    let alone = Tensor::cat(&alone, 0).unwrap();
    for threads in [1, 2, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let together = pool.install(|| model.forward_t(&x, false).unwrap());
        assert_close(&format!("{threads} threads"), &together, &alone);
    }
}

#[test]
fn a_chained_pass_equals_the_pass_layer_by_layer_in_either_precision() {
    // Inference runs each block as one pass over strips of rows; a trace
    // runs it layer by layer. Same kernels, same sums: the same logits to
    // the bit, in FP32 and (where the units are) in bf16, with odd
    // channels (the first layer and a 1x1 one: FP32 inside a bf16 chain)
    // and a strip count that does not divide the rows; bf16 maps go on in
    // pairs alone through a max-pool, and (no pool after the second
    // block, as in the shipped network) past dropout into the head.
    let config = NinConfig {
        batch_norm: true,
        blocks: vec![
            nin_model::BlockConfig {
                channels: 25,
                ..NinConfig::compact().blocks[0]
            },
            nin_model::BlockConfig {
                pool: None,
                ..NinConfig::compact().blocks[1]
            },
        ],
        ..NinConfig::compact()
    };
    let (mut model, _) = Nin::init(&config, 5, &Device::Cpu).unwrap();
    for precision in [nin_model::Precision::Fp32, nin_model::Precision::Bf16] {
        if precision == nin_model::Precision::Bf16 && !nin_model::bf16::available() {
            eprintln!("skipped bf16: this CPU has no AVX512-BF16");
            continue;
        }
        let compute = nin_model::Compute::cpu()
            .with_precision_on_any_unit(precision)
            .unwrap();
        model.set_compute(&compute).unwrap();
        for n in [1, 7] {
            let x = batch(n, config.input_size, 13, true);
            let exact = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let chained = model.forward_t(&x, false).unwrap();
            let traced = model.forward_trace(&x, false).unwrap();
            assert_eq!(
                exact(&traced.last().unwrap().1),
                exact(&chained),
                "{precision}, {n} images"
            );
        }
    }
}
