//! Reads and writes of the catalog for the admin API: clusters, tenants, tokens and the audit log. One connection,
//! re-opened when it fails; each operation is short (provisioning on a cluster happens between catalog calls,
//! never inside one).

use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio_postgres::Client;

use super::provision::ClusterAdmin;
use super::secret::SecretKey;
use crate::pool::UsageDelta;
use tokio_postgres::types::ToSql;

/// An owned statement parameter (see [`Catalog::rows`]).
pub(crate) type Param = Box<dyn ToSql + Send + Sync>;

/// `v` as a [`Param`].
pub(crate) fn param<T: ToSql + Send + Sync + 'static>(v: T) -> Param {
    Box::new(v)
}

/// The catalog as the admin API uses it.
pub struct Catalog {
    db: tokio_postgres::Config,
    pub key: Arc<SecretKey>,
    client: tokio::sync::Mutex<Option<Client>>,
}

/// A tenant as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct TenantRow {
    pub id: String,
    pub state: String,
    pub failure: Option<String>,
    pub cluster: String,
    pub plan: String,
    pub database: String,
    #[serde(skip)]
    pub backend_database: String,
    #[serde(skip)]
    pub backend_role: String,
    #[serde(skip)]
    pub backend_password_enc: Vec<u8>,
    #[serde(skip)]
    pub spec: Value,
    pub created_at: String,
}

/// A registered cluster as the API lists it.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterRow {
    pub name: String,
    pub host: String,
    pub port: i32,
    /// Tenants it takes (placement).
    pub capacity: i32,
    pub draining: bool,
    pub tenants: i64,
    /// Active transactions over all its tenants at once (0: no cap); shared by plan weight when reached.
    pub max_active_transactions: i32,
}

/// A plan as the API shows and edits it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlanRow {
    pub name: String,
    /// The backend role's connection limit.
    pub max_connections: i32,
    pub pool_size: i32,
    pub max_branches: i32,
    /// The data plane's limits and SQL policy (`policy::Plan` as JSON).
    pub spec: Value,
}

/// A plan's limits that provisioning needs.
#[derive(Debug, Clone)]
pub struct Plan {
    pub name: String,
    pub max_connections: i32,
    pub max_branches: i32,
}

/// An API token's identity.
#[derive(Debug, Clone)]
pub struct TokenInfo {
    pub name: String,
    pub scope: String,
    pub hash: [u8; 32],
}

pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

const TENANT_COLUMNS: &str = "id, state, failure, cluster, plan, database, backend_database, backend_role, \
     backend_password_enc, spec, to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')";

fn tenant_row(r: &tokio_postgres::Row) -> TenantRow {
    TenantRow {
        id: r.get(0),
        state: r.get(1),
        failure: r.get(2),
        cluster: r.get(3),
        plan: r.get(4),
        database: r.get(5),
        backend_database: r.get(6),
        backend_role: r.get(7),
        backend_password_enc: r.get(8),
        spec: r.get(9),
        created_at: r.get(10),
    }
}

impl Catalog {
    pub fn new(db: tokio_postgres::Config, key: Arc<SecretKey>) -> Catalog {
        Catalog {
            db,
            key,
            client: tokio::sync::Mutex::new(None),
        }
    }

    /// Runs `f` with the catalog connection (opened if needed; dropped when a statement fails on a closed one).
    pub(crate) async fn with<T>(
        &self,
        f: impl for<'c> FnOnce(
            &'c mut Client,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, tokio_postgres::Error>> + Send + 'c>,
        >,
    ) -> Result<T, tokio_postgres::Error> {
        let mut guard = self.connected().await?;
        let client = guard.as_mut().expect("connected above");
        let r = f(client).await;
        if client.is_closed() {
            *guard = None;
        }
        r
    }

    /// Runs one statement with owned parameters on the catalog connection; its rows (none for most writes).
    pub(crate) async fn rows(
        &self,
        sql: String,
        params: Vec<Param>,
    ) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
        self.with(move |c| {
            Box::pin(async move {
                let refs: Vec<&(dyn ToSql + Sync)> =
                    params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect();
                c.query(&sql, &refs).await
            })
        })
        .await
    }

    /// The catalog connection, opened (again) when there is none or it closed.
    async fn connected(
        &self,
    ) -> Result<tokio::sync::MutexGuard<'_, Option<Client>>, tokio_postgres::Error> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            *guard = Some(super::connect(&self.db).await?);
        }
        Ok(guard)
    }

    /// Applies the migrations (see [`super::migrate`]).
    pub async fn migrate(&self) -> Result<Vec<i32>, super::CatalogError> {
        let mut guard = self.connected().await?;
        super::migrate(guard.as_mut().expect("connected above")).await
    }

    pub async fn ping(&self) -> bool {
        self.with(|c| Box::pin(async move { c.simple_query("SELECT 1").await.map(|_| ()) }))
            .await
            .is_ok()
    }

    /// Registers (or updates) a cluster. `max_active_transactions` None keeps what it was (0 for a new one).
    pub async fn put_cluster(
        &self,
        admin: &ClusterAdmin,
        capacity: i32,
        max_active_transactions: Option<i32>,
    ) -> Result<(), tokio_postgres::Error> {
        let sealed = admin
            .password
            .as_ref()
            .map(|p| self.key.seal(&format!("cluster:{}", admin.name), p));
        let (name, host, port, user) = (
            admin.name.clone(),
            admin.host.clone(),
            i32::from(admin.port),
            admin.user.clone(),
        );
        self.with(move |c| {
            Box::pin(async move {
                c.execute(
                    "INSERT INTO pgweir.clusters (name, host, port, admin_user, admin_password_enc, capacity,
                         max_active_transactions)
                     VALUES ($1, $2, $3, $4, $5, $6, COALESCE($7, 0))
                     ON CONFLICT (name) DO UPDATE SET host = $2, port = $3, admin_user = $4,
                         admin_password_enc = COALESCE($5, pgweir.clusters.admin_password_enc), capacity = $6,
                         max_active_transactions = COALESCE($7, pgweir.clusters.max_active_transactions)",
                    &[&name, &host, &port, &user, &sealed, &capacity, &max_active_transactions],
                )
                .await
                .map(|_| ())
            })
        })
        .await
    }

    /// Every cluster, with the number of tenants on it.
    pub async fn clusters(&self) -> Result<Vec<ClusterRow>, tokio_postgres::Error> {
        self.with(|c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        "SELECT c.name, c.host, c.port, c.capacity, c.draining,
                                (SELECT count(*) FROM pgweir.tenants t WHERE t.cluster = c.name),
                                c.max_active_transactions
                           FROM pgweir.clusters c ORDER BY c.name",
                        &[],
                    )
                    .await?;
                Ok(rows
                    .iter()
                    .map(|r| ClusterRow {
                        name: r.get(0),
                        host: r.get(1),
                        port: r.get(2),
                        capacity: r.get(3),
                        draining: r.get(4),
                        tenants: r.get(5),
                        max_active_transactions: r.get(6),
                    })
                    .collect())
            })
        })
        .await
    }

    /// Marks a cluster as draining (no new tenants) or not; false when there is no such cluster.
    pub async fn set_draining(
        &self,
        name: &str,
        draining: bool,
    ) -> Result<bool, tokio_postgres::Error> {
        let name = name.to_owned();
        self.with(move |c| {
            Box::pin(async move {
                c.execute(
                    "UPDATE pgweir.clusters SET draining = $2 WHERE name = $1",
                    &[&name, &draining],
                )
                .await
                .map(|n| n > 0)
            })
        })
        .await
    }

    /// A cluster's provisioning login.
    pub async fn cluster_admin(
        &self,
        name: &str,
    ) -> Result<Option<ClusterAdmin>, tokio_postgres::Error> {
        let name = name.to_owned();
        let row = self
            .with(move |c| {
                Box::pin(async move {
                    c.query_opt(
                        "SELECT name, host, port, admin_user, admin_password_enc FROM pgweir.clusters WHERE name = $1",
                        &[&name],
                    )
                    .await
                })
            })
            .await?;
        Ok(row.map(|r| {
            let name: String = r.get(0);
            let sealed: Option<Vec<u8>> = r.get(4);
            let port: i32 = r.get(2);
            ClusterAdmin {
                password: sealed.and_then(|s| self.key.open(&format!("cluster:{name}"), &s).ok()),
                host: r.get(1),
                port: u16::try_from(port).unwrap_or(5432),
                user: r.get(3),
                name,
            }
        }))
    }

    /// The cluster for a new tenant: `wanted` if it exists and is not draining, else the one with the most free
    /// capacity. None when there is no such cluster.
    pub async fn place(
        &self,
        wanted: Option<&str>,
    ) -> Result<Option<String>, tokio_postgres::Error> {
        let wanted = wanted.map(str::to_owned);
        self.with(move |c| {
            Box::pin(async move {
                let row = c
                    .query_opt(
                        "SELECT c.name FROM pgweir.clusters c
                          WHERE NOT c.draining AND ($1::text IS NULL OR c.name = $1)
                          ORDER BY c.capacity - (SELECT count(*) FROM pgweir.tenants t WHERE t.cluster = c.name) DESC,
                                   c.name
                          LIMIT 1",
                        &[&wanted],
                    )
                    .await?;
                Ok(row.map(|r| r.get(0)))
            })
        })
        .await
    }

    /// This month's (UTC) query counts of `tenants`, summed over every instance's flushed usage, and the month as
    /// `YYYYMM`.
    pub async fn month_queries(
        &self,
        tenants: Vec<String>,
    ) -> Result<(u32, Vec<(String, i64)>), tokio_postgres::Error> {
        let rows = self
            .rows(
                "SELECT to_char(now() AT TIME ZONE 'utc', 'YYYYMM')::int, t.id,
                        (SELECT coalesce(sum(u.queries), 0)::bigint FROM pgweir.usage u
                          WHERE u.tenant = t.id
                            AND u.period >= date_trunc('month', now() AT TIME ZONE 'utc') AT TIME ZONE 'utc')
                   FROM unnest($1::text[]) AS t(id)"
                    .into(),
                vec![param(tenants)],
            )
            .await?;
        let month = rows.first().map_or(0, |r| r.get::<_, i32>(0) as u32);
        Ok((month, rows.iter().map(|r| (r.get(1), r.get(2))).collect()))
    }

    /// Switches a tenant's read-only mode (every instance follows through the tenant trigger).
    pub async fn set_read_only(&self, id: &str, on: bool) -> Result<bool, tokio_postgres::Error> {
        let rows = self
            .rows(
                "UPDATE pgweir.tenants SET read_only = $2, updated_at = now() WHERE id = $1 RETURNING id".into(),
                vec![param(id.to_owned()), param(on)],
            )
            .await?;
        Ok(!rows.is_empty())
    }

    /// Every plan with its data-plane spec.
    pub async fn plans(&self) -> Result<Vec<PlanRow>, tokio_postgres::Error> {
        let rows = self
            .rows(
                "SELECT name, max_connections, pool_size, max_branches, spec FROM pgweir.plans ORDER BY name"
                    .into(),
                Vec::new(),
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| PlanRow {
                name: r.get(0),
                max_connections: r.get(1),
                pool_size: r.get(2),
                max_branches: r.get(3),
                spec: r.get(4),
            })
            .collect())
    }

    /// Creates or replaces a plan (every instance reloads its tenants: a trigger announces it).
    pub async fn put_plan(&self, p: PlanRow) -> Result<(), tokio_postgres::Error> {
        self.rows(
            "INSERT INTO pgweir.plans (name, max_connections, pool_size, max_branches, spec)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (name) DO UPDATE SET max_connections = $2, pool_size = $3, max_branches = $4, spec = $5"
                .into(),
            vec![
                param(p.name),
                param(p.max_connections),
                param(p.pool_size),
                param(p.max_branches),
                param(p.spec),
            ],
        )
        .await
        .map(|_| ())
    }

    pub async fn plan(&self, name: &str) -> Result<Option<Plan>, tokio_postgres::Error> {
        let name = name.to_owned();
        self.with(move |c| {
            Box::pin(async move {
                let row = c
                    .query_opt(
                        "SELECT name, max_connections, max_branches FROM pgweir.plans WHERE name = $1",
                        &[&name],
                    )
                    .await?;
                Ok(row.map(|r| Plan {
                    name: r.get(0),
                    max_connections: r.get(1),
                    max_branches: r.get(2),
                }))
            })
        })
        .await
    }

    pub async fn tenant(&self, id: &str) -> Result<Option<TenantRow>, tokio_postgres::Error> {
        let id = id.to_owned();
        self.with(move |c| {
            Box::pin(async move {
                let row = c
                    .query_opt(
                        &format!("SELECT {TENANT_COLUMNS} FROM pgweir.tenants WHERE id = $1"),
                        &[&id],
                    )
                    .await?;
                Ok(row.as_ref().map(tenant_row))
            })
        })
        .await
    }

    /// Tenants after `after` (by id), at most `limit`.
    pub async fn tenants(
        &self,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<TenantRow>, tokio_postgres::Error> {
        let after = after.map(str::to_owned);
        self.with(move |c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        &format!(
                            "SELECT {TENANT_COLUMNS} FROM pgweir.tenants WHERE $1::text IS NULL OR id > $1 \
                             ORDER BY id LIMIT $2"
                        ),
                        &[&after, &limit],
                    )
                    .await?;
                Ok(rows.iter().map(tenant_row).collect())
            })
        })
        .await
    }

    /// Records a new tenant in state `provisioning` with its first user; false when the id is taken.
    #[allow(clippy::too_many_arguments)]
    pub async fn insert_tenant(
        &self,
        id: &str,
        cluster: &str,
        plan: &str,
        database: &str,
        backend: (&str, &str),
        backend_password: &str,
        spec: &Value,
        user: (&str, &str, &str),
    ) -> Result<bool, tokio_postgres::Error> {
        let sealed = self.key.seal(&format!("tenant:{id}"), backend_password);
        let owner_sealed = self.key.seal(&format!("owner:{id}"), user.2);
        let (id, cluster, plan, database) = (
            id.to_owned(),
            cluster.to_owned(),
            plan.to_owned(),
            database.to_owned(),
        );
        let (bdb, brole) = (backend.0.to_owned(), backend.1.to_owned());
        let (uname, uscram) = (user.0.to_owned(), user.1.to_owned());
        let spec = spec.clone();
        self.with(move |c| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                let n = tx
                    .execute(
                        "INSERT INTO pgweir.tenants (id, state, cluster, plan, database, backend_database, backend_role,
                             backend_password_enc, spec, owner_password_enc)
                         VALUES ($1, 'provisioning', $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (id) DO NOTHING",
                        &[&id, &cluster, &plan, &database, &bdb, &brole, &sealed, &spec, &owner_sealed],
                    )
                    .await?;
                if n == 0 {
                    return Ok(false);
                }
                tx.execute(
                    "INSERT INTO pgweir.tenant_users (tenant, name, scram) VALUES ($1, $2, $3)",
                    &[&id, &uname, &uscram],
                )
                .await?;
                tx.commit().await?;
                Ok(true)
            })
        })
        .await
    }

    /// The generated password of the tenant's first user, once: it is forgotten as it is returned.
    pub async fn take_owner_password(
        &self,
        id: &str,
    ) -> Result<Option<String>, tokio_postgres::Error> {
        let id_owned = id.to_owned();
        let sealed: Option<Vec<u8>> = self
            .with(move |c| {
                Box::pin(async move {
                    let row = c
                        .query_opt(
                            "UPDATE pgweir.tenants t SET owner_password_enc = NULL
                               FROM (SELECT owner_password_enc AS old FROM pgweir.tenants WHERE id = $1 FOR UPDATE) o
                              WHERE t.id = $1 RETURNING o.old",
                            &[&id_owned],
                        )
                        .await?;
                    Ok(row.and_then(|r| r.get(0)))
                })
            })
            .await?;
        Ok(sealed.and_then(|s| self.key.open(&format!("owner:{id}"), &s).ok()))
    }

    /// Changes a tenant's plan.
    pub async fn set_plan(&self, id: &str, plan: &str) -> Result<(), tokio_postgres::Error> {
        let (id, plan) = (id.to_owned(), plan.to_owned());
        self.with(move |c| {
            Box::pin(async move {
                c.execute(
                    "UPDATE pgweir.tenants SET plan = $2, updated_at = now() WHERE id = $1",
                    &[&id, &plan],
                )
                .await
                .map(|_| ())
            })
        })
        .await
    }

    /// Moves a tenant to `state` (with the failure reason for `failed`).
    pub async fn set_state(
        &self,
        id: &str,
        state: &str,
        failure: Option<&str>,
    ) -> Result<(), tokio_postgres::Error> {
        let (id, state, failure) = (id.to_owned(), state.to_owned(), failure.map(str::to_owned));
        self.with(move |c| {
            Box::pin(async move {
                // Provisioning outcomes only land on a tenant still being provisioned: a concurrent delete
                // (`deleting`) or an earlier success (`ready`) is never overwritten by a late `failed`.
                let from: &[&str] = match state.as_str() {
                    "ready" | "failed" => &["provisioning", "failed"],
                    _ => &["provisioning", "failed", "ready", "paused", "deleting"],
                };
                let from: Vec<String> = from.iter().map(|s| s.to_string()).collect();
                c.execute(
                    "UPDATE pgweir.tenants SET state = $2, failure = $3, updated_at = now()
                      WHERE id = $1 AND state = ANY($4)",
                    &[&id, &state, &failure, &from],
                )
                .await
                .map(|_| ())
            })
        })
        .await
    }

    /// Physical databases of the tenant: main and its branches.
    pub async fn tenant_databases(&self, id: &str) -> Result<Vec<String>, tokio_postgres::Error> {
        let id = id.to_owned();
        self.with(move |c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        "SELECT backend_database FROM pgweir.tenants WHERE id = $1
                         UNION ALL SELECT backend_database FROM pgweir.branches WHERE tenant = $1",
                        &[&id],
                    )
                    .await?;
                Ok(rows.iter().map(|r| r.get(0)).collect())
            })
        })
        .await
    }

    /// Adds usage counters of `instance` to the current minute of each tenant, as the instance's flush number
    /// `seq`: a flush already recorded under that number (a retry after a lost commit answer) adds nothing.
    pub async fn add_usage(
        &self,
        instance: &str,
        seq: u64,
        rows: &[(String, UsageDelta)],
    ) -> Result<(), tokio_postgres::Error> {
        let instance = instance.to_owned();
        let rows = rows.to_vec();
        let seq = i64::try_from(seq).unwrap_or(i64::MAX);
        self.with(move |c| {
            Box::pin(async move {
                let tx = c.transaction().await?;
                let fresh = tx
                    .execute(
                        "INSERT INTO pgweir.usage_flushes (instance, seq) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                        &[&instance, &seq],
                    )
                    .await?;
                if fresh == 0 {
                    return tx.commit().await;
                }
                // Only the latest number of an instance matters (flushes of one instance run one at a time).
                tx.execute(
                    "DELETE FROM pgweir.usage_flushes WHERE instance = $1 AND seq < $2",
                    &[&instance, &seq],
                )
                .await?;
                let stmt = tx
                    .prepare(
                        "INSERT INTO pgweir.usage AS u (tenant, instance, period, connections, queries, transactions,
                             bytes_in, bytes_out)
                         VALUES ($1, $2, date_trunc('minute', now()), $3, $4, $5, $6, $7)
                         ON CONFLICT (tenant, instance, period) DO UPDATE SET
                             connections = u.connections + EXCLUDED.connections,
                             queries = u.queries + EXCLUDED.queries,
                             transactions = u.transactions + EXCLUDED.transactions,
                             bytes_in = u.bytes_in + EXCLUDED.bytes_in,
                             bytes_out = u.bytes_out + EXCLUDED.bytes_out",
                    )
                    .await?;
                for (tenant, d) in &rows {
                    let v = |x: u64| i64::try_from(x).unwrap_or(i64::MAX);
                    tx.execute(
                        &stmt,
                        &[
                            tenant,
                            &instance,
                            &v(d.connections),
                            &v(d.requests),
                            &v(d.transactions),
                            &v(d.bytes_in),
                            &v(d.bytes_out),
                        ],
                    )
                    .await?;
                }
                tx.commit().await
            })
        })
        .await
    }

    /// A tenant's recorded usage (every instance) since `since` (RFC 3339; None: all).
    pub async fn usage(
        &self,
        tenant: &str,
        since: Option<&str>,
    ) -> Result<UsageDelta, tokio_postgres::Error> {
        let (tenant, since) = (tenant.to_owned(), since.map(str::to_owned));
        self.with(move |c| {
            Box::pin(async move {
                let r = c
                    .query_one(
                        "SELECT COALESCE(sum(connections), 0)::bigint, COALESCE(sum(queries), 0)::bigint,
                                COALESCE(sum(transactions), 0)::bigint, COALESCE(sum(bytes_in), 0)::bigint,
                                COALESCE(sum(bytes_out), 0)::bigint
                           FROM pgweir.usage
                          WHERE tenant = $1 AND ($2::text IS NULL OR period >= date_trunc('minute', $2::timestamptz))",
                        &[&tenant, &since],
                    )
                    .await?;
                let u = |i: usize| u64::try_from(r.get::<_, i64>(i)).unwrap_or(0);
                Ok(UsageDelta {
                    connections: u(0),
                    requests: u(1),
                    transactions: u(2),
                    bytes_in: u(3),
                    bytes_out: u(4),
                })
            })
        })
        .await
    }

    /// Sets (creates or replaces) a user's SCRAM verifier; true when the user is new.
    pub async fn put_user(
        &self,
        tenant: &str,
        name: &str,
        scram: &str,
    ) -> Result<bool, tokio_postgres::Error> {
        let (tenant, name, scram) = (tenant.to_owned(), name.to_owned(), scram.to_owned());
        self.with(move |c| {
            Box::pin(async move {
                let row = c
                    .query_one(
                        "INSERT INTO pgweir.tenant_users (tenant, name, scram) VALUES ($1, $2, $3)
                         ON CONFLICT (tenant, name) DO UPDATE SET scram = $3
                         RETURNING (xmax = 0)",
                        &[&tenant, &name, &scram],
                    )
                    .await?;
                Ok(row.get(0))
            })
        })
        .await
    }

    /// Removes a user; false when there was none.
    pub async fn delete_user(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<bool, tokio_postgres::Error> {
        let (tenant, name) = (tenant.to_owned(), name.to_owned());
        self.with(move |c| {
            Box::pin(async move {
                c.execute(
                    "DELETE FROM pgweir.tenant_users WHERE tenant = $1 AND name = $2",
                    &[&tenant, &name],
                )
                .await
                .map(|n| n > 0)
            })
        })
        .await
    }

    /// A tenant's users: (name, created_at).
    pub async fn users(
        &self,
        tenant: &str,
    ) -> Result<Vec<(String, String)>, tokio_postgres::Error> {
        let tenant = tenant.to_owned();
        self.with(move |c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        "SELECT name, to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
                           FROM pgweir.tenant_users WHERE tenant = $1 ORDER BY name",
                        &[&tenant],
                    )
                    .await?;
                Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
            })
        })
        .await
    }

    pub async fn delete_tenant_row(&self, id: &str) -> Result<(), tokio_postgres::Error> {
        let id = id.to_owned();
        self.with(move |c| {
            Box::pin(async move {
                c.execute("DELETE FROM pgweir.tenants WHERE id = $1", &[&id])
                    .await
                    .map(|_| ())
            })
        })
        .await
    }

    /// Stores a token (by hash) under `name`, replacing an earlier one of that name — but with `revive` false, a
    /// revoked token of that name and value stays revoked.
    pub async fn put_token(
        &self,
        name: &str,
        token: &str,
        scope: &str,
        revive: bool,
    ) -> Result<(), tokio_postgres::Error> {
        let hash = token_hash(token).to_vec();
        let (name, scope) = (name.to_owned(), scope.to_owned());
        self.with(move |c| {
            Box::pin(async move {
                c.execute(
                    "INSERT INTO pgweir.api_tokens AS t (name, hash, scope) VALUES ($1, $2, $3)
                     ON CONFLICT (name) DO UPDATE SET hash = $2, scope = $3, revoked_at = NULL
                     WHERE $4 OR t.revoked_at IS NULL OR t.hash <> $2",
                    &[&name, &hash, &scope, &revive],
                )
                .await
                .map(|_| ())
            })
        })
        .await
    }

    /// Revokes the token `name`; false when there is no such (unrevoked) token.
    pub async fn revoke_token(&self, name: &str) -> Result<bool, tokio_postgres::Error> {
        let name = name.to_owned();
        self.with(move |c| {
            Box::pin(async move {
                c.execute(
                    "UPDATE pgweir.api_tokens SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL",
                    &[&name],
                )
                .await
                .map(|n| n > 0)
            })
        })
        .await
    }

    /// Every token not revoked.
    pub async fn tokens(&self) -> Result<Vec<TokenInfo>, tokio_postgres::Error> {
        self.with(|c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        "SELECT name, scope, hash FROM pgweir.api_tokens WHERE revoked_at IS NULL",
                        &[],
                    )
                    .await?;
                Ok(rows
                    .iter()
                    .filter_map(|r| {
                        let hash: Vec<u8> = r.get(2);
                        Some(TokenInfo {
                            name: r.get(0),
                            scope: r.get(1),
                            hash: hash.try_into().ok()?,
                        })
                    })
                    .collect())
            })
        })
        .await
    }

    /// Writes an audit record; a failure to write is logged, never hidden.
    pub async fn audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        result: &str,
        detail: Value,
    ) {
        let (actor, action, target, result) = (
            actor.to_owned(),
            action.to_owned(),
            target.to_owned(),
            result.to_owned(),
        );
        let r = self
            .with(move |c| {
                Box::pin(async move {
                    c.execute(
                        "INSERT INTO pgweir.audit_log (actor, action, target, result, detail) VALUES ($1, $2, $3, $4, $5)",
                        &[&actor, &action, &target, &result, &detail],
                    )
                    .await
                    .map(|_| ())
                })
            })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "could not write the audit log");
        }
    }
}
