//! CancelRequests: forwarded to the server connection running the client's query, and a
//! connection a cancel may still reach kept from other clients until PostgreSQL has acted.

use super::*;

/// Passes a CancelRequest to the server connection running that client's query, if any,
/// and returns once PostgreSQL has acted on it (or gave up), as PostgreSQL's own cancel
/// connection does: a client whose cancel call returned before that (libpq waits for the
/// server to close it) could send its next statement first and have that cancelled, which
/// psycopg's stream() did in session mode. The delivery runs on its own task: the client's
/// login deadline, which drops this wait, must not cut it short.
pub(super) async fn forward_cancel(shared: &Shared, process_id: i32, secret_key: i32) {
    let slot = lock(&shared.cancels)
        .get(&(process_id, secret_key))
        .cloned();
    if let Some(target) = slot.and_then(|slot| slot.cancel()) {
        let _ = tokio::spawn(deliver_cancel(target)).await;
    }
}

/// Sends a cancel to PostgreSQL and waits until it has acted on it; only then does the
/// server connection stop counting it as on its way ([`crate::proxy::Cancel::cancel`] counted it). A
/// cancel that may have reached PostgreSQL without a confirmation (an error after it was
/// sent, no answer within [`CANCEL_DELIVERY`]) stays counted: that connection is closed
/// when released, never reused.
pub(super) async fn deliver_cancel(target: crate::proxy::CancelTarget) {
    let mut buf = BytesMut::new();
    postgres_protocol::message::frontend::cancel_request(
        target.process_id,
        target.secret_key,
        &mut buf,
    );
    let mut connected = false;
    let exchange = async {
        let mut stream = TcpStream::connect(target.addr).await?;
        connected = true;
        stream.write_all(&buf).await?;
        // PostgreSQL closes the connection once it has signalled the backend: from then on
        // the cancel can only hit what that backend runs now.
        let mut rest = [0u8; 64];
        while stream.read(&mut rest).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    let outcome = tokio::time::timeout(CANCEL_DELIVERY, exchange).await;
    let delivered = match outcome {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!("cannot forward a cancel request: {e}");
            // Never connected: the cancel cannot arrive later.
            !connected
        }
        Err(_) => {
            tracing::warn!("a forwarded cancel request got no answer within {CANCEL_DELIVERY:?}");
            false
        }
    };
    if delivered {
        target
            .cancels_in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Gives a server connection back to `pool` once no forwarded cancel is on its way to it
/// (PostgreSQL has signalled the backend, idle by then, which ignores it), polling: a cancel
/// takes PostgreSQL about a millisecond. Closed if that takes longer than
/// [`CANCEL_SETTLE`], or for good when a cancel was never confirmed.
pub(super) async fn give_back_after_cancel(pool: crate::proxy::pool::Pool, mut server: Pooled) {
    let deadline = tokio::time::Instant::now() + CANCEL_SETTLE;
    while server
        .cancels_in_flight
        .load(std::sync::atomic::Ordering::SeqCst)
        > 0
    {
        if tokio::time::Instant::now() >= deadline {
            tracing::debug!("a cancel is still on its way to a server connection: closed");
            server.broken = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    pool.give_back(server);
}

/// How long a released server connection waits for a cancel on its way to it.
pub(super) const CANCEL_SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a forwarded cancel may take to be confirmed by PostgreSQL.
pub(super) const CANCEL_DELIVERY: std::time::Duration = std::time::Duration::from_secs(10);
