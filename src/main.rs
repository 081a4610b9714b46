//! The `encore` command line.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use encore::components::config::EngineConfig;
use encore::generate::{GenerateOptions, generate};
use encore::replay::{DEFAULT_DRAIN_US, replay};
use encore::scenario::ScenarioReader;
use encore::trace::TraceWriter;

#[derive(Parser)]
#[command(name = "encore", version, about = "A WebRTC SFU with a personal, time-shifted feed of speech for every listener")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a scenario through the engine headless, as fast as it goes, and write its trace.
    Replay(ReplayArgs),
    /// Scenario tools.
    Scenario {
        #[command(subcommand)]
        command: ScenarioCommand,
    },
}

#[derive(Args)]
struct ReplayArgs {
    /// The scenario file (JSON Lines, docs/scenario-format.md).
    scenario: PathBuf,
    /// Where to write the trace (docs/trace-format.md); none when absent.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Add a `send` line for every packet sent to a listener.
    #[arg(long)]
    packets: bool,
    /// Longest engine time to run after the last input while the room is still busy, in
    /// seconds.
    #[arg(long, default_value_t = DEFAULT_DRAIN_US / 1_000_000)]
    drain_s: u64,
}

#[derive(Subcommand)]
enum ScenarioCommand {
    /// Generate a synthetic room (P.59 talk-spurts, listeners with preferences and skips).
    Generate(GenerateArgs),
}

#[derive(Args)]
struct GenerateArgs {
    #[arg(long, default_value_t = 3)]
    speakers: u32,
    #[arg(long, default_value_t = 5)]
    listeners: u32,
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Speakers also publish VP8 video.
    #[arg(long)]
    video: bool,
    /// A perfect network: no loss, reordering, duplicates or jitter.
    #[arg(long)]
    clean_network: bool,
    /// Buffer cap to put in the scenario's configuration.
    #[arg(long)]
    buffer_max_bytes: Option<u64>,
    /// Output file; standard output when absent.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Replay(args) => run_replay(args),
        Command::Scenario { command: ScenarioCommand::Generate(args) } => run_generate(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("encore: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_replay(args: ReplayArgs) -> Result<()> {
    let (header, mut reader) = ScenarioReader::open(&args.scenario)?;
    let summary = match &args.trace {
        Some(path) => {
            let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
            let mut trace = TraceWriter::new(BufWriter::new(file), &header, args.packets)?;
            replay(&header, &mut reader, Some(&mut trace), args.drain_s * 1_000_000)?
        }
        None => replay::<_, io::Sink>(&header, &mut reader, None, args.drain_s * 1_000_000)?,
    };
    let mut out = io::stdout().lock();
    writeln!(out, "{}", args.scenario.display())?;
    writeln!(out, "{summary}")?;
    if let Some(peak) = peak_resident_bytes() {
        writeln!(out, "peak memory    {peak} bytes resident (VmHWM)")?;
    }
    Ok(())
}

/// The process's peak resident set, from /proc (Linux).
fn peak_resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn run_generate(args: GenerateArgs) -> Result<()> {
    let mut config = EngineConfig::default();
    if let Some(cap) = args.buffer_max_bytes {
        config.buffer_max_bytes = cap;
    }
    config.validate()?;
    let options = GenerateOptions {
        speakers: args.speakers,
        listeners: args.listeners,
        seconds: args.seconds,
        seed: args.seed,
        video: args.video,
        network_faults: !args.clean_network,
        config,
    };
    match args.out {
        Some(path) => {
            let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
            generate(&options, file)?;
        }
        None => generate(&options, io::stdout().lock())?,
    }
    Ok(())
}
