//! Log output: `tracing` events as text lines or JSON objects, on standard error.
//!
//! Events carry structured fields (`room`, `peer`, `uid`, `side`, `track`, `reason`, ...), never a
//! token, ticket or key: the filter below also caps the WebSocket library, which at `trace` would
//! log whole messages (and `reauth` messages carry ID tokens).

use tracing::Subscriber;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

pub use crate::config::LogFormat;

/// `serve`'s filter when `ENCORE_LOG` is unset. The rtc crates log per datagram (a refused SRTP
/// packet, a discarded check): what they would say, the workers count by cause and sum up once
/// a minute instead, so junk sent to a media port cannot amplify into log lines. `ENCORE_LOG`
/// can turn them on for debugging.
pub const DEFAULT_SERVE_FILTER: &str =
    "info,webrtc=warn,rtc=off,rtc_ice=off,rtc_dtls=off,rtc_srtp=off,rtc_sctp=off,rtc_interceptor=off";

/// `ENCORE_LOG` if set and valid, else `default`, with the WebSocket library never below info.
pub fn filter(default: &str) -> EnvFilter {
    cap_websocket(EnvFilter::try_from_env("ENCORE_LOG").unwrap_or_else(|_| EnvFilter::new(default)))
}

/// The WebSocket library traces whole messages, and `reauth` messages carry ID tokens: never
/// below info for it, whatever the filter says.
pub fn cap_websocket(filter: EnvFilter) -> EnvFilter {
    filter
        .add_directive("tungstenite=info".parse().expect("a directive"))
        .add_directive("tokio_tungstenite=info".parse().expect("a directive"))
}

/// A subscriber writing `format` to `writer` (the server: standard error; tests: a capture);
/// `ansi` colours text lines (for a terminal, not a file or a log collector).
pub fn subscriber<W>(format: LogFormat, filter: EnvFilter, writer: W, ansi: bool) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(ansi);
    match format {
        LogFormat::Text => Box::new(builder.finish()),
        // The event's fields at the top level (`{"timestamp","level","target","message","room",...}`)
        // for log pipelines that index fields; no span lists (the server does not use spans).
        LogFormat::Json => {
            Box::new(builder.json().flatten_event(true).with_current_span(false).with_span_list(false).finish())
        }
    }
}

/// Installs the subscriber for this process, writing to standard error, and routes the `log`
/// crate's records (the WebRTC crates use it) into it.
pub fn init(format: LogFormat, filter: EnvFilter) {
    use std::io::IsTerminal;
    use tracing_subscriber::util::SubscriberInitExt;
    let ansi = format == LogFormat::Text && std::io::stderr().is_terminal();
    let _ = subscriber(format, filter, std::io::stderr, ansi).try_init();
}
