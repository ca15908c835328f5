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
pub mod clock;
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

/// Which of two raced futures finished first (see [`race`]).
pub(crate) enum First<A, B> {
    A(A),
    B(B),
}

/// Runs `a` and `b` until one finishes; on every wakeup `a` is polled first (biased, as `tokio::select!` with
/// `biased;`, without its branch bookkeeping: this is on every transaction's path). The futures are pinned by the
/// caller, where they were made: a transaction's futures are large, and moving them here would copy them.
///
/// Unlike `select!`, `race` does not look at tokio's cooperative budget itself. When the task has spent it, a
/// budget-aware `a` (a socket read, a semaphore) returns Pending and has the task woken again, and `b` is polled:
/// it may win though `a` would have after the yield. Every caller's `b` is a wakeup whose handler looks again
/// (drain, shutdown, cancel, timeout tick) or a pump that is budget-aware itself.
pub(crate) fn race<'a, A: std::future::Future + ?Sized, B: std::future::Future + ?Sized>(
    mut a: std::pin::Pin<&'a mut A>,
    mut b: std::pin::Pin<&'a mut B>,
) -> impl std::future::Future<Output = First<A::Output, B::Output>> + 'a {
    std::future::poll_fn(move |cx| {
        if let std::task::Poll::Ready(v) = a.as_mut().poll(cx) {
            return std::task::Poll::Ready(First::A(v));
        }
        b.as_mut().poll(cx).map(First::B)
    })
}

#[cfg(test)]
mod tests {
    use super::{race, First};
    use std::pin::pin;

    #[tokio::test]
    async fn race_polls_its_first_future_first_and_ends_with_the_one_that_finishes() {
        // The first is ready: the second is not even polled (it would panic).
        let never = async { panic!("the second future is polled though the first is ready") };
        let got = race(pin!(async { 1 }), pin!(never)).await;
        assert!(matches!(got, First::A(1)));
        // The first never finishes: the second's value comes back.
        let got = race(pin!(std::future::pending::<u8>()), pin!(async { "b" })).await;
        assert!(matches!(got, First::B("b")));
        // The second finishes later, after a wakeup that polls both again.
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let sender = tokio::spawn(async move {
            tokio::task::yield_now().await;
            tx.send(7).is_ok()
        });
        let got = race(pin!(std::future::pending::<u8>()), pin!(rx)).await;
        assert!(matches!(got, First::B(Ok(7))));
        assert!(sender.await.expect("the sender task does not panic"));
        // Both wait; after the wakeup both are ready and the first is polled again first: it wins.
        let (tx_a, rx_a) = tokio::sync::oneshot::channel::<u32>();
        let (tx_b, rx_b) = tokio::sync::oneshot::channel::<u32>();
        let sender = tokio::spawn(async move {
            tokio::task::yield_now().await;
            tx_b.send(2).is_ok() && tx_a.send(1).is_ok()
        });
        let got = race(pin!(rx_a), pin!(rx_b)).await;
        assert!(
            matches!(got, First::A(Ok(1))),
            "the first is polled first after a wakeup"
        );
        assert!(sender.await.expect("the sender task does not panic"));
    }
}
