//! Database branches: a copy of a tenant's main database (or of another branch) on the same cluster, made with
//! `CREATE DATABASE … TEMPLATE`, and the long operations that create, reset and delete them.
//!
//! Postgres refuses to copy a database that has sessions, so an operation *pauses* the source in this instance
//! (`pool::gate`): transactions in flight finish (bounded), new ones wait, idle server connections close; sessions
//! from elsewhere (other instances, direct clients) are waited for, or ended when the caller asked for it. Then the
//! copy runs and traffic resumes: clients see a pause, not errors.
//!
//! Operations are rows in `pgweir.operations` (one running per tenant, enforced by a unique index), run in a task
//! of the instance that accepted them, and keep a heartbeat. One whose heartbeat stopped (its instance died) is
//! finished by `housekeeping`: a create is rolled back (the half-made database dropped), a reset either completes
//! the swap it was in or rolls back, a delete is completed — never left half-done.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_postgres::Client;

use super::control::Control;
use super::store::param;
use super::tenants::cluster_client;
use crate::pool::Pools;
use crate::sqlscan::quote_ident;

/// A running operation's heartbeat period, and how old a heartbeat may be before the operation counts as
/// interrupted.
const HEARTBEAT: Duration = Duration::from_secs(2);
const STALE_AFTER_SECS: f64 = 15.0;

/// Sources at least this large are copied with `STRATEGY FILE_COPY` (a checkpoint and a file copy, fastest for
/// large databases); smaller ones with `WAL_LOG` (block by block through the WAL, no checkpoint).
pub const FILE_COPY_FROM_BYTES: i64 = 64 << 20;

/// The temporary database a reset copies into before it swaps it in.
fn reset_database(branch_db: &str) -> String {
    let h = crate::auth::scram::sha256(branch_db.as_bytes());
    let tag: String = h[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("pgweir_reset_{tag}")
}

/// Can `name` be a branch name? (The same rule as tenant ids; `main` is the tenant's own database.)
pub fn valid_branch_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 40
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !name.contains("--")
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BranchRow {
    pub tenant: String,
    pub name: String,
    pub parent: String,
    #[serde(skip)]
    pub backend_database: String,
    pub state: String,
    pub created_at: String,
    pub expires_at: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Operation {
    pub id: String,
    pub tenant: String,
    pub kind: String,
    pub branch: String,
    pub status: String,
    pub error: Option<String>,
    pub result: Option<Value>,
    pub created_at: String,
    pub finished_at: Option<String>,
    #[serde(skip)]
    pub request: Value,
}

const TS: &str = "'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'";

fn branch_sql(filter: &str) -> String {
    format!(
        "SELECT tenant, name, COALESCE(parent, 'main'), backend_database, state,
                to_char(created_at AT TIME ZONE 'UTC', {TS}), to_char(expires_at AT TIME ZONE 'UTC', {TS})
           FROM pgweir.branches WHERE {filter} ORDER BY name"
    )
}

fn branch_row(r: &tokio_postgres::Row) -> BranchRow {
    BranchRow {
        tenant: r.get(0),
        name: r.get(1),
        parent: r.get(2),
        backend_database: r.get(3),
        state: r.get(4),
        created_at: r.get(5),
        expires_at: r.get(6),
    }
}

fn op_sql(filter: &str) -> String {
    format!(
        "SELECT id, tenant, kind, branch, status, error, result,
                to_char(created_at AT TIME ZONE 'UTC', {TS}), to_char(finished_at AT TIME ZONE 'UTC', {TS}), request
           FROM pgweir.operations WHERE {filter}"
    )
}

fn op_row(r: &tokio_postgres::Row) -> Operation {
    Operation {
        id: r.get(0),
        tenant: r.get(1),
        kind: r.get(2),
        branch: r.get(3),
        status: r.get(4),
        error: r.get(5),
        result: r.get(6),
        created_at: r.get(7),
        finished_at: r.get(8),
        request: r.get(9),
    }
}

type DbResult<T> = Result<T, tokio_postgres::Error>;

/// The branches of a tenant (every state).
pub async fn list(control: &Control, tenant: &str) -> DbResult<Vec<BranchRow>> {
    let rows = control
        .catalog
        .rows(branch_sql("tenant = $1"), vec![param(tenant.to_owned())])
        .await?;
    Ok(rows.iter().map(branch_row).collect())
}

pub async fn get(control: &Control, tenant: &str, name: &str) -> DbResult<Option<BranchRow>> {
    let rows = control
        .catalog
        .rows(
            branch_sql("tenant = $1 AND name = $2"),
            vec![param(tenant.to_owned()), param(name.to_owned())],
        )
        .await?;
    Ok(rows.first().map(branch_row))
}

pub async fn operation(control: &Control, id: &str) -> DbResult<Option<Operation>> {
    let rows = control
        .catalog
        .rows(op_sql("id = $1"), vec![param(id.to_owned())])
        .await?;
    Ok(rows.first().map(op_row))
}

/// The operation running for a tenant, if any.
pub async fn running(control: &Control, tenant: &str) -> DbResult<Option<Operation>> {
    let rows = control
        .catalog
        .rows(
            op_sql("tenant = $1 AND status = 'running'"),
            vec![param(tenant.to_owned())],
        )
        .await?;
    Ok(rows.first().map(op_row))
}

/// Why an operation could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("another operation runs for this tenant: {0}")]
    Busy(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    #[error("catalog: {0}")]
    Catalog(#[from] tokio_postgres::Error),
}

/// What a new branch is.
#[derive(Debug, Clone)]
pub struct NewBranch {
    pub name: String,
    pub parent: String,
    /// RFC 3339.
    pub expires_at: Option<String>,
    pub pause_timeout: Duration,
    pub terminate_other_sessions: bool,
    /// `WAL_LOG` or `FILE_COPY` instead of the choice by size.
    pub strategy: Option<&'static str>,
}

/// Records a branch-create operation (and the branch as `creating`); the caller runs it with [`run`] when it is
/// new (true). The same request while that operation runs returns it (false); `Ok(None)` when the branch exists
/// already as asked (nothing to do).
pub async fn start_create(
    control: &Control,
    tenant: &str,
    req: &NewBranch,
) -> Result<Option<(Operation, bool)>, StartError> {
    let t = control
        .catalog
        .tenant(tenant)
        .await?
        .filter(|t| t.state == "ready" || t.state == "paused")
        .ok_or_else(|| StartError::NotFound(format!("no ready tenant \"{tenant}\"")))?;
    if let Some(b) = get(control, tenant, &req.name).await? {
        if b.parent != req.parent {
            return Err(StartError::Conflict(format!(
                "branch \"{}\" exists with parent \"{}\"",
                b.name, b.parent
            )));
        }
        return match running(control, tenant).await? {
            Some(op) if op.branch == req.name && op.kind == "branch.create" => {
                Ok(Some((op, false)))
            }
            _ if b.state == "ready" => Ok(None),
            _ => Err(StartError::Conflict(format!(
                "branch \"{}\" is {}",
                b.name, b.state
            ))),
        };
    }
    if req.parent != "main" {
        match get(control, tenant, &req.parent).await? {
            Some(p) if p.state == "ready" => {}
            _ => {
                return Err(StartError::NotFound(format!(
                    "no ready branch \"{}\" to copy",
                    req.parent
                )))
            }
        }
    }
    let plan = control.catalog.plan(&t.plan).await?;
    let max = plan.map_or(i32::MAX, |p| p.max_branches);
    let have = list(control, tenant).await?.len();
    if have >= usize::try_from(max).unwrap_or(0) {
        return Err(StartError::Conflict(if max == 0 {
            format!(
                "the tenant's plan \"{}\" allows 1 database and no branches",
                t.plan
            )
        } else {
            format!("the tenant's plan \"{}\" allows {max} branches", t.plan)
        }));
    }
    let request = json!({
        "name": req.name, "parent": req.parent, "expires_at": req.expires_at,
        "pause_timeout_ms": req.pause_timeout.as_millis() as u64,
        "terminate_other_sessions": req.terminate_other_sessions,
        "strategy": req.strategy,
    });
    let db = super::provision::new_database_name();
    let parent = (req.parent != "main").then(|| req.parent.clone());
    let (tenant_s, name, expires) = (tenant.to_owned(), req.name.clone(), req.expires_at.clone());
    let instance = control.instance.clone();
    let id = new_op_id();
    let op_id = id.clone();
    control
        .catalog
        .with(move |c| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                tx.execute(
                    "INSERT INTO pgweir.operations (id, tenant, kind, branch, request, status, instance)
                     VALUES ($1, $2, 'branch.create', $3, $4, 'running', $5)",
                    &[&op_id, &tenant_s, &name, &request, &instance],
                )
                .await?;
                tx.execute(
                    "INSERT INTO pgweir.branches (tenant, name, parent, backend_database, state, expires_at)
                     VALUES ($1, $2, $3, $4, 'creating', $5::text::timestamptz)",
                    &[&tenant_s, &name, &parent, &db, &expires],
                )
                .await?;
                tx.commit().await
            })
        })
        .await
        .map_err(|e| busy_or(e, tenant))?;
    Ok(operation(control, &id).await?.map(|op| (op, true)))
}

/// Records a reset or delete of an existing branch; true when it is new (the caller runs it), false for the same
/// request while it runs.
pub async fn start_change(
    control: &Control,
    tenant: &str,
    name: &str,
    kind: &'static str,
    request: Value,
) -> Result<(Operation, bool), StartError> {
    let Some(b) = get(control, tenant, name).await? else {
        return Err(StartError::NotFound(format!(
            "no branch \"{name}\" of \"{tenant}\""
        )));
    };
    if let Some(op) = running(control, tenant).await? {
        if op.branch == name && op.kind == kind {
            return Ok((op, false)); // the same request again: the same operation
        }
        return Err(StartError::Busy(op.id));
    }
    if b.state != "ready" {
        return Err(StartError::Conflict(format!(
            "branch \"{name}\" is {}",
            b.state
        )));
    }
    if kind == "branch.delete" {
        let children: Vec<String> = list(control, tenant)
            .await?
            .into_iter()
            .filter(|c| c.parent == name)
            .map(|c| c.name)
            .collect();
        if !children.is_empty() {
            return Err(StartError::Conflict(format!(
                "branch \"{name}\" has branches of its own: {}",
                children.join(", ")
            )));
        }
    }
    let state = if kind == "branch.delete" {
        "deleting"
    } else {
        "resetting"
    };
    let (tenant_s, name_s, instance) =
        (tenant.to_owned(), name.to_owned(), control.instance.clone());
    let id = new_op_id();
    let op_id = id.clone();
    control
        .catalog
        .with(move |c| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                tx.execute(
                    "INSERT INTO pgweir.operations (id, tenant, kind, branch, request, status, instance)
                     VALUES ($1, $2, $3, $4, $5, 'running', $6)",
                    &[&op_id, &tenant_s, &kind, &name_s, &request, &instance],
                )
                .await?;
                tx.execute(
                    "UPDATE pgweir.branches SET state = $3 WHERE tenant = $1 AND name = $2",
                    &[&tenant_s, &name_s, &state],
                )
                .await?;
                tx.commit().await
            })
        })
        .await
        .map_err(|e| busy_or(e, tenant))?;
    let op = operation(control, &id)
        .await?
        .ok_or_else(|| StartError::NotFound("the operation vanished".into()))?;
    Ok((op, true))
}

fn busy_or(e: tokio_postgres::Error, tenant: &str) -> StartError {
    if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
        StartError::Busy(format!("tenant \"{tenant}\""))
    } else {
        StartError::Catalog(e)
    }
}

fn new_op_id() -> String {
    format!("op_{}", super::tenants::random_password().to_lowercase())
}

/// Runs a recorded operation to its end (succeeded or failed), keeping its heartbeat meanwhile.
pub async fn run(
    control: Arc<Control>,
    pools: &Pools,
    pause_seconds: &crate::telemetry::Latency,
    op: Operation,
) {
    let beat = {
        let control = control.clone();
        let id = op.id.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT);
            loop {
                tick.tick().await;
                let _ = control
                    .catalog
                    .rows(
                        "UPDATE pgweir.operations SET heartbeat_at = now() WHERE id = $1".into(),
                        vec![param(id.clone())],
                    )
                    .await;
            }
        })
    };
    let _serialized = control.lock_tenant(&op.tenant).await;
    let outcome = match op.kind.as_str() {
        "branch.create" => create(&control, pools, pause_seconds, &op).await,
        "branch.reset" => reset(&control, pools, pause_seconds, &op).await,
        "branch.delete" => delete(&control, pools, &op).await,
        other => Err(format!("unknown operation kind {other}")),
    };
    beat.abort();
    if let Err(e) = &outcome {
        tracing::warn!(op = %op.id, tenant = %op.tenant, branch = %op.branch, kind = %op.kind, error = %e, "operation failed");
        if op.kind == "branch.create" {
            // Nothing of a failed create stays: the half-made database and the branch row go.
            if let Err(e2) = undo_create(&control, &op).await {
                tracing::warn!(op = %op.id, error = %e2, "could not clean up after a failed branch create; housekeeping retries");
                return;
            }
        } else if op.kind == "branch.reset" {
            if e.starts_with(SWAP_PENDING) {
                tracing::warn!(op = %op.id, "reset swap incomplete; housekeeping finishes it");
                return;
            }
            let _ = set_branch_state(&control, &op.tenant, &op.branch, "ready").await;
        }
    }
    // Before the operation reads as finished: this instance routes to what it made (other instances follow the
    // catalog's notification), as tenant operations do.
    if let Err(e) = control.directory.reload(&op.tenant).await {
        tracing::warn!(op = %op.id, tenant = %op.tenant, error = %e, "could not reload the tenant after an operation");
    }
    let result = outcome.as_ref().ok().cloned();
    let error = outcome.err();
    if let Err(e) = finish(&control, &op.id, result, error).await {
        tracing::warn!(op = %op.id, error = %e, "could not record the end of an operation");
    }
    let _ = control
        .catalog
        .audit(
            "operation",
            &op.kind,
            &format!("{}/{}", op.tenant, op.branch),
            "done",
            json!({"operation": op.id}),
        )
        .await;
}

async fn finish(
    control: &Control,
    id: &str,
    result: Option<Value>,
    error: Option<String>,
) -> DbResult<()> {
    let status = if error.is_none() {
        "succeeded"
    } else {
        "failed"
    };
    control
        .catalog
        .rows(
            "UPDATE pgweir.operations SET status = $2, result = $3, error = $4, finished_at = now()
              WHERE id = $1 AND status = 'running'"
                .into(),
            vec![
                param(id.to_owned()),
                param(status),
                param(result),
                param(error),
            ],
        )
        .await
        .map(drop)
}

async fn set_branch_state(
    control: &Control,
    tenant: &str,
    name: &str,
    state: &'static str,
) -> DbResult<()> {
    control
        .catalog
        .rows(
            "UPDATE pgweir.branches SET state = $3 WHERE tenant = $1 AND name = $2".into(),
            vec![
                param(tenant.to_owned()),
                param(name.to_owned()),
                param(state),
            ],
        )
        .await
        .map(drop)
}

async fn delete_branch_row(control: &Control, tenant: &str, name: &str) -> DbResult<()> {
    control
        .catalog
        .rows(
            "DELETE FROM pgweir.branches WHERE tenant = $1 AND name = $2".into(),
            vec![param(tenant.to_owned()), param(name.to_owned())],
        )
        .await
        .map(drop)
}

/// Where a tenant lives: (cluster, owner role, main database).
async fn placement(control: &Control, tenant: &str) -> Result<(String, String, String), String> {
    let t = control
        .catalog
        .tenant(tenant)
        .await
        .map_err(|e| format!("catalog: {e}"))?
        .ok_or_else(|| format!("tenant \"{tenant}\" is gone"))?;
    Ok((t.cluster, t.backend_role, t.backend_database))
}

/// The physical database of `branch` (`main`: the tenant's own).
async fn database_of(
    control: &Control,
    tenant: &str,
    branch: &str,
    main: &str,
) -> Result<String, String> {
    if branch == "main" {
        return Ok(main.to_owned());
    }
    get(control, tenant, branch)
        .await
        .map_err(|e| format!("catalog: {e}"))?
        .map(|b| b.backend_database)
        .ok_or_else(|| format!("branch \"{branch}\" is gone"))
}

/// A database paused in this instance, resumed when dropped (also on an early return).
struct Paused<'a> {
    pools: &'a Pools,
    cluster: String,
    database: String,
    hist: &'a crate::telemetry::Latency,
    /// False when an operator had paused the database already: the operation works within that pause and leaves
    /// it to the operator to resume.
    owned: bool,
    since: Instant,
}

impl Paused<'_> {
    /// Resumes (if this pause is the operation's own); how long the operation worked paused.
    fn resume(self) -> Duration {
        let d = if self.owned {
            self.pools
                .resume(&self.cluster, &self.database)
                .unwrap_or_default()
        } else {
            self.since.elapsed()
        };
        if self.owned {
            self.hist.record(d);
        }
        std::mem::forget(self);
        d
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        if let Some(d) = self.pools.resume(&self.cluster, &self.database) {
            self.hist.record(d);
        }
    }
}

/// Pauses `database` here and waits until no other session uses it (ending them if `terminate`), all within
/// `timeout`.
async fn pause_quiet<'a>(
    pools: &'a Pools,
    hist: &'a crate::telemetry::Latency,
    admin: &Client,
    cluster: &str,
    database: &str,
    timeout: Duration,
    terminate: bool,
) -> Result<Paused<'a>, String> {
    let deadline = Instant::now() + timeout;
    let since = Instant::now();
    let owned = match pools.pause(cluster, database, timeout).await {
        Ok(_) => true,
        // Paused by an operator (POST …/pause): the copy happens within that pause (the sessions check below
        // still waits for anything in flight), and resuming stays the operator's call.
        Err(crate::pool::gate::PauseError::AlreadyPaused) => {
            tracing::info!(%database, "already paused by an operator; working within that pause");
            false
        }
        Err(e) => return Err(format!("could not pause \"{database}\": {e}")),
    };
    let paused = Paused {
        pools,
        cluster: cluster.to_owned(),
        database: database.to_owned(),
        hist,
        owned,
        since,
    };
    loop {
        let others: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&database],
            )
            .await
            .map_err(|e| e.to_string())?
            .get(0);
        if others == 0 {
            return Ok(paused);
        }
        if terminate {
            admin
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                    &[&database],
                )
                .await
                .map_err(|e| e.to_string())?;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{others} other session(s) still use \"{database}\" after {timeout:?} (another pgweir instance or a \
                 direct connection); retry, or pass \"terminate_other_sessions\": true"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Copies `source` into a new database `target` owned by `role`; returns the strategy used.
async fn copy_database(
    admin: &Client,
    source: &str,
    target: &str,
    role: &str,
    size: i64,
    asked: Option<&str>,
) -> Result<&'static str, String> {
    let strategy = match asked {
        Some("FILE_COPY") => "FILE_COPY",
        Some("WAL_LOG") => "WAL_LOG",
        _ if size >= FILE_COPY_FROM_BYTES => "FILE_COPY",
        _ => "WAL_LOG",
    };
    let (t, r) = (quote_ident(target), quote_ident(role));
    admin
        .batch_execute(&format!(
            "CREATE DATABASE {t} TEMPLATE {} STRATEGY {strategy} OWNER {r}",
            quote_ident(source)
        ))
        .await
        .map_err(|e| format!("copying \"{source}\": {}", db_error(&e)))?;
    admin
        .batch_execute(&format!(
            "REVOKE ALL ON DATABASE {t} FROM PUBLIC; GRANT ALL ON DATABASE {t} TO {r}"
        ))
        .await
        .map_err(|e| e.to_string())?;
    Ok(strategy)
}

fn db_error(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map_or_else(|| e.to_string(), |d| d.message().to_owned())
}

async fn database_size(admin: &Client, db: &str) -> Result<i64, String> {
    Ok(admin
        .query_one("SELECT pg_database_size($1::text)", &[&db])
        .await
        .map_err(|e| e.to_string())?
        .get(0))
}

fn request_wait(op: &Operation) -> (Duration, bool) {
    let ms = op.request["pause_timeout_ms"].as_u64().unwrap_or(30_000);
    let terminate = op.request["terminate_other_sessions"]
        .as_bool()
        .unwrap_or(false);
    (Duration::from_millis(ms), terminate)
}

async fn create(
    control: &Control,
    pools: &Pools,
    hist: &crate::telemetry::Latency,
    op: &Operation,
) -> Result<Value, String> {
    let (cluster, role, main) = placement(control, &op.tenant).await?;
    let parent = op.request["parent"].as_str().unwrap_or("main");
    let source = database_of(control, &op.tenant, parent, &main).await?;
    let target = branch_database_of_row(control, op)
        .await?
        .ok_or_else(|| format!("branch \"{}\" is gone", op.branch))?;
    let admin = cluster_client(control, &cluster).await?;
    let size = database_size(&admin, &source).await?;
    // A leftover of an interrupted attempt — never a database the catalog knows as someone else's.
    if claimed_elsewhere(control, &target, &op.tenant, &op.branch).await? {
        return Err(format!(
            "database \"{target}\" belongs to another tenant or branch; refusing to touch it"
        ));
    }
    drop_database(&admin, &target).await?;
    let (wait, terminate) = request_wait(op);
    let started = Instant::now();
    let paused = pause_quiet(pools, hist, &admin, &cluster, &source, wait, terminate).await?;
    let copy_started = Instant::now();
    let copied = copy_database(
        &admin,
        &source,
        &target,
        &role,
        size,
        op.request["strategy"].as_str(),
    )
    .await;
    let copy_ms = copy_started.elapsed().as_millis() as u64;
    let pause = paused.resume();
    let strategy = copied?;
    set_branch_state(control, &op.tenant, &op.branch, "ready")
        .await
        .map_err(|e| format!("catalog: {e}"))?;
    Ok(json!({
        "pause_ms": pause.as_millis() as u64,
        "copy_ms": copy_ms,
        "total_ms": started.elapsed().as_millis() as u64,
        "strategy": strategy,
        "source_bytes": size,
    }))
}

async fn reset(
    control: &Control,
    pools: &Pools,
    hist: &crate::telemetry::Latency,
    op: &Operation,
) -> Result<Value, String> {
    let (cluster, role, main) = placement(control, &op.tenant).await?;
    let branch = get(control, &op.tenant, &op.branch)
        .await
        .map_err(|e| format!("catalog: {e}"))?
        .ok_or_else(|| format!("branch \"{}\" is gone", op.branch))?;
    let source = database_of(control, &op.tenant, &branch.parent, &main).await?;
    let target = branch.backend_database.clone();
    let fresh = reset_database(&target);
    let admin = cluster_client(control, &cluster).await?;
    let size = database_size(&admin, &source).await?;
    drop_database(&admin, &fresh).await?;
    let (wait, terminate) = request_wait(op);
    let started = Instant::now();
    // The copy, while the parent is paused.
    let paused = pause_quiet(pools, hist, &admin, &cluster, &source, wait, terminate).await?;
    let copied = copy_database(&admin, &source, &fresh, &role, size, None).await;
    let parent_pause = paused.resume();
    let strategy = copied?;
    // The swap, while the branch's own clients are paused (they go on with the fresh copy).
    let paused = match pause_quiet(pools, hist, &admin, &cluster, &target, wait, true).await {
        Ok(p) => p,
        Err(e) => {
            let _ = drop_database(&admin, &fresh).await;
            return Err(e);
        }
    };
    // The swap is retried a few times: between its drop and its rename the branch has no database.
    let mut swapped = swap_in(&admin, &fresh, &target).await;
    for _ in 0..3 {
        if swapped.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        swapped = swap_in(&admin, &fresh, &target).await;
    }
    pools.close_idle(&cluster, &target);
    let branch_pause = paused.resume();
    if let Err(e) = swapped {
        // Left running: its heartbeat stops, and housekeeping completes the swap (`recover_reset`).
        return Err(format!("{SWAP_PENDING}{e}"));
    }
    set_branch_state(control, &op.tenant, &op.branch, "ready")
        .await
        .map_err(|e| format!("catalog: {e}"))?;
    Ok(json!({
        "pause_ms": parent_pause.as_millis() as u64,
        "branch_pause_ms": branch_pause.as_millis() as u64,
        "total_ms": started.elapsed().as_millis() as u64,
        "strategy": strategy,
        "source_bytes": size,
    }))
}

/// The error of a reset whose copy is made but not swapped in yet (left to `recover_reset`).
const SWAP_PENDING: &str = "swap incomplete: ";

/// Replaces `target` by `fresh` (dropped and renamed; sessions on `target` are ended).
async fn swap_in(admin: &Client, fresh: &str, target: &str) -> Result<(), String> {
    drop_database(admin, target).await?;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} RENAME TO {}",
            quote_ident(fresh),
            quote_ident(target)
        ))
        .await
        .map_err(|e| db_error(&e))
}

async fn delete(control: &Control, pools: &Pools, op: &Operation) -> Result<Value, String> {
    let (cluster, _, _) = placement(control, &op.tenant).await?;
    let target = branch_database_of_row(control, op).await?;
    if let Some(target) = &target {
        let admin = cluster_client(control, &cluster).await?;
        pools.close_idle(&cluster, target);
        drop_database(&admin, target).await?;
        pools.close_idle(&cluster, target);
    }
    delete_branch_row(control, &op.tenant, &op.branch)
        .await
        .map_err(|e| format!("catalog: {e}"))?;
    Ok(json!({}))
}

async fn branch_database_of_row(
    control: &Control,
    op: &Operation,
) -> Result<Option<String>, String> {
    Ok(get(control, &op.tenant, &op.branch)
        .await
        .map_err(|e| format!("catalog: {e}"))?
        .map(|b| b.backend_database))
}

async fn drop_database(admin: &Client, db: &str) -> Result<(), String> {
    admin
        .batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(db)
        ))
        .await
        .map_err(|e| format!("dropping \"{db}\": {}", db_error(&e)))
}

/// Does a tenant or another branch than (`tenant`, `branch`) record `db` as its database?
async fn claimed_elsewhere(
    control: &Control,
    db: &str,
    tenant: &str,
    branch: &str,
) -> Result<bool, String> {
    let rows = control
        .catalog
        .rows(
            "SELECT EXISTS (SELECT 1 FROM pgweir.tenants WHERE backend_database = $1)
                 OR EXISTS (SELECT 1 FROM pgweir.branches WHERE backend_database = $1
                             AND NOT (tenant = $2 AND name = $3))"
                .into(),
            vec![
                param(db.to_owned()),
                param(tenant.to_owned()),
                param(branch.to_owned()),
            ],
        )
        .await
        .map_err(|e| format!("catalog: {e}"))?;
    Ok(rows.first().is_some_and(|r| r.get(0)))
}

/// Removes what a failed or interrupted create made: its database and its branch row.
async fn undo_create(control: &Control, op: &Operation) -> Result<(), String> {
    let (cluster, _, _) = placement(control, &op.tenant).await?;
    let admin = cluster_client(control, &cluster).await?;
    if let Some(db) = branch_database_of_row(control, op).await? {
        if !claimed_elsewhere(control, &db, &op.tenant, &op.branch).await? {
            drop_database(&admin, &db).await?;
        }
    }
    delete_branch_row(control, &op.tenant, &op.branch)
        .await
        .map_err(|e| format!("catalog: {e}"))
}

/// Finishes operations whose instance stopped (heartbeat too old) and starts deletes of expired branches. Runs
/// periodically in every instance; the catalog decides which instance gets each piece of work.
pub async fn housekeeping(control: &Arc<Control>, pools: &Pools, hist: &crate::telemetry::Latency) {
    let stale: Vec<Operation> = match control
        .catalog
        .with(|c| {
            Box::pin(async move {
                // Taken over by this instance (a new heartbeat), so that one instance finishes each.
                let rows = c
                    .query(
                        &format!(
                            "WITH taken AS (
                               UPDATE pgweir.operations SET heartbeat_at = now()
                                WHERE status = 'running'
                                  AND heartbeat_at < now() - make_interval(secs => {STALE_AFTER_SECS})
                                RETURNING id)
                             {}",
                            op_sql("id IN (SELECT id FROM taken)")
                        ),
                        &[],
                    )
                    .await?;
                Ok(rows.iter().map(op_row).collect())
            })
        })
        .await
    {
        Ok(v) => v,
        Err(e) => {
            tracing::debug!(error = %e, "housekeeping: catalog not reachable");
            return;
        }
    };
    for op in stale {
        tracing::warn!(op = %op.id, tenant = %op.tenant, kind = %op.kind, "finishing an interrupted operation");
        let _serialized = control.lock_tenant(&op.tenant).await;
        let outcome: Result<Option<Value>, String> = match op.kind.as_str() {
            // A create that got as far as a ready branch succeeded (only recording its end failed).
            "branch.create" => match get(control, &op.tenant, &op.branch).await {
                Ok(Some(b)) if b.state == "ready" => {
                    Ok(Some(json!({"recovered": "the branch was ready"})))
                }
                _ => undo_create(control, &op).await.and(Err(
                    "interrupted (its pgweir instance stopped); nothing was left behind".into(),
                )),
            },
            "branch.delete" => delete(control, pools, &op).await.map(Some),
            "branch.reset" => recover_reset(control, &op).await,
            _ => Err("unknown operation".into()),
        };
        let (result, error) = match outcome {
            Ok(r) => (r.or(Some(json!({"recovered": true}))), None),
            Err(e) => (None, Some(e)),
        };
        let _ = finish(control, &op.id, result, error).await;
    }
    // Expired branches: a delete each (one operation per tenant at a time; the rest wait for the next round).
    let expired: Vec<(String, String)> = control
        .catalog
        .rows(
            "SELECT b.tenant, b.name FROM pgweir.branches b
              WHERE b.state = 'ready' AND b.expires_at <= now()
                AND NOT EXISTS (SELECT 1 FROM pgweir.branches c
                                 WHERE c.tenant = b.tenant AND c.parent = b.name)"
                .into(),
            Vec::new(),
        )
        .await
        .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        .unwrap_or_default();
    for (tenant, name) in expired {
        match start_change(
            control,
            &tenant,
            &name,
            "branch.delete",
            json!({"expired": true}),
        )
        .await
        {
            Ok((op, true)) => {
                tracing::info!(%tenant, branch = %name, op = %op.id, "deleting an expired branch");
                let control = control.clone();
                run(control, pools, hist, op).await;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(%tenant, branch = %name, error = %e, "expired branch not deleted yet")
            }
        }
    }
}

/// An interrupted reset: if the branch's database is gone but the fresh copy exists, the swap is completed; else
/// the fresh copy is dropped and the branch stays as it was.
async fn recover_reset(control: &Control, op: &Operation) -> Result<Option<Value>, String> {
    let (cluster, _, _) = placement(control, &op.tenant).await?;
    let target = branch_database_of_row(control, op)
        .await?
        .ok_or_else(|| format!("branch \"{}\" is gone", op.branch))?;
    let fresh = reset_database(&target);
    let admin = cluster_client(control, &cluster).await?;
    let exists = |db: String| {
        let admin = &admin;
        async move {
            admin
                .query("SELECT 1 FROM pg_database WHERE datname = $1", &[&db])
                .await
                .map(|r| !r.is_empty())
                .map_err(|e| e.to_string())
        }
    };
    let outcome = if !exists(target.clone()).await? && exists(fresh.clone()).await? {
        swap_in(&admin, &fresh, &target)
            .await
            .map(|()| Some(json!({"recovered": "swap completed"})))
    } else {
        drop_database(&admin, &fresh).await?;
        Err("interrupted (its pgweir instance stopped); the branch is unchanged".into())
    };
    set_branch_state(control, &op.tenant, &op.branch, "ready")
        .await
        .map_err(|e| format!("catalog: {e}"))?;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn physical_names_are_opaque_distinct_and_fit() {
        use crate::catalog::provision::{new_database_name, new_role_name};
        let (a, b, r) = (new_database_name(), new_database_name(), new_role_name());
        assert_ne!(a, b);
        for name in [&a, &b, &r] {
            assert!(name.len() <= 63, "{name}");
            assert!(
                name.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_'),
                "{name}"
            );
        }
        assert!(a.starts_with("pgweir_db_") && r.starts_with("pgweir_role_"));
        assert!(reset_database(&a).len() <= 63);
        assert_ne!(reset_database(&a), reset_database(&b));
        assert!(valid_branch_name("pr-12"));
        for bad in ["", "-a", "a-", "a--b", "A", "a_b", &"x".repeat(41)] {
            assert!(!valid_branch_name(bad), "{bad}");
        }
    }
}
