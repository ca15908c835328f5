-- pgweir catalog, version 4: plans carry the data plane's limits and SQL policy (`spec`, the JSON form of
-- `policy::Plan`: max_connections of clients, queries_per_second, burst, rate_wait, statement_timeout, policy).
-- The columns stay what provisioning uses (backend role connection limit, pool size, branch count).

ALTER TABLE pgweir.plans ADD COLUMN spec jsonb NOT NULL DEFAULT '{}'::jsonb;

INSERT INTO pgweir.plans (name, max_connections, pool_size, max_branches) VALUES
    ('team', 1000, 50, 100),
    ('enterprise', 5000, 100, 1000)
ON CONFLICT (name) DO NOTHING;

UPDATE pgweir.plans SET spec = '{"max_connections": 20, "queries_per_second": 100, "burst": 200,
    "statement_timeout": "60s", "policy": {"max_work_mem_kb": 65536, "max_timeout_ms": 60000}}'
 WHERE name = 'free' AND spec = '{}';
UPDATE pgweir.plans SET spec = '{"max_connections": 200, "queries_per_second": 2000, "burst": 4000,
    "policy": {"max_work_mem_kb": 262144}}'
 WHERE name = 'pro' AND spec = '{}';
UPDATE pgweir.plans SET spec = '{"max_connections": 1000}' WHERE name = 'team' AND spec = '{}';

-- A plan change reaches every instance: the payload '*' reloads all tenants.
CREATE FUNCTION pgweir.announce_plan_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('pgweir_tenants', '*');
    RETURN NULL;
END
$$;

CREATE TRIGGER announce AFTER INSERT OR UPDATE OR DELETE ON pgweir.plans
    FOR EACH STATEMENT EXECUTE FUNCTION pgweir.announce_plan_change();
