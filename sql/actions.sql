--
-- Actions and syncs against the emulator (tests/ciemu.py, default instance).
-- The harness exports the emulator's URLs; psql reads them with \getenv.
--
CREATE EXTENSION ciflow;
\getenv emu_url CIFLOW_EMULATOR_URL
\getenv token_url CIFLOW_EMULATOR_TOKEN_URL
SELECT ciflow.create_connection('emu',
    base_url         => :'emu_url',
    instance_id      => '8b0c9c54-0000-0000-0000-000000000001',
    token_url        => :'token_url',
    client_id        => 'ciflow-client',
    client_secret    => 'ciflow-secret-value',
    subscription_key => 'key-primary-0001');

-- get_entities: one call, one row per entity.
SELECT name, qualified_name, entity_type, data_source,
       jsonb_array_length(attributes) AS attributes, keys
  FROM ciflow.get_entities('emu') ORDER BY qualified_name;

-- get_items: exactly one page, the service's default size without top.
SELECT count(*) FROM ciflow.get_items('emu', 'Customer');
SELECT item->>'CustomerId' AS id, item->>'FullName' AS full_name
  FROM ciflow.get_items('emu', 'Customer', top => 3, skip => 10) AS item;
SELECT item
  FROM ciflow.get_items('emu', 'Customer', fields => 'CustomerId,LoyaltyPoints',
                        orderby => 'LoyaltyPoints desc', top => 2) AS item;
SELECT count(*) AS matches
  FROM ciflow.get_items('emu', 'Customer', filter => 'LoyaltyPoints ge 0 and IsActive eq true',
                        top => 100);
SELECT count(*) AS quoted_filter_matches
  FROM ciflow.get_items('emu', 'Customer', filter => 'City eq ''O''''Brien & Sons+Co''');

-- get_item: the row, or NULL.
SELECT item->>'CustomerId' AS first_id FROM ciflow.get_items('emu', 'Customer', top => 1) AS item \gset
SELECT ciflow.get_item('emu', 'Customer', :'first_id')->>'CustomerId' = :'first_id' AS found;
SELECT ciflow.get_item('emu', 'Customer', 'no-such-customer') IS NULL AS absent;
SELECT ciflow.get_item('emu', 'Customer', 'it''s') IS NULL AS quote_is_escaped;

-- sync: all pages into a typed table named after the connection and entity.
SELECT connection, entity, target, mode, status, pages, rows, http_status, error
  FROM ciflow.sync('emu', 'Customer');
SELECT count(*), count(DISTINCT customer_id) FROM emu.customer;
\d emu.customer
SELECT attname, col_description(attrelid, attnum) AS original_name
  FROM pg_attribute
 WHERE attrelid = 'emu.customer'::regclass AND attnum > 0 AND NOT attisdropped
 ORDER BY attnum;

-- A re-sync swaps the contents in: same table, views and grants survive.
CREATE VIEW emu.active_customers AS SELECT customer_id FROM emu.customer WHERE is_active;
SELECT 'emu.customer'::regclass::oid AS oid_before \gset
SELECT status, rows FROM ciflow.sync('emu', 'Customer');
SELECT 'emu.customer'::regclass::oid = :oid_before AS same_table,
       (SELECT count(*) FROM emu.active_customers) > 0 AS view_works;

-- Any target, qualified or not.
SELECT target, status, rows FROM ciflow.sync('emu', 'RetailPos_Transactions', target => 'public.pos');
SELECT count(*) FROM public.pos;
SELECT target, status FROM ciflow.sync('emu', 'RetailPos_Transactions', target => 'pos_again');
SELECT count(*) FROM pos_again;

SELECT entity, target, status, pages > 0 AS paged, rows, api_calls > pages AS counted_calls
  FROM ciflow.sync_runs ORDER BY id;
SELECT count(*) AS still_running FROM ciflow.sync_progress;

DROP TABLE public.pos, pos_again;
DROP SCHEMA emu CASCADE;
DROP EXTENSION ciflow;
