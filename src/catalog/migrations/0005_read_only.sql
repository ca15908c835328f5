-- pgweir catalog, version 5: an operator's read-only switch per tenant (writes and DDL get 25006), and an index for
-- the monthly query quota's sums.

ALTER TABLE pgweir.tenants ADD COLUMN read_only boolean NOT NULL DEFAULT false;
CREATE INDEX usage_tenant_period ON pgweir.usage (tenant, period);
