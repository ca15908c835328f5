//! The client authentication exchange. Unknown tenants and users go through exactly the same exchange as known
//! ones (with a deterministic dummy verifier), so a failed login never tells whether they exist.

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use crate::auth::md5::md5_check;
use crate::auth::scram::{ScramError, ScramServer, ScramVerifier};
use crate::config::AuthMethod;
use crate::net::{read_frame, ClientStream, ReadFrameError};
use crate::server::Proxy;
use crate::tenant::{Tenant, User};
use crate::wire::error::sqlstate;
use crate::wire::msg::{self, password_message};
use crate::wire::PgError;

use super::TlsInfo;

/// Password-family messages are small; Postgres caps them too.
const MAX_AUTH_MESSAGE: usize = 16 * 1024;

pub enum AuthFailure {
    /// The client hung up (psql does this to prompt for a password, then reconnects).
    Gone,
    /// Answer with this error and close.
    Error(PgError),
}

impl From<PgError> for AuthFailure {
    fn from(e: PgError) -> Self {
        AuthFailure::Error(e)
    }
}

/// Runs the exchange, reading through `buf` (bytes after the last password message stay there); `Ok(true)` only if
/// the password matched a real user's credentials.
pub async fn authenticate(
    proxy: &Proxy,
    stream: &mut ClientStream,
    buf: &mut BytesMut,
    tls: &TlsInfo,
    tenant: Option<&Tenant>,
    user: Option<&User>,
    user_name: &str,
) -> Result<bool, AuthFailure> {
    let on_tls = stream.is_tls();
    let methods: &[AuthMethod] = tenant
        .map(|t| t.auth.as_slice())
        .unwrap_or(&[AuthMethod::ScramSha256]);
    let Some(method) = methods
        .iter()
        .copied()
        .find(|m| *m != AuthMethod::Password || on_tls)
    else {
        return Err(PgError::fatal(
            sqlstate::INVALID_AUTHORIZATION,
            "password authentication requires TLS",
        )
        .with_hint("connect with sslmode=require")
        .into());
    };
    let verifier = || match user {
        Some(u) => u.scram.clone(),
        None => ScramVerifier::dummy(user_name, &proxy.secret),
    };
    let ok = match method {
        AuthMethod::ScramSha256 => {
            let mut server =
                ScramServer::new(verifier(), tls.channel_binding.clone().filter(|_| on_tls));
            let mut out = BytesMut::new();
            msg::auth_sasl(&server.mechanisms(), &mut out);
            send(stream, &mut out).await?;
            let frame = read_password_message(stream, buf).await?;
            let (mech, data) = password_message::sasl_initial(&frame).ok_or_else(|| {
                PgError::protocol_violation("malformed SASLInitialResponse message")
            })?;
            let first = server.client_first(mech, data).map_err(scram_error)?;
            msg::auth_sasl_continue(first, &mut out);
            send(stream, &mut out).await?;
            let frame = read_password_message(stream, buf).await?;
            let data = password_message::sasl_response(&frame)
                .ok_or_else(|| PgError::protocol_violation("malformed SASLResponse message"))?;
            match server.client_final(data) {
                Ok(fin) if user.is_some() => {
                    msg::auth_sasl_final(fin, &mut out);
                    send(stream, &mut out).await?;
                    true
                }
                Ok(_) | Err(ScramError::InvalidProof) => false,
                Err(e) => return Err(scram_error(e).into()),
            }
        }
        AuthMethod::Md5 => {
            let salt: [u8; 4] = rand::random();
            let mut out = BytesMut::new();
            msg::auth_md5(salt, &mut out);
            send(stream, &mut out).await?;
            let frame = read_password_message(stream, buf).await?;
            let response = password_message::password(&frame)
                .ok_or_else(|| PgError::protocol_violation("malformed password message"))?;
            // A user without an md5 hash is checked against a dummy so that timing and answer are the same.
            let stored = user.and_then(|u| u.md5.as_deref());
            let matched = md5_check(
                stored.unwrap_or("md500000000000000000000000000000000"),
                salt,
                response,
            );
            matched && stored.is_some()
        }
        AuthMethod::Password => {
            let mut out = BytesMut::new();
            msg::auth_cleartext(&mut out);
            send(stream, &mut out).await?;
            let frame = read_password_message(stream, buf).await?;
            let pw = password_message::password(&frame)
                .ok_or_else(|| PgError::protocol_violation("malformed password message"))?;
            let pw = String::from_utf8_lossy(pw);
            verifier().verify_password(&pw) && user.is_some()
        }
    };
    Ok(ok)
}

fn scram_error(e: ScramError) -> PgError {
    match e {
        ScramError::InvalidProof => {
            PgError::fatal(sqlstate::INVALID_PASSWORD, "password authentication failed")
        }
        ScramError::ChannelBindingMismatch | ScramError::ChannelBindingNegotiation(_) => {
            PgError::fatal(
                sqlstate::INVALID_AUTHORIZATION,
                format!("SCRAM channel binding check failed: {e}"),
            )
        }
        e => PgError::protocol_violation(format!("malformed SCRAM message: {e}")),
    }
}

async fn send(stream: &mut ClientStream, out: &mut BytesMut) -> Result<(), AuthFailure> {
    let r = async {
        stream.write_all(out).await?;
        stream.flush().await
    }
    .await;
    out.clear();
    r.map_err(|_| AuthFailure::Gone)
}

async fn read_password_message(
    stream: &mut ClientStream,
    buf: &mut BytesMut,
) -> Result<BytesMut, AuthFailure> {
    match read_frame(stream, buf, MAX_AUTH_MESSAGE).await {
        Ok(f) if f[0] == b'p' => Ok(f),
        Ok(f) => Err(PgError::protocol_violation(format!(
            "expected a password response, got message type '{}'",
            f[0] as char
        ))
        .into()),
        Err(ReadFrameError::Closed) | Err(ReadFrameError::Io(_)) => Err(AuthFailure::Gone),
        Err(ReadFrameError::Frame(e)) => Err(PgError::protocol_violation(e.to_string()).into()),
    }
}
