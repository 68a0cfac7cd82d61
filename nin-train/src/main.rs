//! `nin-train`: fit NiN on Fashion-MNIST, evaluate weights files and export
//! them to ONNX.
//!
//! A thin command line over the `nin_train` library: argument parsing,
//! progress bars, Ctrl-C, and turning errors into messages and exit codes.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use nin_model::device::{select_device, DEVICE_NAMES};
use nin_model::weights;
use nin_model::{Compute, Kernels, NinConfig, Precision};
use nin_train::augment::Augment;
use nin_train::data::{find_data_dir, load_split, Split};
use nin_train::eval::evaluate;
use nin_train::metrics::EpochMetrics;
use nin_train::optim::OptimizerConfig;
use nin_train::schedule::Schedule;
use nin_train::train::{fit, Existing, Observer, Outcome, RunConfig, TrainData};

/// jemalloc, started with the workspace's options (thp:always, transparent
/// huge pages; set once for every binary in `.cargo/config.toml`).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Train and evaluate Network-in-Network on Fashion-MNIST.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a network and write checkpoints, metrics, plots and a weights file.
    Fit(FitArgs),
    /// Measure a weights file on the real test set.
    Eval(EvalArgs),
    /// Fetch the four Fashion-MNIST files from the data set's official
    /// location and verify their published checksums.
    Download(DownloadArgs),
    /// Write a weights file as an ONNX model (opset 13, dynamic batch), for
    /// ONNX Runtime, OpenVINO or Triton's ONNX Runtime backend.
    Export(ExportArgs),
}

/// The weights file a command reads: `eval` measures it, `export`
/// converts it. The shipped file by default, as for nin-serve.
#[derive(Args)]
struct WeightsArg {
    /// The weights file (safetensors with nin's metadata).
    #[arg(
        long = "weights",
        env = "NIN_WEIGHTS",
        default_value = "weights/nin-fashion-mnist.safetensors"
    )]
    path: PathBuf,
}

#[derive(Args)]
struct ExportArgs {
    #[command(flatten)]
    weights: WeightsArg,
    /// Where to write the ONNX model (replaced atomically).
    #[arg(long)]
    onnx: PathBuf,
}

#[derive(Args)]
struct DownloadArgs {
    /// Directory to put the files in (then use it as --data-dir).
    #[arg(long, default_value = nin_train::data::LOCAL_DATA_DIR)]
    dir: PathBuf,
    /// Where to fetch from (a mirror of the official files).
    #[arg(long, default_value = nin_train::download::FASHION_MNIST_BASE_URL)]
    base_url: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum OptimizerKind {
    Sgd,
    Adamw,
}

#[derive(Clone, Copy, ValueEnum)]
enum ScheduleKind {
    Constant,
    WarmupCosine,
    OneCycle,
}

#[derive(Args)]
struct DataArgs {
    /// Directory with the Fashion-MNIST IDX files (plain or .gz); default:
    /// $NIN_DATA_DIR, ./data/fashion-mnist, /usr/share/datasets/fashion-mnist.
    #[arg(long, env = "NIN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Compute device: auto, cpu, cuda, cuda:N, metal.
    #[arg(long, env = "NIN_DEVICE", default_value = "auto")]
    device: String,
    /// Kernel set: native (hand-written CPU kernels, the CPU default) or
    /// generic (candle ops: what a GPU always runs, selectable on CPU to
    /// test that code).
    #[arg(long, env = "NIN_KERNELS")]
    kernels: Option<Kernels>,
    /// What the native kernels' matrix multiplies compute in: fp32, or
    /// bf16 (FP32 accumulation, FP32 master weights) on CPUs with
    /// AVX512-BF16; elsewhere bf16 falls back to fp32 with a warning.
    #[arg(long, env = "NIN_PRECISION", default_value = "fp32")]
    precision: Precision,
}

impl DataArgs {
    /// The device and kernel set these options name.
    fn compute(&self) -> anyhow::Result<Compute> {
        let device = select_device(&self.device)
            .with_context(|| format!("--device (expected one of {DEVICE_NAMES})"))?;
        Compute::new(device, self.kernels)
            .context("--kernels")?
            .with_precision(self.precision)
            .context("--precision")
    }
}

#[derive(Args)]
struct FitArgs {
    #[command(flatten)]
    data: DataArgs,
    /// Network preset (`compact` at 28x28, `d2l` at 224x224).
    #[arg(long, default_value = "compact", conflicts_with = "config")]
    arch: String,
    /// A NinConfig JSON file instead of a preset.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Output channels of the feature blocks, e.g. 64,128,192 (overrides the preset).
    #[arg(long, value_delimiter = ',')]
    widths: Option<Vec<usize>>,
    /// Batch norm after every conv (beyond the paper; trains at higher rates).
    #[arg(long)]
    batch_norm: bool,
    /// Dropout before the head (overrides the preset's 0.5).
    #[arg(long)]
    dropout: Option<f32>,
    /// 1x1 convs per block (the paper's 2; the book's ablation uses 1).
    #[arg(long)]
    mlp_convs: Option<usize>,
    /// Passes over the training set.
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Images per optimizer step.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Update rule.
    #[arg(long, value_enum, default_value = "adamw")]
    optimizer: OptimizerKind,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Learning-rate schedule over the whole run.
    #[arg(long, value_enum, default_value = "warmup-cosine")]
    schedule: ScheduleKind,
    /// Fraction of the run spent warming up (warmup-cosine, one-cycle).
    #[arg(long, default_value_t = 0.1)]
    warmup: f64,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    /// Use Nesterov momentum with SGD.
    #[arg(long)]
    nesterov: bool,
    /// Weight decay (L2 for SGD, decoupled for AdamW), on conv kernels only.
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Label smoothing epsilon.
    #[arg(long, default_value_t = 0.0)]
    label_smoothing: f64,
    /// Clip the global gradient norm to this value.
    #[arg(long)]
    grad_clip: Option<f64>,
    /// Augment with random shifts of up to this many pixels.
    #[arg(long, default_value_t = 0)]
    crop_pad: usize,
    /// Augment with random horizontal flips.
    #[arg(long)]
    flip: bool,
    /// Training images held out for validation.
    #[arg(long, default_value_t = 5000)]
    val_size: usize,
    /// Seed for initialisation, split, shuffling, augmentation and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Directory for checkpoint, metrics, plots and the weights file.
    #[arg(long, default_value = "runs/fit")]
    out: PathBuf,
    /// Continue the run whose checkpoint is in --out (its stored settings win).
    #[arg(long, conflicts_with = "overwrite")]
    resume: bool,
    /// Start over in an --out that already holds a run, replacing its
    /// checkpoint, metrics and weights (without it, fit refuses).
    #[arg(long)]
    overwrite: bool,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    weights: WeightsArg,
    /// Print one JSON object instead of a report.
    #[arg(long)]
    json: bool,
    /// Images per forward pass.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Fail unless the accuracy matches the one recorded in the weights'
    /// metadata (to within --tolerance): a guard against silent regressions.
    #[arg(long)]
    check_recorded: bool,
    /// Allowed difference for --check-recorded. The default, 0.001 (10 of
    /// the 10,000 test images), lets a borderline image or a few flip on
    /// another machine: the GEMM picks its kernels by CPU and the sums'
    /// order depends on the thread count. 0 demands an exact match.
    #[arg(long, default_value_t = 0.001)]
    tolerance: f64,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal, not in log files or CI output.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Fit(args) => run_fit(args),
        Command::Eval(args) => run_eval(args),
        Command::Download(args) => run_download(args),
        Command::Export(args) => run_export(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nin-train: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn model_config(args: &FitArgs) -> anyhow::Result<NinConfig> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => NinConfig::preset(&args.arch)?,
    };
    if let Some(widths) = &args.widths {
        if widths.len() != config.blocks.len() {
            bail!(
                "--widths has {} values, the network has {} blocks",
                widths.len(),
                config.blocks.len()
            );
        }
        for (block, &w) in config.blocks.iter_mut().zip(widths) {
            block.channels = w;
        }
    }
    config.batch_norm |= args.batch_norm;
    if let Some(p) = args.dropout {
        config.dropout = p;
    }
    if let Some(n) = args.mlp_convs {
        config.mlp_convs = n;
    }
    config.validate()?;
    Ok(config)
}

fn run_fit(args: FitArgs) -> anyhow::Result<()> {
    let compute = args.data.compute()?;
    let optimizer = match args.optimizer {
        OptimizerKind::Sgd => OptimizerConfig::Sgd {
            momentum: args.momentum,
            nesterov: args.nesterov,
            weight_decay: args.weight_decay.unwrap_or(5e-4),
        },
        OptimizerKind::Adamw => OptimizerConfig::Adamw {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: args.weight_decay.unwrap_or(1e-2),
        },
    };
    let schedule = match args.schedule {
        ScheduleKind::Constant => Schedule::Constant { lr: args.lr },
        ScheduleKind::WarmupCosine => Schedule::WarmupCosine {
            lr: args.lr,
            warmup: args.warmup,
        },
        ScheduleKind::OneCycle => Schedule::OneCycle {
            lr: args.lr,
            warmup: args.warmup,
        },
    };
    let run = RunConfig {
        model: model_config(&args)?,
        epochs: args.epochs,
        batch_size: args.batch_size,
        optimizer,
        schedule,
        seed: args.seed,
        augment: Augment {
            crop_pad: args.crop_pad,
            flip: args.flip,
        },
        label_smoothing: args.label_smoothing,
        grad_clip: args.grad_clip,
        val_size: args.val_size,
        command: std::env::args().collect::<Vec<_>>().join(" "),
    };
    let dir = find_data_dir(args.data.data_dir.as_deref(), &Split::ALL)?;
    let train = load_split(&dir, Split::Train)?;
    let test = load_split(&dir, Split::Test)?;
    tracing::info!("Fashion-MNIST from {}", dir.display());

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                eprintln!("nin-train: second interrupt, exiting without a checkpoint");
                std::process::exit(130);
            }
            eprintln!(
                "nin-train: finishing the step and writing a checkpoint (Ctrl-C again to abort)"
            );
        })
        .context("installing the Ctrl-C handler")?;
    }
    let data = TrainData {
        train: &train,
        test: Some(&test),
    };
    let mut bars = Bars::default();
    match fit(
        &run,
        &data,
        &args.out,
        &compute,
        match (args.resume, args.overwrite) {
            (true, _) => Existing::Resume,
            (_, true) => Existing::Overwrite,
            _ => Existing::Refuse,
        },
        &stop,
        &mut bars,
    )? {
        Outcome::Interrupted { checkpoint } => {
            bars.finish();
            eprintln!(
                "stopped; continue with: nin-train fit --resume --out {} (checkpoint {})",
                args.out.display(),
                checkpoint.display()
            );
        }
        Outcome::Finished { weights, test } => {
            bars.finish();
            write_reports(&args.out, test.as_ref())?;
            if let Some(test) = test {
                println!(
                    "test accuracy {:.4} (loss {:.4}, {} images)",
                    test.accuracy, test.loss, test.count
                );
            }
            println!("weights: {}", weights.display());
        }
    }
    Ok(())
}

/// Curves and confusion matrix next to the metrics, at the end of a run.
fn write_reports(out: &Path, test: Option<&nin_train::eval::Evaluation>) -> anyhow::Result<()> {
    use nin_train::report;
    let history = nin_train::metrics::read(&out.join("metrics.jsonl"))?;
    report::plot_curves(&history, &out.join("curves.png"), &out.join("curves.svg"))?;
    if let Some(test) = test {
        let classes: Vec<String> = weights::FASHION_MNIST_CLASSES
            .iter()
            .map(|s| s.to_string())
            .collect();
        std::fs::write(
            out.join("confusion.txt"),
            report::confusion_text(&test.confusion, &classes),
        )?;
        report::confusion_png(&test.confusion, &classes, &out.join("confusion.png"))?;
    }
    Ok(())
}

/// Progress bars: one per epoch, with loss, accuracy and images/s.
#[derive(Default)]
struct Bars {
    bar: Option<ProgressBar>,
}

impl Bars {
    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl Observer for Bars {
    fn epoch_start(&mut self, epoch: usize, batches: usize, done: usize) {
        self.finish();
        let bar = ProgressBar::new(batches as u64).with_position(done as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "epoch {prefix:>3} {bar:30} {pos}/{len} {msg} [{elapsed}<{eta}]",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_prefix(epoch.to_string());
        self.bar = Some(bar);
    }

    fn batch(&mut self, loss: f64, accuracy: f64, images_per_s: f64) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
            bar.set_message(format!(
                "loss {loss:.4} acc {accuracy:.4} {images_per_s:.0} img/s"
            ));
        }
    }

    fn epoch_end(&mut self, m: &EpochMetrics) {
        self.finish();
        let score = |s: Option<nin_train::metrics::Score>| {
            s.map_or("-".to_string(), |s| {
                format!("{:.4}/{:.4}", s.loss, s.accuracy)
            })
        };
        tracing::info!(
            "epoch {}: train loss {:.4} acc {:.4} | val {} | test {} | lr {:.2e} | {:.0} img/s | {:.0}s",
            m.epoch,
            m.train.loss,
            m.train.accuracy,
            score(m.validation),
            score(m.test),
            m.lr,
            m.images_per_s,
            m.wall_s
        );
    }

    fn note(&mut self, message: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| tracing::info!("{message}")),
            None => tracing::info!("{message}"),
        }
    }
}

fn run_eval(args: EvalArgs) -> anyhow::Result<()> {
    let compute = args.data.compute()?;
    let device = compute.device.clone();
    let (mut model, metadata) = weights::load(&args.weights.path, &device)?;
    model.set_compute(&compute)?;
    let dir = find_data_dir(args.data.data_dir.as_deref(), &[Split::Test])?;
    let test = load_split(&dir, Split::Test)?;
    let result = evaluate(
        &model,
        &test,
        None,
        &metadata.preprocessing,
        args.batch_size,
        &device,
    )?;
    if args.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!(
            "{}: accuracy {:.4}, loss {:.4} on {} test images from {}",
            args.weights.path.display(),
            result.accuracy,
            result.loss,
            result.count,
            dir.display()
        );
        println!(
            "{}",
            nin_train::report::confusion_text(&result.confusion, &metadata.classes)
        );
    }
    if args.check_recorded {
        let Some(recorded) = metadata.provenance.test_accuracy else {
            bail!(
                "{} records no test accuracy to check against",
                args.weights.path.display()
            );
        };
        if (result.accuracy - recorded).abs() > args.tolerance {
            bail!(
                "accuracy {:.4} differs from the {:.4} recorded in {} (tolerance {})",
                result.accuracy,
                recorded,
                args.weights.path.display(),
                args.tolerance
            );
        }
        eprintln!("accuracy matches the recorded {recorded:.4}");
    }
    Ok(())
}

fn run_export(args: ExportArgs) -> anyhow::Result<()> {
    let (model, metadata) = weights::load(&args.weights.path, &candle_core::Device::Cpu)?;
    let bytes = nin_model::onnx::export(&model, &metadata)?;
    weights::write_atomically(&args.onnx, &bytes)
        .with_context(|| format!("cannot write {}", args.onnx.display()))?;
    eprintln!(
        "wrote {} ({} bytes, opset {}): input `{}` (batch, {c}, {s}, {s}), output `{}` (batch, {})",
        args.onnx.display(),
        bytes.len(),
        nin_model::onnx::OPSET,
        nin_model::onnx::INPUT,
        nin_model::onnx::OUTPUT,
        metadata.config.num_classes,
        c = metadata.config.in_channels,
        s = metadata.config.input_size,
    );
    Ok(())
}

fn run_download(args: DownloadArgs) -> anyhow::Result<()> {
    use nin_train::download::{download, DownloadOptions, Progress};
    let options = DownloadOptions {
        base_url: args.base_url,
        dir: args.dir,
        ..DownloadOptions::default()
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{prefix:<28} {bar:30} {bytes}/{total_bytes} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let paths = download(&options, &|event| match event {
        Progress::Cached { file, .. } => {
            bar.suspend(|| eprintln!("{}: already here, checksum good", file.name))
        }
        Progress::Started {
            file,
            offset,
            total,
        } => {
            bar.set_prefix(file.name.clone());
            bar.set_length(total.unwrap_or(0));
            bar.set_position(offset);
        }
        Progress::Received { done, .. } => bar.set_position(done),
        Progress::Retrying {
            file,
            attempt,
            max_attempts,
            delay,
            error,
        } => bar.suspend(|| {
            eprintln!(
                "{}: attempt {attempt}/{max_attempts} failed ({error}); retrying in {delay:?}",
                file.name
            )
        }),
        Progress::Discarded { file, error } => {
            bar.suspend(|| eprintln!("{}: discarded ({error})", file.name))
        }
        Progress::Finished { file, .. } => {
            bar.suspend(|| eprintln!("{}: done, checksum good", file.name))
        }
    })?;
    bar.finish_and_clear();
    if let Some(dir) = paths.first().and_then(|p| p.parent()) {
        println!(
            "Fashion-MNIST is in {}; use --data-dir {}",
            dir.display(),
            dir.display()
        );
    }
    Ok(())
}
