//! Batches: data-set images through the shared preprocessing into tensors.
//!
//! Images stay as bytes until a batch is needed; each one is augmented (in
//! training) and then goes through [`nin_model::preprocess::preprocess`],
//! the same function the server calls, so a model never sees inputs
//! prepared differently from the ones it was trained on.
//!
//! A batch is made in two halves: [`prepare`] does the work on the host
//! (augmentation, preprocessing, and in training the dropout mask) and can
//! run on any thread; [`HostBatch::to_device`] sends it to the device in
//! one copy, on the thread that trains. [`Prefetch`] runs the first half
//! on a background thread, so the next batch is ready when a training step
//! ends.

use std::ops::Range;
use std::sync::mpsc::{self, Receiver};
use std::thread::{Scope, ScopedJoinHandle};

use candle_core::{DType, Device, Tensor};
use nin_model::dropout::MaskPlan;
use nin_model::preprocess::{batch_values, gray_image, preprocess, Prepared, Preprocessing};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::augment::Augment;
use crate::data::Dataset;
use crate::{Error, Result};

/// The images at `indices` as a (N, 1, S, S) tensor and their labels as (N,) u32,
/// augmented when `augment` is given.
pub fn batch(
    dataset: &Dataset,
    indices: &[usize],
    preprocessing: &Preprocessing,
    augment: Option<(&Augment, &mut ChaCha8Rng)>,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let batch = prepare(dataset, indices, preprocessing, augment)?.to_device(device)?;
    Ok((batch.images, batch.labels))
}

/// A batch made on the host, not yet on a device: what [`batch`] uploads.
#[derive(Clone, Debug)]
pub struct HostBatch {
    images: Vec<Prepared>,
    labels: Vec<u32>,
    size: usize,
    /// A training step's dropout mask, drawn with the batch.
    dropout: Option<(MaskPlan, Vec<f32>)>,
}

/// A batch on the device, from one host-to-device copy.
#[derive(Debug)]
pub struct DeviceBatch {
    /// (N, 1, S, S) f32.
    pub images: Tensor,
    /// (N,) u32.
    pub labels: Tensor,
    /// The (N, C, H, W) dropout mask for the training step, if drawn.
    pub dropout_mask: Option<Tensor>,
}

/// The host half of [`batch`]: augments and preprocesses the images at
/// `indices`. Touches no device, so it can run on a background thread
/// (a GPU context belongs to the thread that trains).
pub fn prepare(
    dataset: &Dataset,
    indices: &[usize],
    preprocessing: &Preprocessing,
    mut augment: Option<(&Augment, &mut ChaCha8Rng)>,
) -> Result<HostBatch> {
    let (rows, cols) = (dataset.images.rows, dataset.images.cols);
    let images = indices
        .iter()
        .map(|&i| {
            let pixels = match augment.as_mut() {
                Some((augment, rng)) => augment.apply(dataset.image(i), cols, rows, rng),
                None => dataset.image(i).to_vec(),
            };
            preprocess(
                &gray_image(pixels, cols as u32, rows as u32)?,
                preprocessing,
            )
        })
        .collect::<nin_model::Result<Vec<_>>>()?;
    let labels = indices
        .iter()
        .map(|&i| u32::from(dataset.label(i)))
        .collect();
    Ok(HostBatch {
        images,
        labels,
        size: preprocessing.size,
        dropout: None,
    })
}

impl HostBatch {
    /// Images in the batch.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the batch holds no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Draws the training step's dropout mask for this batch from `rng`
    /// (`plan` says its shape and probability), to travel with the batch.
    pub fn with_dropout(mut self, plan: MaskPlan, rng: &mut impl Rng) -> Self {
        self.dropout = Some((plan, plan.draw(self.len(), rng)));
        self
    }

    /// The batch on `device`, in one host-to-device copy: the images, the
    /// labels (as f32, exact below 2^24, cast on the device) and the
    /// dropout mask go over as one vector, then become views of it. On a
    /// GPU each copy is a transfer the step waits for.
    pub fn to_device(self, device: &Device) -> Result<DeviceBatch> {
        let n = self.len();
        let mut values = batch_values(&self.images, self.size)?;
        let image_len = values.len();
        values.extend(self.labels.iter().map(|&label| label as f32));
        if let Some((_, mask)) = &self.dropout {
            values.extend_from_slice(mask);
        }
        let len = values.len();
        let all = Tensor::from_vec(values, len, device)?;
        let images = all
            .narrow(0, 0, image_len)?
            .reshape((n, 1, self.size, self.size))?;
        let labels = all.narrow(0, image_len, n)?.to_dtype(DType::U32)?;
        let dropout_mask = match &self.dropout {
            Some((plan, mask)) => Some(plan.tensor(&all.narrow(0, image_len + n, mask.len())?, n)?),
            None => None,
        };
        Ok(DeviceBatch {
            images,
            labels,
            dropout_mask,
        })
    }
}

/// The results of `produce(i)` for each `i` of a range, in order, computed
/// on a background thread up to `ahead + 1` items before the consumer asks.
///
/// A bounded channel ([`mpsc::sync_channel`]) holds the finished items, so
/// memory stays bounded however slow the consumer is. Dropping the
/// iterator stops the thread (its next send fails) and waits for it; a
/// panic in `produce` is re-raised in the consumer. Each item must not
/// depend on the ones before it being consumed (training batches take
/// their random stream from (seed, epoch, batch), not from a shared
/// generator), so the items are exactly those a plain loop would make.
pub struct Prefetch<'scope, T> {
    receiver: Option<Receiver<T>>,
    thread: Option<ScopedJoinHandle<'scope, ()>>,
}

impl<'scope, T: Send + 'scope> Prefetch<'scope, T> {
    /// Starts the thread `nin-prefetch` in `scope`.
    pub fn spawn<'env, F>(
        scope: &'scope Scope<'scope, 'env>,
        range: Range<usize>,
        ahead: usize,
        mut produce: F,
    ) -> Result<Self>
    where
        F: FnMut(usize) -> T + Send + 'scope,
    {
        let (sender, receiver) = mpsc::sync_channel(ahead);
        let thread = std::thread::Builder::new()
            .name("nin-prefetch".into())
            .spawn_scoped(scope, move || {
                for i in range {
                    if sender.send(produce(i)).is_err() {
                        // The consumer is gone: stop early.
                        break;
                    }
                }
            })
            .map_err(|e| Error::Invalid(format!("cannot start the prefetch thread: {e}")))?;
        Ok(Self {
            receiver: Some(receiver),
            thread: Some(thread),
        })
    }
}

impl<'scope, T: Send + 'scope> Iterator for Prefetch<'scope, T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        let item = self.receiver.as_ref()?.recv().ok();
        if item.is_none() {
            // The range is done, or `produce` panicked: join to tell which.
            self.receiver = None;
            self.join();
        }
        item
    }
}

impl<T> Prefetch<'_, T> {
    /// Waits for the thread; re-raises its panic unless this thread is
    /// already unwinding.
    fn join(&mut self) {
        if let Some(thread) = self.thread.take() {
            if let Err(panic) = thread.join() {
                if !std::thread::panicking() {
                    std::panic::resume_unwind(panic);
                }
            }
        }
    }
}

impl<T> Drop for Prefetch<'_, T> {
    fn drop(&mut self) {
        // Dropping the receiver first makes the thread's next send fail,
        // so the join cannot wait on a full channel.
        self.receiver = None;
        self.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{load_split, Split};
    use nin_model::NinConfig;
    use rand::SeedableRng;

    /// Where a tensor's values live: equal for views of one allocation.
    fn storage(t: &Tensor) -> *const candle_core::Storage {
        &*t.storage_and_layout().0
    }

    #[test]
    fn a_training_batch_goes_over_in_one_copy() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data");
        let data = load_split(&dir, Split::Test).unwrap();
        let config = NinConfig::compact();
        let plan = MaskPlan::of(&config).unwrap().unwrap();
        let preprocessing = Preprocessing::fashion_mnist(config.input_size);
        let indices = [3, 1, 4, 1, 5];
        let host = prepare(&data, &indices, &preprocessing, None).unwrap();
        let mask = plan.draw(5, &mut ChaCha8Rng::seed_from_u64(7));
        let sent = host
            .with_dropout(plan, &mut ChaCha8Rng::seed_from_u64(7))
            .to_device(&Device::Cpu)
            .unwrap();
        // The images and the mask are views of one upload; the labels were
        // cast from it on the device.
        let mask_tensor = sent.dropout_mask.expect("a mask was drawn");
        assert_eq!(storage(&sent.images), storage(&mask_tensor));
        let expected = plan
            .tensor(&Tensor::new(mask.as_slice(), &Device::Cpu).unwrap(), 5)
            .unwrap();
        assert_eq!(
            mask_tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            expected.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let labels: Vec<u32> = indices.iter().map(|&i| u32::from(data.label(i))).collect();
        assert_eq!(sent.labels.to_vec1::<u32>().unwrap(), labels);
        // The images are those of the batch without a mask.
        let (images, _) = batch(&data, &indices, &preprocessing, None, &Device::Cpu).unwrap();
        assert_eq!(sent.images.dims(), images.dims());
        assert_eq!(
            sent.images.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            images.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn prefetch_yields_every_item_in_order() {
        let got: Vec<usize> = std::thread::scope(|scope| {
            Prefetch::spawn(scope, 3..40, 1, |i| i * i)
                .unwrap()
                .collect()
        });
        assert_eq!(got, (3..40).map(|i| i * i).collect::<Vec<_>>());
    }

    #[test]
    fn dropping_a_prefetch_early_stops_its_thread() {
        // An endless range: only the drop can end the thread, and the
        // scope would hang if it did not.
        std::thread::scope(|scope| {
            let mut items = Prefetch::spawn(scope, 0..usize::MAX, 2, |i| i).unwrap();
            assert_eq!(items.next(), Some(0));
            assert_eq!(items.next(), Some(1));
        });
    }

    #[test]
    #[should_panic(expected = "producer failed at 2")]
    fn a_panic_while_producing_reaches_the_consumer() {
        std::thread::scope(|scope| {
            let items = Prefetch::spawn(scope, 0..5, 1, |i| {
                assert!(i != 2, "producer failed at {i}");
                i
            })
            .unwrap();
            let _ = items.count();
        });
    }
}
