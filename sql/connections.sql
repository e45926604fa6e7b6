--
-- Connections: create, alter, drop, the view, validation and privileges.
-- SQLSTATEs are printed after each expected error.
--
CREATE EXTENSION ciflow;
\set VERBOSITY default

SELECT ciflow.create_connection('contoso',
    base_url         => 'https://api.ci.ai.dynamics.com/v1/',
    instance_id      => '8b0c9c54-0000-0000-0000-000000000001',
    token_url        => 'https://login.microsoftonline.com/tenant/oauth2/v2.0/token',
    client_id        => 'app-id',
    client_secret    => 'not-a-real-secret',
    subscription_key => 'not-a-real-key');

-- Every setting but the secrets; the trailing slash is gone, scope defaulted.
SELECT name, base_url, instance_id, flavor, token_url, client_id, scope,
       max_calls, per_interval, page_size, ca_file,
       has_client_secret, has_subscription_key, has_bearer_token
  FROM ciflow.connections;

-- NULL leaves a setting alone; '' clears it.
SELECT ciflow.alter_connection('contoso', page_size => 500, max_calls => 50,
                               per_interval => '2 minutes');
SELECT ciflow.alter_connection('contoso', bearer_token => 'static-token');
SELECT name, page_size, max_calls, per_interval, has_bearer_token FROM ciflow.connections;
SELECT ciflow.alter_connection('contoso', bearer_token => '');
SELECT name, has_bearer_token FROM ciflow.connections;

-- Other flavours: dataverse needs no subscription key, odata no credentials.
SELECT ciflow.create_connection('dv', base_url => 'https://org.crm.dynamics.com/api/data/v9.2',
                                flavor => 'dataverse', bearer_token => 'x');
SELECT ciflow.create_connection('plain', base_url => 'http://127.0.0.1:9/odata', flavor => 'odata');
SELECT name, flavor, scope FROM ciflow.connections ORDER BY name;

-- Duplicates and unknown connections.
SELECT ciflow.create_connection('contoso', base_url => 'https://x.example/v1', flavor => 'odata');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT ciflow.alter_connection('nosuch', page_size => 10);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT ciflow.drop_connection('nosuch');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT ciflow.drop_connection('nosuch', if_exists => true);

-- Bad names.
SELECT ciflow.create_connection('Contoso', base_url => 'https://x.example/v1', flavor => 'odata');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT ciflow.create_connection('1st', base_url => 'https://x.example/v1', flavor => 'odata');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT ciflow.create_connection('a-b', base_url => 'https://x.example/v1', flavor => 'odata');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT ciflow.create_connection(repeat('a', 64), base_url => 'https://x.example/v1', flavor => 'odata');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT ciflow.create_connection(NULL, base_url => 'https://x.example/v1', flavor => 'odata');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- Bad URLs: only http and https, with a host, without user:password@.
SELECT ciflow.create_connection('bad', base_url => 'ftp://x.example/v1', flavor => 'odata');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT ciflow.create_connection('bad', base_url => 'not a url', flavor => 'odata');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT ciflow.create_connection('bad', base_url => 'https://', flavor => 'odata');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT ciflow.create_connection('bad', base_url => 'https://user:pw@x.example/v1', flavor => 'odata');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT ciflow.create_connection('bad', base_url => NULL, flavor => 'odata');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT ciflow.create_connection('bad', base_url => 'https://x.example/v1', flavor => 'odata',
                                token_url => 'file:///etc/passwd');
\echo SQLSTATE :LAST_ERROR_SQLSTATE

-- Missing credentials and other settings.
SELECT ciflow.create_connection('bad', base_url => 'https://x.example/v1',
                                instance_id => 'i', subscription_key => 'k');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT ciflow.create_connection('bad', base_url => 'https://x.example/v1',
                                instance_id => 'i', token_url => 'https://login.example/t',
                                client_id => 'app', subscription_key => 'k');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT ciflow.create_connection('bad', base_url => 'https://x.example/v1',
                                instance_id => 'i', bearer_token => 't');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT ciflow.create_connection('bad', base_url => 'https://x.example/v1',
                                bearer_token => 't', subscription_key => 'k');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT ciflow.create_connection('bad', base_url => 'https://x.example/v1', flavor => 'sap');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT ciflow.create_connection('bad', base_url => 'https://x.example/v1', flavor => 'odata',
                                page_size => 0);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT ciflow.create_connection('bad', base_url => 'https://x.example/v1', flavor => 'odata',
                                page_size => 5001);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT ciflow.create_connection('bad', base_url => 'https://x.example/v1', flavor => 'odata',
                                max_calls => 0);
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT ciflow.create_connection('bad', base_url => 'https://x.example/v1', flavor => 'odata',
                                per_interval => '0 seconds');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT ciflow.create_connection('bad', base_url => 'https://x.example/v1', flavor => 'odata',
                                ca_file => 'relative/ca.pem');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT ciflow.create_connection('bad', base_url => 'https://x.example/v1', flavor => 'odata',
                                ca_file => '/nonexistent/ca.pem');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
-- An invalid alter changes nothing.
SELECT ciflow.alter_connection('contoso', base_url => 'gopher://x');
\echo SQLSTATE :LAST_ERROR_SQLSTATE
SELECT name, base_url, page_size FROM ciflow.connections WHERE name = 'contoso';
SELECT count(*) AS no_bad_connection FROM ciflow.connections WHERE name = 'bad';

-- Privileges: nothing for PUBLIC; secrets for nobody but superusers.
CREATE ROLE ciflow_regress_nobody;
CREATE ROLE ciflow_regress_reader;
GRANT SELECT ON ciflow.connections TO ciflow_regress_reader;
SET ROLE ciflow_regress_nobody;
SELECT name FROM ciflow.connections;
SELECT ciflow.create_connection('x', base_url => 'https://x.example/v1', flavor => 'odata');
SELECT ciflow.drop_connection('contoso');
RESET ROLE;
-- A reader sees only the connections it may use, and never their secrets.
SET ROLE ciflow_regress_reader;
SELECT name, has_client_secret, has_subscription_key FROM ciflow.connections ORDER BY name;
RESET ROLE;
SELECT ciflow.grant_connection('contoso', 'ciflow_regress_reader');
SELECT ciflow.grant_connection('contoso', 'ciflow_regress_reader');  -- again: no error
SET ROLE ciflow_regress_reader;
SELECT name, has_client_secret, has_subscription_key, owner FROM ciflow.connections ORDER BY name;
SELECT * FROM ciflow.connection_secrets;
SELECT * FROM ciflow.connection_settings;
SELECT * FROM ciflow.connection_grants;
SELECT ciflow.grant_connection('contoso', 'ciflow_regress_nobody');
RESET ROLE;
SELECT ciflow.revoke_connection('contoso', 'ciflow_regress_reader');
SELECT ciflow.revoke_connection('contoso', 'ciflow_regress_reader');  -- NOTICE
SELECT ciflow.grant_connection('nosuch', 'ciflow_regress_reader');
SELECT ciflow.grant_connection('contoso', 'no_such_role');
SET ROLE ciflow_regress_reader;
SELECT count(*) AS after_revoke FROM ciflow.connections;
RESET ROLE;

-- Dropping removes the secrets too.
SELECT ciflow.drop_connection('dv');
SELECT ciflow.drop_connection('plain');
SELECT connection FROM ciflow.connection_secrets ORDER BY 1;
SELECT ciflow.drop_connection('contoso');
SELECT count(*) FROM ciflow.connection_secrets;
DROP ROLE ciflow_regress_nobody;
REVOKE ALL ON ciflow.connections FROM ciflow_regress_reader;
DROP ROLE ciflow_regress_reader;
DROP EXTENSION ciflow;
