--
-- Bad input: every error has a SQLSTATE and a message naming the connection
-- and entity; nothing is half-written.  Needs the emulator.
--
CREATE EXTENSION ciflow;
\getenv emu_url CIFLOW_EMULATOR_URL
\getenv token_url CIFLOW_EMULATOR_TOKEN_URL
SELECT ciflow.create_connection('emu', base_url => :'emu_url',
    instance_id => '8b0c9c54-0000-0000-0000-000000000001', token_url => :'token_url',
    client_id => 'ciflow-client', client_secret => 'ciflow-secret-value',
    subscription_key => 'key-primary-0001');
SELECT ciflow.create_connection('badkey', base_url => :'emu_url',
    instance_id => '8b0c9c54-0000-0000-0000-000000000001', token_url => :'token_url',
    client_id => 'ciflow-client', client_secret => 'ciflow-secret-value',
    subscription_key => 'not-the-key');
SELECT ciflow.create_connection('badsecret', base_url => :'emu_url',
    instance_id => '8b0c9c54-0000-0000-0000-000000000001', token_url => :'token_url',
    client_id => 'ciflow-client', client_secret => 'wrong-secret',
    subscription_key => 'key-primary-0001');
-- Nothing listens on port 1.
SELECT ciflow.create_connection('down', base_url => 'http://127.0.0.1:1/v1',
    instance_id => 'x', bearer_token => 't', subscription_key => 'k');
SET ciflow.max_attempts = 1;

-- Unknown connections.
SELECT * FROM ciflow.get_entities('nosuch');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT * FROM ciflow.get_items('nosuch', 'Customer');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT ciflow.get_item('nosuch', 'Customer', '1');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT * FROM ciflow.sync('nosuch', 'Customer');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- Bad names and arguments.
SELECT * FROM ciflow.get_items('No Such', 'Customer');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT * FROM ciflow.get_items('emu', NULL);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT * FROM ciflow.get_items('emu', 'Customer', top => -1);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT * FROM ciflow.sync('emu', '');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT * FROM ciflow.sync('emu', 'Customer', target => 'a.b.c.d');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT * FROM ciflow.sync('emu', 'Customer', target => '"unterminated');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT * FROM ciflow.sync('emu', 'Customer', mode => 'partial');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- The service says no.
SELECT * FROM ciflow.get_items('emu', 'NoSuchEntity');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT * FROM ciflow.get_items('emu', 'Customer', filter => 'Nope eq');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT * FROM ciflow.get_items('badkey', 'Customer');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT * FROM ciflow.get_items('badsecret', 'Customer');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- The transport detail names timings, so only the message is shown.
\set VERBOSITY terse
SELECT * FROM ciflow.get_items('down', 'Customer');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
\set VERBOSITY default

-- A failed sync is recorded, and creates no table.
SELECT * FROM ciflow.sync('emu', 'NoSuchEntity');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT count(*) AS no_tables FROM pg_tables WHERE schemaname = 'emu';
-- A bad mode or publish method is refused before any run.
SELECT * FROM ciflow.sync('emu', 'Customer', mode => 'sometimes');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT * FROM ciflow.sync('emu', 'Customer', publish => 'teleport');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- An incremental run of a target that does not exist yet is a full pull, with a NOTICE.
SELECT mode, status, rows, inserted, updated, deleted
  FROM ciflow.sync('emu', 'Customer', mode => 'incremental');
SELECT id, entity, target, status, http_status, error FROM ciflow.sync_runs ORDER BY id;

-- The worker cannot see uncommitted work, so a sync refuses to run after it.
BEGIN;
CREATE TABLE scratch (x int);
SELECT * FROM ciflow.sync('emu', 'Customer');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
ROLLBACK;

DROP EXTENSION ciflow;
