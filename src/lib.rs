//! pgweir — a multi-tenant PostgreSQL edge proxy.
//!
//! Layout (one concern per module; `docs/ARCHITECTURE.md` is the map):
//! - [`config`]: TOML → validated [`config::Config`], every problem reported at once.
//! - [`wire`]: framing, startup packets, message builders, ErrorResponses with SQLSTATEs.
//! - [`net`]: plain/TLS byte streams, whole-frame reads during handshakes.
//! - [`tls`]: client-facing TLS (reloadable), backend TLS, channel binding, dev certificates.
//! - [`auth`]: SCRAM-SHA-256 / md5 / cleartext, client side and backend side.
//! - [`routing`]: (SNI, options, user) → endpoint; pure.
//! - [`tenant`]: tenants behind the [`tenant::TenantDirectory`] boundary.
//! - [`backend`]: opening and logging in server connections.
//! - [`pool`]: server connection pools, checkout guards, reset.
//! - [`cancel`]: client-visible cancel keys → backend keys.
//! - [`prepared`]: named prepared statements under transaction pooling (client names → shared server names).
//! - [`session`]: one client connection from first byte to last.
//! - [`sqlscan`]: which SQL statements change session state (for transaction pooling); a lexer, no parser; pure.
//! - [`server`]: the listener and process-wide state.
//! - [`dev`]: `pgweir dev`, a local cluster with pgweir in front.
//! - [`pgcluster`]: starting and stopping local PostgreSQL clusters (dev mode, tests).

pub mod admin;
pub mod auth;
pub mod backend;
pub mod cancel;
pub mod catalog;
pub mod config;
pub mod dev;
pub mod handover;
pub mod net;
pub mod pgcluster;
pub mod policy;
pub mod pool;
pub mod prepared;
pub mod routing;
pub mod server;
pub mod session;
pub mod sqlscan;
pub mod telemetry;
pub mod tenant;
pub mod tls;
pub mod wire;

/// `make()`'s future in a box of its own, made in the box: a future is as large as its largest state, and
/// `Box::pin(make())` builds it on the stack and copies all of it (a transaction's is ~2.8 KB, a waiting
/// checkout's ~2.2 KB) when only its arguments are set. Boxed futures keep idle sessions small: each phase of a
/// session exists only while it runs.
pub(crate) fn boxed<F: std::future::Future>(make: impl FnOnce() -> F) -> std::pin::Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
}

/// `s` in ASCII lowercase, borrowed when it already is (names of settings and parameters mostly are: no
/// allocation per login for them).
pub(crate) fn ascii_lowercase(s: &str) -> std::borrow::Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(s.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}
