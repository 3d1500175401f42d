//! `nopad`: fine-tune Llama-family models with padding-free packing.
//!
//! This crate is glue: it parses arguments (and TOML config files), picks the backend, and calls
//! the library crates. With no arguments it trains the built-in default (the `small` preset on
//! synthetic FLAN-like data with the `flatten` strategy).
//!
//! Entry points: `main` dispatches to `cmd::{train,eval,generate,merge,stats,inspect,bench}::run`;
//! each builds its library configuration and runs it on the backend `device.rs` picks (`run_on`).

mod cmd;
mod device;

use clap::{Parser, Subcommand};

use cmd::{bench, eval, generate, inspect, merge, stats, train};

/// Fine-tune Llama-family language models with padding-free packing and varlen attention.
#[derive(Parser, Debug)]
#[command(name = "nopad", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a model (the default command; with no flags, the built-in CPU demo).
    Train(Box<train::TrainArgs>),
    /// Token-weighted loss of a model over a pretokenized JSONL file.
    Eval(eval::EvalArgs),
    /// Complete prompts with a model (KV cache; greedy or sampled), one or a file of them.
    Generate(Box<generate::GenerateArgs>),
    /// Merge a PEFT LoRA adapter into its base model and write an HF checkpoint.
    Merge(merge::MergeArgs),
    /// What each packing strategy would do with a data set (rows, padding, steps, Σlen²).
    Stats(stats::StatsArgs),
    /// The first records of a data file as training sees them: text with the trained spans
    /// marked, ids and labels, and what loading the whole file reports.
    Inspect(inspect::InspectArgs),
    /// Train with every strategy on the same examples and compare speed, memory and loss.
    Bench(Box<bench::BenchArgs>),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        None => train::run(&train::TrainArgs::default()),
        Some(Command::Train(args)) => train::run(&args),
        Some(Command::Eval(args)) => eval::run(&args),
        Some(Command::Generate(args)) => generate::run(&args),
        Some(Command::Merge(args)) => merge::run(&args),
        Some(Command::Stats(args)) => stats::run(&args),
        Some(Command::Inspect(args)) => inspect::run(&args),
        Some(Command::Bench(args)) => bench::run(&args),
    };
    if let Err(e) = result {
        eprintln!("nopad: error: {e}");
        for cause in e.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        std::process::exit(2);
    }
}
