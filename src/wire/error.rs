//! Client-visible errors: every error pgweir itself sends carries a SQLSTATE and a message a user can act on.

use bytes::BytesMut;
use pgwire::error::ErrorInfo;
use pgwire::messages::response::ErrorResponse;
use pgwire::messages::Message;

/// Severity of an error pgweir sends. `Fatal` closes the connection afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// SQLSTATE codes pgweir uses (see the PostgreSQL "Error Codes" appendix).
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const CONNECTION_EXCEPTION: &str = "08000";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    pub const QUERY_CANCELED: &str = "57014";
    pub const DUPLICATE_PREPARED_STATEMENT: &str = "42P05";
    pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "25P03";
    pub const IDLE_SESSION_TIMEOUT: &str = "57P05";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    pub const INVALID_PARAMETER_VALUE: &str = "22023";
    pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
    pub const SYNTAX_ERROR: &str = "42601";
    pub const READ_ONLY_SQL_TRANSACTION: &str = "25006";
    pub const CONFIGURATION_LIMIT_EXCEEDED: &str = "53400";
    pub const INTERNAL_ERROR: &str = "XX000";
}

/// An error pgweir reports to a client as an `ErrorResponse`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code} {message}")]
pub struct PgError {
    pub severity: Severity,
    pub code: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl PgError {
    pub fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        PgError {
            severity: Severity::Fatal,
            code,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    pub fn error(code: &'static str, message: impl Into<String>) -> Self {
        PgError {
            severity: Severity::Error,
            ..PgError::fatal(code, message)
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn protocol_violation(message: impl Into<String>) -> Self {
        PgError::fatal(sqlstate::PROTOCOL_VIOLATION, message)
    }

    /// The uniform answer to any failed login: it never says whether the tenant or the user exists.
    pub fn auth_failed(user: &str) -> Self {
        PgError::fatal(
            sqlstate::INVALID_PASSWORD,
            format!("password authentication failed for user \"{user}\""),
        )
    }

    /// Appends the `ErrorResponse` frame to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let mut info = ErrorInfo::new(
            self.severity.as_str().to_owned(),
            self.code.to_owned(),
            self.message.clone(),
        );
        info.severity_nonlocalized = Some(self.severity.as_str().to_owned());
        info.detail = self.detail.clone();
        info.hint = self.hint.clone();
        // Encoding an ErrorResponse only fails past pgwire's length limit; our messages are short.
        if ErrorResponse::from(info).encode(out).is_err() {
            tracing::warn!(code = self.code, "error message too long to encode");
        }
    }

    pub fn to_bytes(&self) -> BytesMut {
        let mut out = BytesMut::with_capacity(64 + self.message.len());
        self.encode(&mut out);
        out
    }
}
