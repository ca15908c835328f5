-- pgweir catalog, version 6: the seeded plans follow the product's tiers; clusters get max_active_transactions.
--   free: 1 database (no branches), 100 MB, small connection and rate limits;
--   pro: 10 databases (the main one and 9 branches), 10 GB;
--   team: unlimited databases (branches), 100 GB;
--   enterprise: custom (no limits until an operator sets them).
-- Only values still as an earlier migration seeded them change; keys an operator set in a spec are kept (the
-- defaults are merged under the existing spec). The columns queries_per_second and storage_bytes of version 1
-- were never read (the spec holds those limits) and go.

UPDATE pgweir.plans SET max_branches = 0 WHERE name = 'free' AND max_branches = 3;
UPDATE pgweir.plans SET max_branches = 9 WHERE name = 'pro' AND max_branches = 20;
UPDATE pgweir.plans SET max_branches = 2147483647 WHERE name = 'team' AND max_branches = 100;
UPDATE pgweir.plans SET max_branches = 2147483647 WHERE name = 'enterprise' AND max_branches = 1000;

UPDATE pgweir.plans
   SET spec = '{"max_transactions": 5, "storage_bytes": 104857600, "monthly_queries": 10000000}'::jsonb || spec
 WHERE name = 'free';
UPDATE pgweir.plans
   SET spec = '{"max_transactions": 20, "weight": 2, "storage_bytes": 10737418240}'::jsonb || spec
 WHERE name = 'pro';
UPDATE pgweir.plans
   SET spec = '{"max_transactions": 50, "weight": 4, "storage_bytes": 107374182400}'::jsonb || spec
 WHERE name = 'team';
UPDATE pgweir.plans SET spec = '{"weight": 8}'::jsonb || spec WHERE name = 'enterprise';

ALTER TABLE pgweir.plans DROP COLUMN queries_per_second, DROP COLUMN storage_bytes;

-- A cluster's cap on active transactions over all its tenants (0: none); when it is reached, tenants share it by
-- their plans' weights. Cluster changes reach every instance like plan changes do.
ALTER TABLE pgweir.clusters
    ADD COLUMN max_active_transactions integer NOT NULL DEFAULT 0 CHECK (max_active_transactions >= 0);
CREATE TRIGGER announce AFTER INSERT OR UPDATE OR DELETE ON pgweir.clusters
    FOR EACH STATEMENT EXECUTE FUNCTION pgweir.announce_plan_change();
