//! Authentication: verifying clients (SCRAM-SHA-256, md5, cleartext) and logging in to backends.
//! Owns password verifiers and the SASL exchanges; knows nothing of sockets, tenants or pools.

pub mod md5;
pub mod scram;
