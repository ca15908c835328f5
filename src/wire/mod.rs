//! The Postgres wire protocol as pgweir needs it: framing by tag + length, the untyped startup-phase packets,
//! message builders (through `pgwire`'s encoders) and `ErrorResponse`s with SQLSTATEs.
//!
//! Architecture invariant: this module knows bytes only — no sockets, no tenants, no SQL meaning. Frames are
//! located by their 5-byte header and forwarded as the original bytes; a frame is decoded fully only where pgweir
//! must read its fields, and then exactly one frame at a time (see [`msg::decode_one`]).

pub mod error;
pub mod frame;
pub mod msg;
pub mod startup;

pub use error::{PgError, Severity};
