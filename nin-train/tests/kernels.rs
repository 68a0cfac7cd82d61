//! The generic kernel set (what CUDA and Metal run) against the native one,
//! on real Fashion-MNIST images (the committed test slice) and the shipped
//! network: the code a GPU runs, proven on CPU.
//!
//! `NIN_TEST_DEVICE=cuda` (a `--features cuda` build on a machine with a
//! GPU; `.ci/gpu-check.sh`) runs the generic side on that device instead,
//! against the native kernels on the CPU.

use std::path::Path;

use candle_core::{Device, Tensor};
use candle_nn::ModuleT;
use candle_nn::VarMap;
use nin_model::{weights, Kernels, Nin};
use nin_train::data::{load_split, Dataset, Split};
use nin_train::loader;

/// Where the generic kernels run: `NIN_TEST_DEVICE`, else the CPU.
fn generic_device() -> Device {
    std::env::var("NIN_TEST_DEVICE").map_or(Device::Cpu, |name| {
        nin_model::device::select_device(&name).unwrap()
    })
}

/// The device of a kernel set's side of a comparison.
fn device_of(kernels: Kernels) -> Device {
    match kernels {
        Kernels::Native => Device::Cpu,
        Kernels::Generic => generic_device(),
    }
}

/// The shipped network as variables (so that gradients and running
/// statistics can be looked up by name), on `kernels`.
fn shipped(kernels: Kernels) -> (Nin, VarMap, weights::WeightsMetadata) {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../weights/nin-fashion-mnist.safetensors");
    let device = device_of(kernels);
    let weights::Weights { metadata, tensors } = weights::read(&path, &device).unwrap();
    let (mut model, varmap) = Nin::init(&metadata.config, 0, &device).unwrap();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        var.set(&tensors[name]).unwrap();
    }
    model.set_kernels(kernels).unwrap();
    (model, varmap, metadata)
}

fn predictions(logits: &Tensor) -> Vec<u32> {
    logits.argmax(1).unwrap().to_vec1().unwrap()
}

fn slice() -> Dataset {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data");
    load_split(&dir, Split::Test).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Per element: |a - b| <= atol + 1e-3 |b|.
fn assert_close(what: &str, a: &Tensor, b: &Tensor, atol: f32) {
    assert_eq!(a.dims(), b.dims(), "{what}");
    for (i, (x, y)) in values(a).iter().zip(values(b)).enumerate() {
        assert!(
            (x - y).abs() <= atol + 1e-3 * y.abs(),
            "{what}[{i}]: generic {x} vs native {y}"
        );
    }
}

#[test]
fn the_shipped_weights_predict_the_same_classes_with_both_kernel_sets() {
    let data = slice();
    let (native, _, metadata) = shipped(Kernels::Native);
    let (generic, _, _) = shipped(Kernels::Generic);
    let (mut same, mut total) = (0, 0);
    let indices: Vec<usize> = (0..data.len()).collect();
    for chunk in indices.chunks(100) {
        let (x, _) =
            loader::batch(&data, chunk, &metadata.preprocessing, None, &Device::Cpu).unwrap();
        let a = native.forward_t(&x, false).unwrap();
        let b = generic
            .forward_t(&x.to_device(&generic_device()).unwrap(), false)
            .unwrap();
        assert!(!b.track_op(), "serving built an autograd graph");
        assert_close("logits", &b, &a, 1e-4);
        let (pa, pb) = (predictions(&a), predictions(&b));
        same += pa.iter().zip(&pb).filter(|(a, b)| a == b).count();
        total += chunk.len();
    }
    assert_eq!(total, 1000);
    assert!(same >= 999, "only {same} of {total} predictions agree");
}

/// One training step of the shipped network (batch norm, dropout on with
/// the same mask, given as the trainer gives it) on real images: logits,
/// every parameter's gradient and the running statistics agree element by
/// element.
#[test]
fn a_training_step_on_real_images_agrees() {
    let data = slice();
    let (native, native_vars, metadata) = shipped(Kernels::Native);
    let (generic, generic_vars, _) = shipped(Kernels::Generic);
    let indices: Vec<usize> = (0..64).collect();
    let (x, y) =
        loader::batch(&data, &indices, &metadata.preprocessing, None, &Device::Cpu).unwrap();
    let plan = native.mask_plan().expect("the shipped network has dropout");
    let mask = plan.draw(64, &mut nin_model::init::rng_for(5, "a step"));
    let mask = plan
        .tensor(&Tensor::new(mask.as_slice(), &Device::Cpu).unwrap(), 64)
        .unwrap();
    let step = |model: &Nin, device: &Device| {
        let (x, y) = (x.to_device(device).unwrap(), y.to_device(device).unwrap());
        let mask = mask.to_device(device).unwrap();
        let pass = model.forward_train_with(&x, Some(&mask)).unwrap();
        let logits = pass.logits().clone();
        let loss = candle_nn::loss::cross_entropy(&logits, &y).unwrap();
        (logits, pass.backward(&loss).unwrap())
    };
    let (native_logits, native_grads) = step(&native, &Device::Cpu);
    let (generic_logits, generic_grads) = step(&generic, &generic_device());
    assert_close("train logits", &generic_logits, &native_logits, 1e-4);
    let (native_vars, generic_vars) = (
        native_vars.data().lock().unwrap(),
        generic_vars.data().lock().unwrap(),
    );
    let mut gradients = 0;
    for (name, n) in native_vars.iter() {
        let g = &generic_vars[name];
        match (native_grads.get(n), generic_grads.get(g)) {
            (Some(a), Some(b)) => {
                assert_close(&format!("grad {name}"), b, a, 1e-5);
                gradients += 1;
            }
            (None, None) => assert_close(
                &format!("running {name}"),
                g.as_tensor(),
                n.as_tensor(),
                1e-5,
            ),
            _ => panic!("{name}: a gradient from one kernel set only"),
        }
    }
    assert!(gradients > 20, "{gradients} gradients compared");
}
