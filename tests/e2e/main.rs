//! End-to-end tests: real PostgreSQL 15, real pgweir, real clients (psql, pgbench, tokio-postgres).

mod harness;
mod raw;

mod admin;
mod auth;
mod backend;
mod basics;
mod branches;
mod control;
mod data;
mod drivers;
mod policy;
mod robustness;
mod stress;
mod traffic;
mod txn;
