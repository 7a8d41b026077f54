//! `tunnel-server --metrics ADDR`: Prometheus metrics on `http://ADDR/metrics`.
//!
//! The transport server and the migration controller report typed events to observers
//! ([`ServerObserver`], [`DestinationObserver`]); [`Metrics`] counts them and renders the
//! Prometheus text format (version 0.0.4). The labels are the transport, a direction, a
//! refusal reason and the operator's route names: never a token, a path or guest data.
//!
//! The same counts tell the shutdown which migrations are under way.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use qmigrate_migration::session::{DestinationEvent, DestinationObserver, MigrationEnd};
use qmigrate_transport::{Direction, Refusal, Scheme, ServerEvent, ServerObserver};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::exit::Exit;

/// Upper bounds of the migration duration histogram, in seconds.
const DURATION_BUCKETS: [f64; 11] = [
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];
/// Upper bounds of the downtime histogram, in seconds.
const DOWNTIME_BUCKETS: [f64; 10] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// The transports a server may have, so every series exists from the start (at 0).
const TRANSPORTS: [Scheme; 4] = [Scheme::Tcp, Scheme::Ws, Scheme::Tls, Scheme::Wss];

/// What the server counted since it started; shared by the observers, the HTTP responder and
/// the shutdown.
#[derive(Debug)]
pub struct Metrics {
    state: Mutex<State>,
    /// Open tunnel connections, for the shutdown to wait on.
    open: watch::Sender<u64>,
    transport: Scheme,
}

#[derive(Debug, Default)]
struct State {
    /// Route label -> counts.
    routes: BTreeMap<String, RouteCounts>,
    /// (transport, direction) -> bytes.
    bytes: BTreeMap<(&'static str, &'static str), u64>,
    /// transport -> connections accepted, and open now.
    connections: BTreeMap<&'static str, (u64, u64)>,
    refusals: BTreeMap<&'static str, u64>,
    duration: Histogram<11>,
    downtime: Histogram<10>,
}

#[derive(Debug, Default, Clone)]
struct RouteCounts {
    started: u64,
    completed: u64,
    failed: u64,
    cancelled: u64,
    /// Migrations under way on this route, and since when (one at a time per route).
    under_way: Vec<Instant>,
}

#[derive(Debug, Clone)]
struct Histogram<const N: usize> {
    bounds: [f64; N],
    counts: [u64; N],
    count: u64,
    sum: f64,
}

impl<const N: usize> Default for Histogram<N> {
    fn default() -> Self {
        Histogram {
            bounds: [f64::INFINITY; N],
            counts: [0; N],
            count: 0,
            sum: 0.0,
        }
    }
}

impl<const N: usize> Histogram<N> {
    fn new(bounds: [f64; N]) -> Self {
        Histogram {
            bounds,
            ..Histogram::default()
        }
    }

    fn observe(&mut self, value: f64) {
        for (bound, count) in self.bounds.iter().zip(self.counts.iter_mut()) {
            if value <= *bound {
                *count += 1;
            }
        }
        self.count += 1;
        self.sum += value;
    }

    fn render(&self, out: &mut String, name: &str) {
        for (bound, count) in self.bounds.iter().zip(self.counts.iter()) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

/// The label of a route: its name, or `/` for the route of `--qmp`.
fn route_label(route: &Option<String>) -> String {
    route.clone().unwrap_or_else(|| "/".to_owned())
}

impl Metrics {
    /// Empty counts for a server on `transport`, with a zero series for each of `routes`.
    pub fn new(transport: Scheme, routes: impl IntoIterator<Item = Option<String>>) -> Arc<Self> {
        let mut state = State {
            duration: Histogram::new(DURATION_BUCKETS),
            downtime: Histogram::new(DOWNTIME_BUCKETS),
            ..State::default()
        };
        for route in routes {
            state.routes.entry(route_label(&route)).or_default();
        }
        for scheme in TRANSPORTS {
            for direction in [Direction::Received, Direction::Sent] {
                state.bytes.insert((scheme.name(), direction.name()), 0);
            }
            state.connections.insert(scheme.name(), (0, 0));
        }
        for reason in Refusal::ALL {
            state.refusals.insert(reason.name(), 0);
        }
        Arc::new(Metrics {
            state: Mutex::new(state),
            open: watch::channel(0).0,
            transport,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while counting leaves counts that are still worth showing.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The migrations under way: route label and how long it has run.
    pub fn under_way(&self) -> Vec<(String, Duration)> {
        let state = self.lock();
        state
            .routes
            .iter()
            .flat_map(|(route, c)| c.under_way.iter().map(|t| (route.clone(), t.elapsed())))
            .collect()
    }

    /// How many tunnel connections are open now.
    pub fn open_connections(&self) -> u64 {
        *self.open.borrow()
    }

    /// Resolves once no tunnel connection is open.
    pub async fn all_closed(&self) {
        let mut rx = self.open.subscribe();
        let _ = rx.wait_for(|open| *open == 0).await;
    }

    /// The Prometheus text exposition of everything counted.
    pub fn render(&self) -> String {
        let state = self.lock();
        let mut out = String::new();
        let family = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
        };
        family(
            &mut out,
            "qmigrate_build_info",
            "gauge",
            "Always 1: the version of this qmigrate and the transport it serves.",
        );
        let _ = writeln!(
            out,
            "qmigrate_build_info{{version=\"{}\",transport=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION"),
            self.transport.name()
        );
        type Pick = fn(&RouteCounts) -> u64;
        let per_route: [(&str, &str, Pick); 4] = [
            (
                "qmigrate_migrations_started_total",
                "Migrations that began on a route (the source's settings arrived).",
                |c| c.started,
            ),
            (
                "qmigrate_migrations_completed_total",
                "Migrations the destination QEMU completed.",
                |c| c.completed,
            ),
            (
                "qmigrate_migrations_failed_total",
                "Migrations that failed on either side or could not be prepared.",
                |c| c.failed,
            ),
            (
                "qmigrate_migrations_cancelled_total",
                "Migrations the source cancelled (a signal or --timeout).",
                |c| c.cancelled,
            ),
        ];
        for (name, help, pick) in per_route {
            family(&mut out, name, "counter", help);
            for (route, counts) in &state.routes {
                let _ = writeln!(
                    out,
                    "{name}{{route=\"{}\"}} {}",
                    escape(route),
                    pick(counts)
                );
            }
        }
        family(
            &mut out,
            "qmigrate_migrations_in_progress",
            "gauge",
            "Migrations under way on a route.",
        );
        for (route, counts) in &state.routes {
            let _ = writeln!(
                out,
                "qmigrate_migrations_in_progress{{route=\"{}\"}} {}",
                escape(route),
                counts.under_way.len()
            );
        }
        family(
            &mut out,
            "qmigrate_relayed_bytes_total",
            "counter",
            "Bytes relayed by the tunnel: received from the tunnel for the destination QEMU, or \
             sent into the tunnel from it (the direct data path relays none).",
        );
        for ((transport, direction), bytes) in &state.bytes {
            let _ = writeln!(
                out,
                "qmigrate_relayed_bytes_total{{transport=\"{transport}\",direction=\"{direction}\"}} {bytes}"
            );
        }
        family(
            &mut out,
            "qmigrate_tunnel_connections_total",
            "counter",
            "Tunnel connections accepted (before their handshake).",
        );
        for (transport, (total, _)) in &state.connections {
            let _ = writeln!(
                out,
                "qmigrate_tunnel_connections_total{{transport=\"{transport}\"}} {total}"
            );
        }
        family(
            &mut out,
            "qmigrate_tunnel_connections_active",
            "gauge",
            "Tunnel connections open now.",
        );
        for (transport, (_, open)) in &state.connections {
            let _ = writeln!(
                out,
                "qmigrate_tunnel_connections_active{{transport=\"{transport}\"}} {open}"
            );
        }
        family(
            &mut out,
            "qmigrate_handshake_refusals_total",
            "counter",
            "Connections refused before they were trusted, by reason.",
        );
        for (reason, n) in &state.refusals {
            let _ = writeln!(
                out,
                "qmigrate_handshake_refusals_total{{reason=\"{reason}\"}} {n}"
            );
        }
        family(
            &mut out,
            "qmigrate_migration_duration_seconds",
            "histogram",
            "From the source's settings to the destination's verdict, per migration.",
        );
        state
            .duration
            .render(&mut out, "qmigrate_migration_duration_seconds");
        family(
            &mut out,
            "qmigrate_migration_downtime_seconds",
            "histogram",
            "The guest's downtime at the switch-over, as the source QEMU measured it \
             (completed migrations).",
        );
        state
            .downtime
            .render(&mut out, "qmigrate_migration_downtime_seconds");
        out
    }
}

/// A label value as the text format wants it.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl ServerObserver for Metrics {
    fn event(&self, event: ServerEvent) {
        let mut state = self.lock();
        match event {
            ServerEvent::Opened { transport } => {
                let c = state.connections.entry(transport.name()).or_default();
                c.0 += 1;
                c.1 += 1;
                drop(state);
                self.open.send_modify(|n| *n += 1);
            }
            ServerEvent::Closed { transport } => {
                let c = state.connections.entry(transport.name()).or_default();
                c.1 = c.1.saturating_sub(1);
                drop(state);
                self.open.send_modify(|n| *n = n.saturating_sub(1));
            }
            ServerEvent::Relayed {
                transport,
                direction,
                bytes,
            } => {
                *state
                    .bytes
                    .entry((transport.name(), direction.name()))
                    .or_default() += bytes;
            }
            ServerEvent::Refused { reason } => {
                *state.refusals.entry(reason.name()).or_default() += 1;
            }
            _ => {}
        }
    }
}

impl DestinationObserver for Metrics {
    fn event(&self, event: &DestinationEvent) {
        let mut state = self.lock();
        match event {
            DestinationEvent::Started { route } => {
                let c = state.routes.entry(route_label(route)).or_default();
                c.started += 1;
                c.under_way.push(Instant::now());
            }
            DestinationEvent::Ended {
                route,
                end,
                duration,
                downtime,
            } => {
                let c = state.routes.entry(route_label(route)).or_default();
                c.under_way.pop();
                match end {
                    MigrationEnd::Completed => c.completed += 1,
                    MigrationEnd::Cancelled => c.cancelled += 1,
                    MigrationEnd::Failed => c.failed += 1,
                }
                state.duration.observe(duration.as_secs_f64());
                if let Some(downtime) = downtime {
                    state.downtime.observe(downtime.as_secs_f64());
                }
            }
            _ => {}
        }
    }
}

/// Binds the metrics listener (a usage error if it cannot: the operator asked for it).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))
        .context(Exit::Usage)
}

/// Answers `GET /metrics` on `listener` until `stop` is cancelled: a minimal HTTP/1.1
/// responder, one request per connection.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, stop: CancellationToken) {
    loop {
        let (conn, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("metrics: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) =
                tokio::time::timeout(Duration::from_secs(10), answer(conn, &metrics)).await
            {
                tracing::debug!("metrics: a scrape timed out: {e}");
            }
        });
    }
}

/// Reads one request's head and answers it.
async fn answer(mut conn: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > 16 * 1024 {
            return respond(
                &mut conn,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            )
            .await;
        }
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let body = metrics.render();
            let body = if method == "HEAD" { "" } else { body.as_str() };
            respond(
                &mut conn,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                body,
            )
            .await
        }
        ("GET" | "HEAD", _) => {
            respond(
                &mut conn,
                "404 Not Found",
                "text/plain",
                "only /metrics is served here\n",
            )
            .await
        }
        _ => respond(&mut conn, "405 Method Not Allowed", "text/plain", "").await,
    }
}

async fn respond(
    conn: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
            .parse()
            .expect("a number")
    }

    #[test]
    fn events_are_counted_and_rendered() {
        let m = Metrics::new(Scheme::Ws, [None, Some("web1".to_owned())]);
        let text = m.render();
        assert_eq!(
            value(&text, "qmigrate_migrations_started_total{route=\"/\"}"),
            0.0
        );
        assert_eq!(
            value(
                &text,
                "qmigrate_handshake_refusals_total{reason=\"wrong_token\"}"
            ),
            0.0
        );
        ServerObserver::event(
            &*m,
            ServerEvent::Opened {
                transport: Scheme::Ws,
            },
        );
        ServerObserver::event(
            &*m,
            ServerEvent::Relayed {
                transport: Scheme::Ws,
                direction: Direction::Received,
                bytes: 1000,
            },
        );
        ServerObserver::event(
            &*m,
            ServerEvent::Relayed {
                transport: Scheme::Ws,
                direction: Direction::Received,
                bytes: 24,
            },
        );
        ServerObserver::event(
            &*m,
            ServerEvent::Refused {
                reason: Refusal::NoToken,
            },
        );
        assert_eq!(m.open_connections(), 1);
        DestinationObserver::event(
            &*m,
            &DestinationEvent::Started {
                route: Some("web1".into()),
            },
        );
        assert_eq!(m.under_way().len(), 1);
        let text = m.render();
        assert_eq!(
            value(
                &text,
                "qmigrate_tunnel_connections_active{transport=\"ws\"}"
            ),
            1.0
        );
        assert_eq!(
            value(&text, "qmigrate_migrations_in_progress{route=\"web1\"}"),
            1.0
        );
        DestinationObserver::event(
            &*m,
            &DestinationEvent::Ended {
                route: Some("web1".into()),
                end: MigrationEnd::Completed,
                duration: Duration::from_secs(7),
                downtime: Some(Duration::from_millis(40)),
            },
        );
        ServerObserver::event(
            &*m,
            ServerEvent::Closed {
                transport: Scheme::Ws,
            },
        );
        let text = m.render();
        assert_eq!(
            value(
                &text,
                "qmigrate_relayed_bytes_total{transport=\"ws\",direction=\"received\"}"
            ),
            1024.0
        );
        assert_eq!(
            value(
                &text,
                "qmigrate_relayed_bytes_total{transport=\"ws\",direction=\"sent\"}"
            ),
            0.0
        );
        assert_eq!(
            value(&text, "qmigrate_tunnel_connections_total{transport=\"ws\"}"),
            1.0
        );
        assert_eq!(
            value(
                &text,
                "qmigrate_tunnel_connections_active{transport=\"ws\"}"
            ),
            0.0
        );
        assert_eq!(
            value(
                &text,
                "qmigrate_handshake_refusals_total{reason=\"no_token\"}"
            ),
            1.0
        );
        assert_eq!(
            value(&text, "qmigrate_migrations_completed_total{route=\"web1\"}"),
            1.0
        );
        assert_eq!(
            value(&text, "qmigrate_migrations_in_progress{route=\"web1\"}"),
            0.0
        );
        assert_eq!(
            value(
                &text,
                "qmigrate_migration_duration_seconds_bucket{le=\"5\"}"
            ),
            0.0
        );
        assert_eq!(
            value(
                &text,
                "qmigrate_migration_duration_seconds_bucket{le=\"10\"}"
            ),
            1.0
        );
        assert_eq!(
            value(&text, "qmigrate_migration_duration_seconds_count"),
            1.0
        );
        assert_eq!(
            value(
                &text,
                "qmigrate_migration_downtime_seconds_bucket{le=\"0.05\"}"
            ),
            1.0
        );
        assert_eq!(
            value(
                &text,
                "qmigrate_migration_downtime_seconds_bucket{le=\"0.025\"}"
            ),
            0.0
        );
        assert_eq!(
            value(&text, "qmigrate_migration_downtime_seconds_sum"),
            0.04
        );
        assert!(text.contains("qmigrate_build_info{version=\""), "{text}");
        assert_eq!(m.open_connections(), 0);
    }

    #[tokio::test]
    async fn the_responder_serves_metrics_only() {
        let listener = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let m = Metrics::new(Scheme::Tcp, [None]);
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(listener, m, stop.clone()));
        let get = |path: &'static str| async move {
            let mut c = TcpStream::connect(addr).await.expect("connect");
            c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .expect("write");
            let mut out = String::new();
            c.read_to_string(&mut out).await.expect("read");
            out
        };
        let ok = get("/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("text/plain; version=0.0.4"), "{ok}");
        assert!(
            ok.contains("qmigrate_migrations_started_total{route=\"/\"} 0"),
            "{ok}"
        );
        let missing = get("/").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        stop.cancel();
        task.await.expect("the responder ends");
    }
}
