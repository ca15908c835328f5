//! Creating and deleting tenants: the one code path the admin API and `pgweir dev` share.
//!
//! Creation is crash-safe: the tenant is recorded as `provisioning` first, then its role and database are created
//! on the cluster with repeatable statements, then it becomes `ready` (or `failed`, with the reason). The same
//! request again finishes whatever an earlier attempt left, and a different request for the same id is a conflict.

use serde_json::Value;

use super::control::Control;
use super::provision;
use super::store::TenantRow;
use crate::auth::scram::ScramVerifier;

/// What a new tenant is made of (defaults filled in).
#[derive(Debug, Clone)]
pub struct NewTenant {
    pub plan: String,
    /// None: the cluster with the most free capacity.
    pub cluster: Option<String>,
    /// The logical database name clients use.
    pub database: String,
    /// The first user.
    pub user: String,
    /// Its password; None: generated (and shown once).
    pub password: Option<String>,
}

#[derive(Debug)]
pub enum Created {
    /// Created (or completed) now; `password` is the first user's, when it was generated and not shown before.
    Ready {
        tenant: TenantRow,
        password: Option<String>,
        new: bool,
    },
    /// It existed already with this definition.
    Existing(TenantRow),
    /// Recorded, but provisioning on the cluster failed; the same request again retries.
    Failed { tenant: TenantRow, reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("invalid request")]
    Invalid(Vec<(String, String)>),
    #[error("{0}")]
    Conflict(String),
    #[error("no backend cluster takes new tenants: register one (PUT /v1/clusters/{{name}})")]
    NoCluster,
    #[error("catalog: {0}")]
    Catalog(String),
}

fn catalog_err(e: impl std::fmt::Display) -> CreateError {
    CreateError::Catalog(e.to_string())
}

/// 24 random letters and digits.
pub fn random_password() -> String {
    use rand::distributions::Alphanumeric;
    use rand::Rng;
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(24)
        .map(char::from)
        .collect()
}

/// Creates tenant `id` as `spec` (the request as given, which decides idempotency) describes it.
pub async fn create(
    control: &Control,
    actor: &str,
    id: &str,
    spec: &Value,
    req: &NewTenant,
) -> Result<Created, CreateError> {
    let _serialized = control.lock_tenant(id).await;
    let catalog = &control.catalog;
    let conflict = || {
        CreateError::Conflict(format!(
            "tenant \"{id}\" exists with a different definition"
        ))
    };
    // A tenant that is there already is answered before placement (its cluster may be draining by now).
    let existing = catalog.tenant(id).await.map_err(catalog_err)?;
    match &existing {
        Some(t) if t.spec != *spec => return Err(conflict()),
        Some(t) if t.state == "deleting" => {
            return Err(CreateError::Conflict(format!(
                "tenant \"{id}\" is being deleted"
            )))
        }
        Some(t) if t.state == "ready" || t.state == "paused" => {
            return Ok(Created::Existing(t.clone()))
        }
        _ => {}
    }
    let plan = catalog.plan(&req.plan).await.map_err(catalog_err)?;
    let cluster = match &existing {
        // A retry stays where the first attempt placed it.
        Some(t) => Some(t.cluster.clone()),
        None => catalog
            .place(req.cluster.as_deref())
            .await
            .map_err(catalog_err)?,
    };
    let mut problems = Vec::new();
    if plan.is_none() {
        problems.push(("plan".into(), format!("no plan \"{}\"", req.plan)));
    }
    if cluster.is_none() {
        if let Some(c) = &req.cluster {
            problems.push((
                "cluster".into(),
                format!("no cluster \"{c}\" that takes tenants"),
            ));
        }
    }
    if !problems.is_empty() {
        return Err(CreateError::Invalid(problems));
    }
    let (Some(plan), Some(cluster)) = (plan, cluster) else {
        return Err(CreateError::NoCluster);
    };

    let mut new = false;
    let tenant = match existing {
        Some(t) => t,
        None => {
            let (backend_db, backend_role) =
                (provision::new_database_name(), provision::new_role_name());
            let password = req.password.clone().unwrap_or_else(random_password);
            let scram = ScramVerifier::generate(&password, 4096).to_string();
            // A password the caller chose is not shown back.
            let shown = if req.password.is_some() {
                ""
            } else {
                &password
            };
            new = catalog
                .insert_tenant(
                    id,
                    &cluster,
                    &plan.name,
                    &req.database,
                    (&backend_db, &backend_role),
                    &random_password(),
                    spec,
                    (&req.user, &scram, shown),
                )
                .await
                .map_err(catalog_err)?;
            match catalog.tenant(id).await.map_err(catalog_err)? {
                Some(t) if t.spec == *spec => t,
                Some(_) => return Err(conflict()),
                None => {
                    return Err(CreateError::Catalog(
                        "the tenant vanished while it was created".into(),
                    ))
                }
            }
        }
    };
    let outcome = provision(control, &tenant, plan.max_connections).await;
    audit_outcome(catalog, actor, "tenant.create", id, &outcome, spec.clone()).await;
    match &outcome {
        Ok(()) => catalog.set_state(id, "ready", None).await,
        Err(e) => catalog.set_state(id, "failed", Some(e)).await,
    }
    .map_err(catalog_err)?;
    let tenant = catalog
        .tenant(id)
        .await
        .map_err(catalog_err)?
        .ok_or_else(|| {
            CreateError::Catalog("the tenant vanished while it was provisioned".into())
        })?;
    match outcome {
        Ok(()) => {
            let password = catalog
                .take_owner_password(id)
                .await
                .map_err(catalog_err)?
                .filter(|p| !p.is_empty());
            // Routable by this instance at once (the others follow the notification).
            if let Err(e) = control.directory.reload(id).await {
                tracing::warn!(tenant = %id, error = %e, "could not load the new tenant yet");
            }
            Ok(Created::Ready {
                tenant,
                password,
                new,
            })
        }
        Err(reason) => Ok(Created::Failed { tenant, reason }),
    }
}

/// Writes the audit record of an operation's outcome (`ok` or `failed: <why>`).
async fn audit_outcome<T>(
    catalog: &super::store::Catalog,
    actor: &str,
    action: &str,
    target: &str,
    outcome: &Result<T, String>,
    detail: Value,
) {
    let result = match outcome {
        Ok(_) => "ok".to_owned(),
        Err(e) => format!("failed: {e}"),
    };
    catalog.audit(actor, action, target, &result, detail).await;
}

/// A provisioning connection to `cluster`.
pub(crate) async fn cluster_client(
    control: &Control,
    cluster: &str,
) -> Result<tokio_postgres::Client, String> {
    let admin = control
        .catalog
        .cluster_admin(cluster)
        .await
        .map_err(|e| format!("catalog: {e}"))?
        .ok_or_else(|| format!("cluster \"{cluster}\" is not registered"))?;
    admin
        .connect()
        .await
        .map_err(|e| format!("cluster \"{cluster}\": {e}"))
}

/// Creates (or finishes) the tenant's role and database on its cluster.
async fn provision(control: &Control, t: &TenantRow, connection_limit: i32) -> Result<(), String> {
    let password = control
        .catalog
        .key
        .open(&format!("tenant:{}", t.id), &t.backend_password_enc)
        .map_err(|e| e.to_string())?;
    let client = cluster_client(control, &t.cluster).await?;
    provision::create_tenant(
        &client,
        &t.backend_database,
        &t.backend_role,
        &password,
        connection_limit,
    )
    .await
    .map_err(|e| format!("cluster \"{}\": {e}", t.cluster))
}

/// Why a plan change was not made.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("no tenant \"{0}\"")]
    NoTenant(String),
    #[error("no plan \"{0}\"")]
    NoPlan(String),
    #[error("{0}")]
    Failed(String),
}

/// Moves tenant `id` to `plan`: the owner role's connection limit first (so the cluster never allows more than
/// the catalog says), then the catalog; every instance's new logins use the plan's pool size.
pub async fn change_plan(
    control: &Control,
    actor: &str,
    id: &str,
    plan: &str,
) -> Result<TenantRow, ChangeError> {
    let _serialized = control.lock_tenant(id).await;
    let catalog = &control.catalog;
    let failed = |e: String| ChangeError::Failed(e);
    let tenant = match catalog
        .tenant(id)
        .await
        .map_err(|e| failed(format!("catalog: {e}")))?
    {
        Some(t) if t.state == "ready" || t.state == "paused" => t,
        _ => return Err(ChangeError::NoTenant(id.to_owned())),
    };
    let Some(p) = catalog
        .plan(plan)
        .await
        .map_err(|e| failed(format!("catalog: {e}")))?
    else {
        return Err(ChangeError::NoPlan(plan.to_owned()));
    };
    let outcome = async {
        let client = cluster_client(control, &tenant.cluster).await?;
        provision::set_connection_limit(&client, &tenant.backend_role, p.max_connections)
            .await
            .map_err(|e| format!("cluster \"{}\": {e}", tenant.cluster))?;
        catalog
            .set_plan(id, &p.name)
            .await
            .map_err(|e| format!("catalog: {e}"))
    }
    .await;
    audit_outcome(
        catalog,
        actor,
        "tenant.plan",
        id,
        &outcome,
        serde_json::json!({"plan": plan}),
    )
    .await;
    outcome.map_err(failed)?;
    if let Err(e) = control.directory.reload(id).await {
        tracing::warn!(tenant = %id, error = %e, "could not reload the tenant yet");
    }
    catalog
        .tenant(id)
        .await
        .map_err(|e| failed(format!("catalog: {e}")))?
        .ok_or_else(|| ChangeError::NoTenant(id.to_owned()))
}

/// Deletes tenant `id`: no new connections (state `deleting`, dropped from routing), then its databases (their
/// sessions ended) and role are dropped and its catalog rows removed. Ok(false) when there is no such tenant; an
/// error leaves it `deleting`, and deleting again retries.
pub async fn delete(control: &Control, actor: &str, id: &str) -> Result<bool, String> {
    let _serialized = control.lock_tenant(id).await;
    let catalog = &control.catalog;
    let Some(tenant) = catalog
        .tenant(id)
        .await
        .map_err(|e| format!("catalog: {e}"))?
    else {
        return Ok(false);
    };
    catalog
        .set_state(id, "deleting", None)
        .await
        .map_err(|e| format!("catalog: {e}"))?;
    if let Err(e) = control.directory.reload(id).await {
        tracing::warn!(tenant = %id, error = %e, "could not drop the tenant from the directory yet");
    }
    let outcome = async {
        let databases = catalog
            .tenant_databases(id)
            .await
            .map_err(|e| format!("catalog: {e}"))?;
        let client = cluster_client(control, &tenant.cluster).await?;
        provision::drop_tenant(&client, &databases, &tenant.backend_role)
            .await
            .map_err(|e| format!("cluster \"{}\": {e}", tenant.cluster))?;
        catalog
            .delete_tenant_row(id)
            .await
            .map_err(|e| format!("catalog: {e}"))
    }
    .await;
    audit_outcome(catalog, actor, "tenant.delete", id, &outcome, Value::Null).await;
    outcome.map(|()| true)
}
