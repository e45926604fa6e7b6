-- ciflow demo: Dynamics 365 Customer Insights data in PostgreSQL.
-- tests/demo.py runs this with psql --echo-all and passes the emulator's
-- address and credentials as psql variables (:'base_url', :'client_secret', ...).
\set ON_ERROR_STOP on
\pset null '(null)'

-- ======================================================================
-- 1. Install the extension and connect it to a Customer Insights instance
-- ======================================================================
CREATE EXTENSION ciflow;
SELECT ciflow.create_connection('contoso',
    base_url         => :'base_url',
    instance_id      => :'instance_id',
    token_url        => :'token_url',
    client_id        => :'client_id',
    client_secret    => :'client_secret',
    scope            => :'scope',
    subscription_key => :'subscription_key',
    page_size        => 100);

-- Every setting is visible, but the secrets only as "is it set?".
SELECT name, flavor, page_size, max_calls, per_interval,
       has_client_secret, has_subscription_key
  FROM ciflow.connections;

-- ======================================================================
-- 2. What does the instance hold? (one call to the service)
-- ======================================================================
SELECT qualified_name, entity_type, data_source,
       jsonb_array_length(attributes) AS attributes, refreshed_at
  FROM ciflow.get_entities('contoso')
 ORDER BY entity_type, qualified_name;

-- ======================================================================
-- 3. A few rows straight from the service: one page, one call
-- ======================================================================
SELECT item->>'CustomerId'               AS customer_id,
       item->>'FullName'                 AS full_name,
       item->>'City'                     AS city,
       (item->>'LifetimeValue')::numeric AS lifetime_value
  FROM ciflow.get_items('contoso', 'Customer',
                        fields  => 'CustomerId,FullName,City,LifetimeValue',
                        orderby => 'LifetimeValue desc',
                        top     => 5) AS item;

-- ======================================================================
-- 4. One customer by key, and NULL for a key that does not exist
-- ======================================================================
SELECT item->>'CustomerId' AS some_id
  FROM ciflow.get_items('contoso', 'Customer', top => 1, skip => 41) AS item \gset
SELECT jsonb_pretty(ciflow.get_item('contoso', 'Customer', :'some_id')) AS customer;
SELECT ciflow.get_item('contoso', 'Customer', 'no-such-customer') IS NULL AS absent;

-- ======================================================================
-- 5. Sync whole entities into typed tables (all pages, all or nothing)
-- ======================================================================
SELECT id, entity, target, status, pages, rows, api_calls
  FROM ciflow.sync('contoso', 'Customer');
SELECT id, entity, target, status, pages, rows, api_calls
  FROM ciflow.sync('contoso', 'RetailPos_Transactions');
SELECT id, entity, target, status, pages, rows, api_calls
  FROM ciflow.sync('contoso', 'UnifiedActivity');

-- Typed columns, snake_case names, the original names as comments, the key as primary key.
\d+ contoso.customer

-- A re-sync applies only the difference, as ordinary row changes: nothing changed upstream,
-- so nothing is written.
SELECT id, entity, status, rows, inserted, updated, deleted
  FROM ciflow.sync('contoso', 'Customer');

-- Using a connection is a privilege of its own: an analyst role may read runs and use
-- 'contoso' once its owner grants it.
CREATE ROLE analyst;
GRANT SELECT ON ciflow.connections TO analyst;
SET ROLE analyst;
SELECT count(*) AS connections_analyst_sees FROM ciflow.connections;
RESET ROLE;
SELECT ciflow.grant_connection('contoso', 'analyst');
SET ROLE analyst;
SELECT name, owner, has_client_secret FROM ciflow.connections;
RESET ROLE;

-- ======================================================================
-- 6. Plain SQL over the synced data
-- ======================================================================
-- Top cities by lifetime value.
SELECT city, count(*) AS customers, sum(lifetime_value) AS lifetime_value,
       round(avg(churn_score)::numeric, 3) AS avg_churn
  FROM contoso.customer
 GROUP BY city
 ORDER BY lifetime_value DESC NULLS LAST
 LIMIT 5;

-- Point-of-sale revenue per store and currency, returns excluded.
SELECT store_id, currency, count(*) AS transactions, sum(amount) AS revenue
  FROM contoso.retail_pos_transactions
 WHERE NOT is_return
 GROUP BY store_id, currency
 ORDER BY revenue DESC
 LIMIT 5;

-- Int64 keys above 2^53 arrive exactly (no rounding through a double).
SELECT transaction_id, amount, transaction_time
  FROM contoso.retail_pos_transactions
 ORDER BY transaction_id DESC
 LIMIT 2;

-- Best customers by unified activity, joining two synced entities.
SELECT c.full_name, c.city, count(*) AS activities, sum(a.amount) AS spent
  FROM contoso.unified_activity a
  JOIN contoso.customer c USING (customer_id)
 GROUP BY c.full_name, c.city
 ORDER BY spent DESC NULLS LAST
 LIMIT 5;

-- ======================================================================
-- 7. Every run is recorded
-- ======================================================================
SELECT id, connection, entity, target, mode, status, pages, rows, inserted, updated, deleted,
       api_calls, http_status, error
  FROM ciflow.sync_runs
 ORDER BY id;
