//! The `encore` command line.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use encore::auth::{AuthMode, ClaimsAdmin, DEV_ROLES_FILE, DevRoles, Role, SystemClock, UserRoles, parse_role};
use encore::components::config::{EngineConfig, Policy};
use encore::config::{LogFormat, Overrides, ServerConfig};
use encore::eval::{AudienceModel, EvalOptions, RoomSize, evaluate};
use encore::generate::{GenerateOptions, generate};
use encore::logging;
use encore::protocol::GoingAwayReason;
use encore::replay::{DEFAULT_DRAIN_US, replay};
use encore::scenario::ScenarioReader;
use encore::server::{StartOptions, start};
use encore::trace::TraceWriter;

#[derive(Parser)]
#[command(
    name = "encore",
    version,
    about = "A WebRTC SFU with a personal, time-shifted feed of speech for every listener"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: HTTPS and WSS signaling, WebRTC media, the demo page at /.
    Serve(ServeArgs),
    /// Exit 0 when the local server answers GET /healthz (a container's health check).
    Healthcheck(HealthcheckArgs),
    /// Run a scenario through the engine headless, as fast as it goes, and write its trace.
    Replay(ReplayArgs),
    /// Load a running server: speakers publishing talk-spurts, listeners receiving; prints
    /// packets, loss, delays and CPU per forwarded packet (docs/performance.md).
    Loadgen(LoadgenArgs),
    /// Measure the recommender policies on simulated audiences: generated rooms through the
    /// engine, with listeners who skip and like by hidden tastes (docs/recommender.md).
    Eval(EvalArgs),
    /// Scenario tools.
    Scenario {
        #[command(subcommand)]
        command: ScenarioCommand,
    },
    /// Manage roles: the `role` custom claim, in Firebase (as a service account), the Auth
    /// Emulator or dev mode, whichever the configuration's auth.mode names (docs/auth.md).
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Give a user a role; it takes effect in the user's next ID token (sign-in or refresh).
    SetRole {
        #[command(flatten)]
        common: AdminArgs,
        #[arg(long)]
        uid: String,
        /// speaker, listener, moderator or admin.
        #[arg(long)]
        role: String,
    },
    /// The roles a user's claims grant.
    GetRole {
        #[command(flatten)]
        common: AdminArgs,
        #[arg(long)]
        uid: String,
    },
    /// Every user whose claims grant a role.
    ListRoles {
        #[command(flatten)]
        common: AdminArgs,
    },
}

#[derive(Args)]
struct AdminArgs {
    /// The server's TOML configuration file (its [auth] section chooses the backend).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The server's data folder (dev mode keeps its roles there; default ./data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Print JSON instead of lines.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ServeArgs {
    /// A TOML configuration file (docs/configuration.md); default: $ENCORE_CONFIG, if set.
    #[arg(long)]
    config: Option<PathBuf>,
    /// HTTPS/WSS listen address (default 0.0.0.0:8443).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Where the self-signed certificate and other state are kept (default ./data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Worker threads running rooms (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Record every room's inputs and trace into this folder.
    #[arg(long)]
    record: Option<PathBuf>,
    /// The address announced to clients for media (1:1 NAT).
    #[arg(long)]
    public_ip: Option<std::net::IpAddr>,
    /// Where GET /metrics answers (default 127.0.0.1:9464; "" turns it off).
    #[arg(long, value_parser = parse_metrics_listen)]
    metrics_listen: Option<OptionalAddr>,
    /// Log lines as `text` (default) or `json`.
    #[arg(long)]
    log_format: Option<LogFormat>,
    /// After SIGTERM, seconds rooms may go on before their peers are sent away (default 300).
    #[arg(long)]
    drain_timeout_s: Option<u64>,
}

/// `--metrics-listen`: an address, or "" for off (clap cannot hold an `Option` in an `Option`).
#[derive(Clone, Copy, Debug)]
struct OptionalAddr(Option<std::net::SocketAddr>);

fn parse_metrics_listen(text: &str) -> Result<OptionalAddr, String> {
    match text.trim() {
        "" => Ok(OptionalAddr(None)),
        text => text.parse().map(|addr| OptionalAddr(Some(addr))).map_err(|e| format!("{e}")),
    }
}

#[derive(Args)]
struct HealthcheckArgs {
    /// The server's TOML configuration file: its listen port and certificate are used.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The server's data folder (where a self-signed certificate is kept; default ./data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Check this URL instead of https://127.0.0.1:<server.listen's port>/healthz.
    #[arg(long)]
    url: Option<String>,
    /// Seconds before the check fails.
    #[arg(long, default_value_t = 5)]
    timeout_s: u64,
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

#[derive(Args)]
struct LoadgenArgs {
    /// The server's base URL.
    #[arg(long, default_value = "https://127.0.0.1:8443")]
    url: String,
    #[arg(long, default_value_t = 5)]
    speakers: usize,
    #[arg(long, default_value_t = 20)]
    listeners: usize,
    /// How long the speakers talk.
    #[arg(long, default_value_t = 30.0)]
    seconds: f64,
    #[arg(long, default_value = "loadgen")]
    room: String,
    /// Speakers also publish VP8, listeners also receive video.
    #[arg(long)]
    video: bool,
    /// The server's process id: its CPU time is read from /proc before and after.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Trust exactly this certificate (the server keeps its self-signed one in
    /// <data-dir>/tls/cert.pem).
    #[arg(long, conflicts_with = "insecure")]
    cert: Option<PathBuf>,
    /// Accept any server certificate. For tests on your own machine only.
    #[arg(long)]
    insecure: bool,
    /// Clients being set up at once (each waits on round trips, not on a core: 64 sets up
    /// 320 clients 3.5 times as fast as 16, with no failures).
    #[arg(long, default_value_t = 64)]
    setup_concurrency: usize,
    /// Seconds listeners keep receiving after the speakers stop.
    #[arg(long, default_value_t = 1.5)]
    drain: f64,
    /// Seed of the talk-spurt generators.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Threads of the load generator's runtime (it shares the machine with the server).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Also hold this many idle rooms open (one silent peer each, its own uid) through the
    /// window: what idle rooms cost shows in the server's CPU. The server's
    /// `limits.connections_per_ip` must allow every connection (0: no cap).
    #[arg(long, default_value_t = 0)]
    idle_rooms: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct EvalArgs {
    /// Room sizes, SPEAKERSxLISTENERS, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = EvalOptions::default().sizes)]
    sizes: Vec<RoomSize>,
    /// Seeds of the rooms and their audiences, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = EvalOptions::default().seeds)]
    seeds: Vec<u64>,
    /// Length of each room, in seconds.
    #[arg(long, default_value_t = EvalOptions::default().seconds)]
    seconds: u64,
    /// Policies to compare (fifo, loudest, rules, learn), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = Policy::ALL.to_vec())]
    policies: Vec<Policy>,
    /// The simulated audience's model (TOML: `clusters`, `dislike_hazard`, `lag_hazard`, ...;
    /// docs/recommender.md lists them and their defaults).
    #[arg(long)]
    audience: Option<PathBuf>,
    /// Engine settings for every run (TOML, the keys of `[engine]` in docs/configuration.md,
    /// e.g. `[recommender.learn]` then `explore = 0`); the policy is each run's.
    #[arg(long)]
    engine: Option<PathBuf>,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
    /// No progress lines on standard error.
    #[arg(long)]
    quiet: bool,
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
        Command::Serve(args) => run_serve(args),
        Command::Healthcheck(args) => run_healthcheck(args),
        Command::Replay(args) => run_replay(args),
        Command::Loadgen(args) => run_loadgen(args),
        Command::Eval(args) => run_eval(args),
        Command::Scenario { command: ScenarioCommand::Generate(args) } => run_generate(args),
        Command::Admin { command } => run_admin(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("encore: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_serve(args: ServeArgs) -> Result<()> {
    let overrides = Overrides {
        listen: args.listen,
        data_dir: args.data_dir,
        workers: args.workers,
        record_dir: args.record,
        public_ip: args.public_ip,
        metrics_listen: args.metrics_listen.map(|OptionalAddr(addr)| addr),
        log_format: args.log_format,
        drain_timeout_s: args.drain_timeout_s,
    };
    // The configuration says the log format, so it is read first; its errors go to stderr as
    // the command's error.
    let config = ServerConfig::load(config_file(args.config).as_deref(), |key| std::env::var(key).ok(), &overrides)?;
    logging::init(config.log.format, logging::filter(logging::DEFAULT_SERVE_FILTER));
    let drain_timeout = std::time::Duration::from_secs(config.server.drain_timeout_s);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting tokio")?;
    let result = runtime.block_on(async move {
        let mut signals = Signals::new()?;
        let dev = config.auth.mode == AuthMode::Dev;
        let self_signed = config.server.tls_cert.is_none();
        let mut server = start(config, StartOptions::default()).await?;
        let local = format!("https://localhost:{}", server.addr.port());
        println!("encore serving on {local} (listening on {}; signaling at {local}/ws)", server.addr);
        if dev || self_signed {
            println!();
            println!("  !! DEVELOPMENT DEFAULTS: do not expose this server.");
            if dev {
                println!(
                    "  !! auth.mode = dev: the server issues its own tokens to anyone who asks (POST /dev/token)."
                );
            }
            if let Some(cert) = &server.self_signed_cert {
                println!("  !! TLS uses a self-signed certificate ({}); browsers will warn once.", cert.display());
            }
            println!();
        }
        if let Some(metrics) = server.metrics_addr {
            println!("metrics at http://{metrics}/metrics");
        }
        let signal = tokio::select! {
            result = server.wait() => return result.context("the server stopped"),
            signal = signals.next() => signal,
        };
        // The first signal drains: no new rooms, the rooms there are go on until they empty or
        // the drain times out. A second one stops at once (recordings are still flushed).
        println!("encore: {signal}: draining (at most {} s; {signal} again to stop now)", drain_timeout.as_secs());
        let emptied = tokio::select! {
            emptied = server.drain(drain_timeout) => emptied,
            signal = signals.next() => {
                println!("encore: {signal} again: stopping now");
                server.stop(GoingAwayReason::Shutdown, STOP_NOW_PATIENCE).await;
                return Ok(());
            }
        };
        let reason = if emptied { GoingAwayReason::Shutdown } else { GoingAwayReason::DrainTimeout };
        println!("encore: {}; stopping", if emptied { "every room emptied" } else { "the drain timed out" });
        tokio::select! {
            _ = server.stop(reason, std::time::Duration::from_secs(10)) => {}
            signal = signals.next() => {
                println!("encore: {signal} again: stopping now");
                server.stop(GoingAwayReason::Shutdown, STOP_NOW_PATIENCE).await;
            }
        }
        Ok::<(), anyhow::Error>(())
    });
    // Tasks of connections that did not close in time (a second signal) are not waited for.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

/// `--config`, or else `ENCORE_CONFIG`: a container sets the variable once, and `serve`, its
/// health check and `encore admin` all read the same file.
fn config_file(flag: Option<PathBuf>) -> Option<PathBuf> {
    flag.or_else(|| std::env::var_os("ENCORE_CONFIG").filter(|v| !v.is_empty()).map(PathBuf::from))
}

/// GET /healthz of the server this configuration describes, over loopback, trusting exactly
/// the server's own certificate (`ClientTls::pinned`: a real certificate's name does not match
/// 127.0.0.1, and what is checked is that this server answers).
fn run_healthcheck(args: HealthcheckArgs) -> Result<()> {
    let overrides = Overrides { data_dir: args.data_dir, ..Overrides::default() };
    let config = ServerConfig::load(config_file(args.config).as_deref(), |key| std::env::var(key).ok(), &overrides)?;
    let listen = config.server.listen;
    let url = args.url.unwrap_or_else(|| {
        let ip = match listen.ip() {
            ip if !ip.is_unspecified() => ip,
            std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        };
        format!("https://{}/healthz", std::net::SocketAddr::new(ip, listen.port()))
    });
    let cert = config.server.tls_cert.clone().unwrap_or_else(|| config.server.data_dir.join("tls/cert.pem"));
    let tls = encore::client::ClientTls::pinned(&cert).context("the server's certificate")?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting tokio")?;
    let timeout = std::time::Duration::from_secs(args.timeout_s);
    let (status, body) = runtime
        .block_on(async { tokio::time::timeout(timeout, encore::client::get(&tls, &url, None)).await })
        .with_context(|| format!("{url}: no answer in {} s", args.timeout_s))?
        .with_context(|| url.clone())?;
    anyhow::ensure!(status == 200, "{url}: HTTP {status} {body}");
    println!("{url}: {body}");
    Ok(())
}

fn run_admin(command: AdminCommand) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ENCORE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(io::stderr)
        .init();
    let common = match &command {
        AdminCommand::SetRole { common, .. }
        | AdminCommand::GetRole { common, .. }
        | AdminCommand::ListRoles { common } => common,
    };
    let overrides = Overrides { data_dir: common.data_dir.clone(), ..Overrides::default() };
    let config =
        ServerConfig::load(config_file(common.config.clone()).as_deref(), |key| std::env::var(key).ok(), &overrides)?;
    let dev_roles = std::sync::Arc::new(DevRoles::with_file(config.server.data_dir.join(DEV_ROLES_FILE)));
    if config.auth.mode == AuthMode::Dev {
        eprintln!(
            "encore admin: auth.mode = dev: roles are kept in {} (a dev server reads them at every /dev/token)",
            config.server.data_dir.join(DEV_ROLES_FILE).display()
        );
    }
    let admin = ClaimsAdmin::from_config(&config.auth, Some(dev_roles), std::sync::Arc::new(SystemClock))?
        .ok_or(encore::auth::AdminError::NotConfigured)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting tokio")?;
    let json = common.json;
    let mut out = io::stdout().lock();
    match command {
        AdminCommand::SetRole { uid, role, .. } => {
            let role = parse_role(&role)?;
            let change = runtime.block_on(admin.set_role(&uid, role))?;
            if json {
                writeln!(out, "{}", serde_json::to_string(&change)?)?;
            } else {
                writeln!(
                    out,
                    "{}: role {} (was {}); it takes effect at the user's next sign-in or token refresh",
                    change.uid,
                    change.role.as_str(),
                    roles_text(&change.previous)
                )?;
            }
        }
        AdminCommand::GetRole { uid, .. } => {
            let user = runtime.block_on(admin.get_role(&uid))?;
            if json {
                writeln!(out, "{}", serde_json::to_string(&user)?)?;
            } else {
                print_user(&mut out, &user, config.auth.default_role)?;
            }
        }
        AdminCommand::ListRoles { .. } => {
            let users = runtime.block_on(admin.list_roles())?;
            if json {
                writeln!(out, "{}", serde_json::to_string(&users)?)?;
            } else {
                for user in &users {
                    print_user(&mut out, user, config.auth.default_role)?;
                }
            }
        }
    }
    Ok(())
}

fn roles_text(roles: &[Role]) -> String {
    if roles.is_empty() {
        "no role claim".to_owned()
    } else {
        roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(",")
    }
}

/// `uid  roles  email`, tab-separated.
fn print_user(out: &mut impl Write, user: &UserRoles, default_role: Role) -> Result<()> {
    let roles = match user.roles.as_slice() {
        [] => format!("{} (no role claim: the default)", default_role.as_str()),
        roles => roles_text(roles),
    };
    writeln!(out, "{}\t{}\t{}", user.uid, roles, user.email.as_deref().unwrap_or("-"))?;
    Ok(())
}

/// How long a stop on a second signal waits for sessions (to send them `going_away` and a close
/// frame) and connections; rooms are closed and recordings flushed whatever happens.
const STOP_NOW_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);

/// SIGTERM and SIGINT (Ctrl-C), as many times as they come. Once their handlers are in, the
/// signals no longer kill the process: it decides what each one means.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Signals {
                term: signal(SignalKind::terminate()).context("handling SIGTERM")?,
                int: signal(SignalKind::interrupt()).context("handling SIGINT")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// The next signal's name.
    async fn next(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => "SIGTERM",
                _ = self.int.recv() => "SIGINT",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        }
    }
}

fn run_loadgen(args: LoadgenArgs) -> Result<()> {
    use encore::client::TlsTrust;
    use encore::loadgen::{LoadgenOptions, report_json, run};
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ENCORE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,webrtc=error,rtc=error,rtc_ice=error")),
        )
        .with_writer(io::stderr)
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let trust = match (args.cert, args.insecure) {
        (Some(path), _) => TlsTrust::Cert(path),
        (None, true) => TlsTrust::Insecure,
        (None, false) => TlsTrust::Webpki,
    };
    let tls = trust.client_tls().context("TLS")?;
    let mut options = LoadgenOptions::new(args.url, args.speakers, args.listeners, args.seconds);
    options.room = args.room;
    options.video = args.video;
    options.server_pid = args.server_pid;
    options.setup_concurrency = args.setup_concurrency;
    options.drain = std::time::Duration::from_secs_f64(args.drain.max(0.0));
    options.seed = args.seed;
    options.idle_rooms = args.idle_rooms;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .context("starting tokio")?;
    let report = runtime.block_on(run(options, tls))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report_json(&report))?);
    } else {
        println!("{report}");
    }
    // Tasks of closed connections may linger; do not wait for them.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(())
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

fn run_eval(args: EvalArgs) -> Result<()> {
    let options = EvalOptions {
        sizes: args.sizes,
        seeds: args.seeds,
        seconds: args.seconds,
        policies: args.policies,
        audience: match &args.audience {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("in {}", path.display()))?
            }
            None => AudienceModel::default(),
        },
        config: match &args.engine {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                let config: EngineConfig = toml::from_str(&text).with_context(|| format!("in {}", path.display()))?;
                config.validate()?;
                config
            }
            None => EngineConfig::default(),
        },
    };
    options.audience.validate().map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        !options.sizes.is_empty() && !options.seeds.is_empty() && !options.policies.is_empty() && options.seconds > 0,
        "eval needs at least one size, seed and policy, and a length"
    );
    let started = std::time::Instant::now();
    let report = evaluate(&options, |policy, size, seed, figures| {
        if !args.quiet {
            eprintln!(
                "{policy:<8} {size:<9} seed {seed:<3} listen-through {:.3}, lag {:.2} s ({:.0} s so far)",
                figures.listen_through,
                figures.mean_lag_ms / 1000.0,
                started.elapsed().as_secs_f64()
            );
        }
    });
    let mut out = io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        writeln!(out, "{report}")?;
    }
    Ok(())
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
        ..GenerateOptions::default()
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
