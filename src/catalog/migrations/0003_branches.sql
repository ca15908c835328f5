-- pgweir catalog, version 3: branch states and expiry, and long operations (branch create/reset/delete) that can be
-- polled, are idempotent, survive a restart and run one at a time per tenant.
ALTER TABLE pgweir.branches
    ADD COLUMN state text NOT NULL DEFAULT 'ready'
        CHECK (state IN ('creating', 'ready', 'resetting', 'deleting')),
    ADD COLUMN expires_at timestamptz;

CREATE TABLE pgweir.operations (
    id           text PRIMARY KEY,
    tenant       text NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('branch.create', 'branch.reset', 'branch.delete')),
    branch       text NOT NULL,
    request      jsonb NOT NULL,
    status       text NOT NULL CHECK (status IN ('running', 'succeeded', 'failed')),
    error        text,
    result       jsonb,
    instance     text NOT NULL,
    -- Updated while the operation runs; a running operation whose heartbeat stopped was interrupted.
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    created_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);

-- At most one operation runs per tenant.
CREATE UNIQUE INDEX operations_one_running ON pgweir.operations (tenant) WHERE status = 'running';
