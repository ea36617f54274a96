//! Start-up and shutdown: opens the store, migrates it, starts the committer
//! and the sweeper, binds the listener (and the metrics listener, when
//! configured), and serves (HTTP, or HTTPS through [`crate::tls`], each
//! connection through [`crate::http1`]) until told to stop.
//!
//! Shutdown order matters for durability: stop accepting, let in-flight
//! requests finish (their messages are already in the committer's channel or
//! committed), drop the last handle to the committer, and wait for it to
//! drain. A message answered 201 is committed before the process exits.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::serve::ListenerExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use crate::api;
use crate::auth::confirm::Confirmations;
use crate::auth::password::{Cost, Passwords};
use crate::auth::secret;
use crate::auth::sessions::Revocations;
use crate::auth::token::Tokens;
use crate::clock::Clock;
use crate::clock::SystemClock;
use crate::cluster::nats::NatsBroker;
use crate::cluster::{self, Broker, Node, local::LocalBroker};
use crate::config::{Config, both_names};
use crate::delivery::committer::Committer;
use crate::delivery::{self, Delivery};
use crate::devices::Directory;
use crate::http1;
use crate::hub::Hub;
use crate::limits::client_ip::TrustedProxies;
use crate::limits::connections::HttpConnections;
use crate::limits::rate::AuthLimit;
use crate::limits::sockets::SocketCaps;
use crate::metrics::{self, Listener, Metrics};
use crate::push::guard::AllowHosts;
use crate::push::scheduler::{self, Scheduler};
use crate::push::targets::Targets;
use crate::seal::{self, KeyRing};
use crate::state::AppState;
use crate::store::deadline::Deadlined;
use crate::store::{self, Store, StoreOptions};
use crate::sweeper;
use crate::tls::{self, TlsListener};

/// How long shutdown waits for the committer to write what it holds.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long shutdown waits for the wake-up scheduler's last round (the
/// devices marked by the last commits, written to the database).
const SCHEDULER_STOP: Duration = Duration::from_secs(5);

/// A server that has bound its address and is ready to [`Server::run`].
pub struct Server {
    listener: TcpListener,
    /// Set when sealpost terminates TLS itself.
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// `SEALPOST_METRICS_ADDR`'s listener, when metrics are on.
    metrics_listener: Option<TcpListener>,
    state: AppState,
    /// For the sweeper, which seals old rows again.
    keys: Arc<KeyRing>,
    committer: JoinHandle<()>,
    /// What the broker's traffic reaches; kept alive while serving.
    node: Arc<Node>,
    /// The NATS broker, to flush and stop after the committer.
    nats: Option<Arc<NatsBroker>>,
    /// The wake-up scheduler's tasks, and what stops them (dropping it
    /// does, should the server never run).
    scheduler: (DropGuard, scheduler::Tasks),
}

/// Opens and migrates the store `config` names.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let store = store::connect(&StoreOptions {
        url: config.database_url().to_owned(),
        pool_size: config.db_pool_size(),
    })
    .await
    .with_context(|| format!("opening the database of {}", both_names("DATABASE_URL")))?;
    store.migrate().await.context("migrating the database")?;
    Ok(store)
}

/// Queued rows per key id that start-up tries to open.
const KEY_SAMPLES: u32 = 3;

/// Refuses to start when queued rows are sealed under a key the ring does not
/// hold, or under a different key than the ring holds under that id (a key
/// file regenerated after a restore, a mistyped key): every read of their
/// recipients would fail. Nothing is deleted; the operator restores the key,
/// or deletes those rows knowingly.
async fn check_keys(store: &dyn Store, keys: &KeyRing) -> anyhow::Result<()> {
    let in_use = store
        .key_ids_in_use()
        .await
        .context("listing the storage keys of queued messages")?;
    let missing: Vec<_> = in_use
        .iter()
        .filter(|id| !keys.ids().any(|k| k == **id))
        .collect();
    if !missing.is_empty() {
        anyhow::bail!(
            "queued messages are sealed with storage key id(s) {missing:?}, which \
             {} does not hold: add them back after the current key \
             (e.g. `{}:<new>,{}:<old>`) and the sweeper will seal those rows again; nothing \
             was changed",
            both_names("SEALPOST_STORAGE_KEYS"),
            keys.current(),
            missing[0]
        );
    }
    for &key in &in_use {
        let samples = store
            .sealed_with(key, KEY_SAMPLES)
            .await
            .context("reading queued messages to check the storage keys")?;
        let tried = samples.len();
        let failures: Vec<_> = samples
            .into_iter()
            .filter_map(|row| keys.open(row).err())
            .collect();
        match failures.first() {
            None => {}
            // Not one opens: the key under that id is not the one they were
            // sealed with.
            Some(_) if failures.len() == tried => anyhow::bail!(
                "storage key {key} does not open the queued messages sealed under it: a \
                 different key is configured under that id (a key file generated anew after \
                 a restore, or a mistyped key). Configure the key they were sealed with; \
                 nothing was changed"
            ),
            // Some open: the others were altered, and are reported when read.
            Some(err) => tracing::warn!(key, error = %err, "a queued message does not open"),
        }
    }
    tracing::debug!(?in_use, current = keys.current(), "storage keys");
    Ok(())
}

impl Server {
    /// Everything up to and including binding the listener.
    pub async fn bind(config: Config) -> anyhow::Result<Self> {
        // First: a bad certificate path is a typo to fix before anything
        // else is opened.
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
            // Config parsing requires both or neither.
            _ => None,
        };
        cluster::check(&config).map_err(|message| anyhow::anyhow!(message))?;
        for warning in config
            .former_names()
            .map_err(|message| anyhow::anyhow!(message))?
        {
            tracing::warn!("{warning}");
        }
        let jwt_secret = secret::resolve(config.jwt_secret(), config.database_url())?;
        let keys = Arc::new(seal::resolve(config.storage_keys(), config.database_url())?);
        let store = open_store(&config).await?;
        check_keys(store.as_ref(), &keys).await?;
        let metrics = Arc::new(Metrics::new(config.metrics_addr.is_some()));
        // Migrated and checked without deadlines; from here every call has
        // one (see `store::deadline`).
        let store: Arc<dyn Store> = Arc::new(Deadlined::new(
            store,
            config.db_timeout,
            metrics.db_timeouts.clone(),
        ));
        let node_id = config
            .node_id
            .clone()
            .unwrap_or_else(|| format!("node-{:08x}", rand::random::<u32>()));
        let nats = if config.clustered() {
            let broker = NatsBroker::connect(&config, node_id.clone(), metrics.clone()).await?;
            Some(Arc::new(broker))
        } else {
            None
        };
        let broker: Arc<dyn Broker> = match &nats {
            Some(nats) => nats.clone(),
            None => Arc::new(LocalBroker),
        };
        metrics.node_info(&node_id, broker.kind());
        tracing::info!(node = %node_id, broker = broker.kind(), "node");
        let concurrency = config.hash_concurrency();
        let cost = if config.insecure_test_hashing {
            tracing::warn!(
                "SEALPOST_INSECURE_TEST_HASHING is on: new passwords are hashed with argon2's \
                 smallest parameters, far below OWASP's floor. This is for the test suite only: \
                 never keep real accounts on this server"
            );
            Cost::InsecureForTests
        } else {
            Cost::Owasp
        };
        let passwords = {
            let metrics = metrics.clone();
            tokio::task::spawn_blocking(move || Passwords::new(concurrency, cost, metrics))
                .await??
        };
        let tokens = Tokens::new(
            &jwt_secret,
            config.access_token_ttl,
            config.refresh_token_ttl,
        );
        let hub = Hub::new(
            config.ws_queue as usize,
            config.max_connections_per_user as usize,
            metrics.clone(),
        );
        let targets = Arc::new(Targets::new(store.clone()));
        let push_allow = Arc::new(AllowHosts::parse(&config.push.push_allow_hosts).map_err(
            |message| anyhow::anyhow!("{}: {message}", both_names("SEALPOST_PUSH_ALLOW_HOSTS")),
        )?);
        let providers = crate::push::build_providers(&config, push_allow.clone())?;
        // The scheduler is a post-commit listener: made before the
        // committer, stopped after it has drained (its last commits are
        // scheduled, in the database, for whichever node sends them).
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let scheduler_stop = CancellationToken::new();
        let (scheduler, scheduler_tasks) = Scheduler::spawn(
            scheduler::Parts {
                store: store.clone(),
                targets: Arc::new(scheduler::NodeTargets {
                    targets: targets.clone(),
                    broker: broker.clone(),
                }),
                presence: Arc::new(scheduler::NodePresence {
                    hub: hub.clone(),
                    broker: broker.clone(),
                }),
                opener: keys.clone(),
                providers: providers.clone(),
                metrics: metrics.clone(),
                clock: clock.clone(),
            },
            scheduler::Timing {
                after_close: config.push.wakeup_after_close,
                cooldown: config.push.wakeup_cooldown,
                quiet: config.push.wakeup_quiet_interval,
                push_timeout: config.push.push_timeout,
                clustered: !broker.alone(),
                per_host: usize::from(config.push.push_host_concurrency),
            },
            scheduler_stop.clone(),
        );
        let (committer, committer_task) = Committer::spawn(
            store.clone(),
            keys.clone(),
            metrics.clone(),
            config.delivery_receipts,
            delivery::listeners::with_broker(&broker, [scheduler.clone() as _]),
            config.ack_window,
        );
        let limits = delivery::Limits {
            max_body_bytes: config.max_body_bytes as usize,
            max_devices_per_user: config.max_devices_per_user,
            send_rate_per_second: config.send_rate_per_second,
            send_rate_burst: config.send_rate_burst,
            pair_rate_per_second: config.pair_rate_per_second(),
            pair_rate_burst: config.pair_rate_burst,
            max_queued_per_device: config.max_queued_per_device(),
            max_queued_per_sender: config.max_queued_per_sender,
            max_queued_bytes_per_user: config.max_queued_bytes_per_user,
            deadline: config.db_timeout,
            drain_budget: config.drain_budget_bytes as usize,
            drain_share: config.drain_share_bytes as usize,
            multi: delivery::MultiLimits {
                max_recipients: config.max_recipients_per_send as usize,
                max_devices: config.max_devices_per_send as usize,
                max_key_bytes: config.max_key_bytes as usize,
            },
        };
        let directory = Arc::new(Directory::new(store.clone()));
        let delivery = Delivery::new(
            store.clone(),
            directory,
            committer,
            hub.clone(),
            keys.clone(),
            limits,
            config.delivery_receipts,
            broker.clone(),
            metrics.clone(),
        );
        let revocations =
            Revocations::load(store.as_ref(), config.access_token_ttl, broker.clone())
                .await
                .context("loading session revocations")?;
        let proxies = TrustedProxies::new(&config.trusted_proxies);
        let auth_limit = AuthLimit::new(
            config.auth_rate_per_minute,
            config.auth_rate_burst,
            proxies.clone(),
            metrics.clone(),
        );
        let confirmations = Arc::new(Confirmations::new(
            config.password_rate_per_minute,
            config.password_rate_burst,
        ));
        let socket_caps = SocketCaps::new(
            config.max_connections_per_ip,
            config.max_unauthenticated_sockets,
            config.max_unauthenticated_sockets_per_ip,
        );
        let listener = TcpListener::bind(config.addr)
            .await
            .with_context(|| format!("binding {}, {}", config.addr, both_names("SEALPOST_ADDR")))?;
        let metrics_listener = match config.metrics_addr {
            Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| {
                format!("binding {addr}, {}", both_names("SEALPOST_METRICS_ADDR"))
            })?),
            None => None,
        };
        let (delivery, revocations) = (Arc::new(delivery), Arc::new(revocations));
        let node = Arc::new(Node {
            hub: hub.clone(),
            delivery: delivery.clone(),
            revocations: revocations.clone(),
            metrics: metrics.clone(),
            targets: targets.clone(),
        });
        if let Some(nats) = &nats {
            nats.attach(&node);
        }
        let state = AppState {
            config: Arc::new(config),
            store,
            tokens: Arc::new(tokens),
            passwords: Arc::new(passwords),
            confirmations,
            delivery,
            hub,
            revocations,
            broker,
            node_id: node_id.into(),
            socket_caps,
            proxies,
            auth_limit,
            metrics,
            shutdown: CancellationToken::new(),
            sockets: TaskTracker::new(),
            keys: keys.clone(),
            targets,
            providers,
            push_allow,
            scheduler,
            clock,
        };
        Ok(Self {
            listener,
            tls,
            metrics_listener,
            state,
            keys,
            committer: committer_task,
            node,
            nats,
            scheduler: (scheduler_stop.drop_guard(), scheduler_tasks),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Where metrics are served, when they are on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The routes this server would serve, as a tower service to call
    /// in-process without a socket: the fuzz target drives it with
    /// `tower::ServiceExt::oneshot`. The sweeper does not run.
    pub fn router(&self) -> axum::Router {
        api::router(self.state.clone())
    }

    /// Serves until `shutdown` completes, then drains.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            listener,
            tls,
            metrics_listener,
            state,
            keys,
            committer,
            node,
            nats,
            scheduler: (scheduler_stop, scheduler_tasks),
        } = self;
        let addr = listener.local_addr()?;
        let background = CancellationToken::new();
        let sweeper = tokio::spawn(sweeper::run(state.clone(), keys, background.clone()));
        // Metrics are served until everything else has stopped, so the last
        // scrapes see the drain; the guard stops them on an early return too.
        let metrics_stop = CancellationToken::new();
        let metrics_stopped = metrics_stop.clone().drop_guard();
        let limits = http1::Limits::new(
            state.config.header_read_timeout,
            state.config.max_request_bytes(),
        );
        let metrics_task = match metrics_listener {
            Some(listener) => {
                tracing::info!("metrics at http://{}/metrics", listener.local_addr()?);
                // Counted apart from the API's: a flood there must not
                // take the scraper's share, nor the scraper a client's.
                let per_address = HttpConnections::new(
                    state.config.max_http_connections_per_ip,
                    state.proxies.clone(),
                );
                let serving = metrics::serve(
                    listener,
                    state.metrics.clone(),
                    limits,
                    per_address,
                    metrics_stop,
                );
                Some(tokio::spawn(serving))
            }
            None => None,
        };
        let delivery = state.delivery.clone();
        let revocations = tokio::spawn(state.revocations.clone().follow(
            state.store.clone(),
            state.hub.clone(),
            move |user| delivery.devices_may_have_changed(user),
            state.config.revocation_poll_interval,
            background.clone(),
        ));
        let (sockets, closing) = (state.sockets.clone(), state.shutdown.clone());
        let counted = state.metrics.connections(Listener::Api);
        let per_address = HttpConnections::new(
            state.config.max_http_connections_per_ip,
            state.proxies.clone(),
        );
        let demo = state.config.demo;
        let app = api::router(state);
        let scheme = if tls.is_some() { "https" } else { "http" };
        tracing::info!("listening on {scheme}://{addr}");
        if demo {
            tracing::info!("demo page at {}", api::demo::url(scheme, addr));
        }
        let shutdown = async move {
            shutdown.await;
            tracing::info!("shutting down: closing sockets, finishing in-flight work");
            closing.cancel();
        };
        // Pushes are small frames that must leave at once: without
        // TCP_NODELAY, Nagle held each behind the client's next ACK (push
        // latency p50 10.6 ms against 0.9 ms for the durable reply, measured).
        // Over TLS it is set once the handshake is done, before any push.
        match tls {
            None => {
                let listener = listener.tap_io(nodelay);
                http1::serve(listener, app, limits, per_address, counted, shutdown).await
            }
            Some(acceptor) => {
                let listener = TlsListener::new(listener, acceptor);
                let listener = listener.tap_io(|tls| nodelay(tls.get_mut().0));
                http1::serve(listener, app, limits, per_address, counted, shutdown).await
            }
        }

        // Upgraded sockets outlive the connections' graceful shutdown: wait
        // for them to confirm what is in flight and close with 1001.
        sockets.close();
        if tokio::time::timeout(DRAIN_TIMEOUT, sockets.wait())
            .await
            .is_err()
        {
            tracing::error!(open = sockets.len(), "sockets did not close in time");
        }
        tracing::info!("draining the committer");
        background.cancel();
        let _ = sweeper.await;
        let _ = revocations.await;
        // The router, and with it the last handle to the committer, is gone:
        // the committer writes what it holds and stops.
        // The node holds the delivery core too: let it go with the router.
        drop(node);
        match tokio::time::timeout(DRAIN_TIMEOUT, committer).await {
            Ok(_) => {}
            Err(_) => tracing::error!("committer did not drain in time"),
        }
        // Its last commits are scheduled for wake-ups (in the database) by
        // the scheduler's last round; in-flight wake-ups come due again
        // after their lease.
        drop(scheduler_stop);
        if tokio::time::timeout(SCHEDULER_STOP, scheduler_tasks.join())
            .await
            .is_err()
        {
            tracing::warn!("the wake-up scheduler did not stop in time");
        }
        // Its last commits are in the broker's outbox: send them.
        if let Some(nats) = nats {
            nats.close().await;
        }
        tracing::info!("stopped");
        drop(metrics_stopped);
        if let Some(task) = metrics_task {
            let _ = task.await;
        }
        Ok(())
    }
}

fn nodelay(tcp: &mut TcpStream) {
    if let Err(err) = tcp.set_nodelay(true) {
        tracing::debug!(error = %err, "could not set TCP_NODELAY");
    }
}

/// Completes on ctrl-c or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
