-- pgweir catalog, version 1: clusters, plans, tenants and their users, admin API tokens, the audit log and usage.
-- Applied by `catalog::migrate` in one transaction, under an advisory lock shared by every pgweir instance.

CREATE TABLE pgweir.clusters (
    name        text PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    host        text NOT NULL,
    port        integer NOT NULL CHECK (port BETWEEN 1 AND 65535),
    -- The superuser (or CREATEDB/CREATEROLE) login pgweir provisions with; its password is encrypted.
    admin_user  text NOT NULL,
    admin_password_enc bytea,
    tls         text NOT NULL DEFAULT 'disable' CHECK (tls IN ('disable', 'require', 'verify-full')),
    capacity    integer NOT NULL DEFAULT 100 CHECK (capacity > 0),
    draining    boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE pgweir.plans (
    name              text PRIMARY KEY,
    max_connections   integer NOT NULL CHECK (max_connections > 0),
    pool_size         integer NOT NULL CHECK (pool_size > 0),
    max_branches      integer NOT NULL DEFAULT 10 CHECK (max_branches >= 0),
    queries_per_second integer CHECK (queries_per_second > 0),
    storage_bytes     bigint CHECK (storage_bytes > 0)
);

INSERT INTO pgweir.plans (name, max_connections, pool_size, max_branches, queries_per_second, storage_bytes) VALUES
    ('free', 20, 5, 3, 100, 512 * 1024 * 1024),
    ('pro', 200, 20, 20, NULL, NULL);

CREATE TABLE pgweir.tenants (
    id          text PRIMARY KEY CHECK (id ~ '^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$' AND id NOT LIKE '%--%'),
    state       text NOT NULL CHECK (state IN ('provisioning', 'ready', 'failed', 'paused', 'deleting')),
    failure     text,
    cluster     text NOT NULL REFERENCES pgweir.clusters (name),
    plan        text NOT NULL REFERENCES pgweir.plans (name),
    -- The logical database name clients use.
    database    text NOT NULL,
    backend_database text NOT NULL,
    backend_role text NOT NULL,
    backend_password_enc bytea NOT NULL,
    -- The generated password of the first user, sealed, until a response has shown it once.
    owner_password_enc bytea,
    -- The request that created the tenant: the same request again is the same tenant, another one is a conflict.
    spec        jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE pgweir.tenant_users (
    tenant      text NOT NULL REFERENCES pgweir.tenants (id) ON DELETE CASCADE,
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 63),
    scram       text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, name)
);

CREATE TABLE pgweir.branches (
    tenant      text NOT NULL REFERENCES pgweir.tenants (id) ON DELETE CASCADE,
    name        text NOT NULL CHECK (name ~ '^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$' AND name NOT LIKE '%--%'),
    parent      text,
    backend_database text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, name)
);

CREATE TABLE pgweir.api_tokens (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    -- SHA-256 of the token; the token itself is shown once, when it is created.
    hash        bytea NOT NULL UNIQUE,
    scope       text NOT NULL CHECK (scope IN ('admin', 'read')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE TABLE pgweir.audit_log (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,
    action      text NOT NULL,
    target      text NOT NULL,
    result      text NOT NULL,
    detail      jsonb
);

CREATE TABLE pgweir.usage (
    tenant      text NOT NULL,
    instance    text NOT NULL,
    period      timestamptz NOT NULL,
    connections bigint NOT NULL DEFAULT 0,
    queries     bigint NOT NULL DEFAULT 0,
    transactions bigint NOT NULL DEFAULT 0,
    bytes_in    bigint NOT NULL DEFAULT 0,
    bytes_out   bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, instance, period)
);

-- Every change of a tenant, its users or branches is announced: each pgweir instance drops its cached copy.
CREATE FUNCTION pgweir.announce_tenant_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- TG_ARGV[0]: the column that holds the tenant id.
    PERFORM pg_notify('pgweir_tenants', to_jsonb(COALESCE(NEW, OLD)) ->> TG_ARGV[0]);
    RETURN NULL;
END
$$;

CREATE TRIGGER announce AFTER INSERT OR UPDATE OR DELETE ON pgweir.tenants
    FOR EACH ROW EXECUTE FUNCTION pgweir.announce_tenant_change('id');
CREATE TRIGGER announce AFTER INSERT OR UPDATE OR DELETE ON pgweir.tenant_users
    FOR EACH ROW EXECUTE FUNCTION pgweir.announce_tenant_change('tenant');
CREATE TRIGGER announce AFTER INSERT OR UPDATE OR DELETE ON pgweir.branches
    FOR EACH ROW EXECUTE FUNCTION pgweir.announce_tenant_change('tenant');
