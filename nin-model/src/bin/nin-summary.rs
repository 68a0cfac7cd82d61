//! `nin-summary`: parameters, FLOPs and memory of a NiN, layer by layer.
//!
//! A thin front end to [`nin_model::summary`]: pick a preset or a JSON
//! config, a batch size and an optimizer, get the table (or `--json`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use nin_model::summary::{self, OptimizerKind};
use nin_model::NinConfig;

/// Print the resource usage of a Network-in-Network classifier: per-layer
/// output shapes, parameters, FLOPs and activation memory, and estimates of
/// the memory needed for inference and for a training step (f32; a
/// multiply-add counts as 2 FLOPs; a training step is ~3x a forward pass).
#[derive(Debug, Parser)]
#[command(name = "nin-summary", version)]
struct Args {
    /// Built-in architecture to summarise.
    #[arg(
        long,
        default_value = "compact",
        value_parser = clap::builder::PossibleValuesParser::new(nin_model::config::PRESETS),
        conflicts_with = "config"
    )]
    arch: String,

    /// JSON file holding a NinConfig (as stored in a weights file's
    /// metadata), instead of a preset.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,

    /// Images per batch (at least 1): FLOPs and activations scale with it.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = parse_batch)]
    batch: usize,

    /// Optimizer whose state the training-memory estimate includes.
    #[arg(long, value_enum, default_value_t = Optimizer::Adamw)]
    optimizer: Optimizer,

    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

/// Command-line names for [`OptimizerKind`].
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Optimizer {
    /// AdamW: two extra copies of the parameters.
    Adamw,
    /// Plain SGD: no optimizer state.
    Sgd,
    /// SGD with momentum: one extra copy of the parameters.
    SgdMomentum,
}

impl From<Optimizer> for OptimizerKind {
    fn from(optimizer: Optimizer) -> Self {
        match optimizer {
            Optimizer::Adamw => OptimizerKind::AdamW,
            Optimizer::Sgd => OptimizerKind::Sgd,
            Optimizer::SgdMomentum => OptimizerKind::SgdMomentum,
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("nin-summary: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => read_config(path)?,
        None => NinConfig::preset(&args.arch)?,
    };
    let summary = summary::summarize(&config, args.batch, args.optimizer.into())?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print!("{}", summary::render_table(&summary));
    }
    Ok(())
}

fn parse_batch(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("the batch size must be at least 1".into()),
        Ok(batch) => Ok(batch),
        Err(err) => Err(format!("not a batch size: {err}")),
    }
}

fn read_config(path: &Path) -> anyhow::Result<NinConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a JSON NinConfig", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Args::command().debug_assert();
    }

    #[test]
    fn summary_cli_defaults_and_refusals() {
        let args = Args::try_parse_from(["nin-summary"]).unwrap();
        assert_eq!(
            (args.arch.as_str(), args.batch, args.json),
            ("compact", 1, false)
        );
        assert!(matches!(args.optimizer, Optimizer::Adamw));
        assert!(run(&args).is_ok());

        for bad in [
            &["nin-summary", "--arch", "d2l", "--config", "x.json"][..],
            &["nin-summary", "--batch", "0"],
            &["nin-summary", "--arch", "resnet"],
            &["nin-summary", "--optimizer", "adam"],
        ] {
            assert!(Args::try_parse_from(bad).is_err(), "{bad:?}");
        }

        let args =
            Args::try_parse_from(["nin-summary", "--config", "/nonexistent/nin.json"]).unwrap();
        let err = format!("{:#}", run(&args).unwrap_err());
        assert!(err.contains("cannot read config file"), "{err}");
    }
}
