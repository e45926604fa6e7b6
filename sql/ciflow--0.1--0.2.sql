/*
 * ciflow 0.1 -> 0.2.  After this script a 0.1 database has exactly the
 * objects, columns and grants of a fresh 0.2 install (ciflow--0.2.sql);
 * tests/extension/test_upgrade.py compares the two.
 */
\echo Use "ALTER EXTENSION ciflow UPDATE TO '0.2'" to load this file. \quit

/*
 * Connections get an owner.  Connections made under 0.1 belong to the role
 * running the update (a superuser): under 0.1 any role allowed to execute
 * ciflow's functions could use any connection, under 0.2 the owner grants
 * each one with ciflow.grant_connection.
 */
ALTER TABLE ciflow.connection_settings ADD COLUMN owner regrole;
UPDATE ciflow.connection_settings SET owner = current_user::regrole;
ALTER TABLE ciflow.connection_settings ALTER COLUMN owner SET NOT NULL;

CREATE TABLE ciflow.connection_grants (
    connection  text NOT NULL
                REFERENCES ciflow.connection_settings (name) ON DELETE CASCADE,
    grantee     regrole NOT NULL,
    granted_by  regrole NOT NULL,
    granted_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (connection, grantee)
);
SELECT pg_catalog.pg_extension_config_dump('ciflow.connection_grants', '');
REVOKE ALL ON ciflow.connection_grants FROM PUBLIC;

CREATE OR REPLACE VIEW ciflow.connections AS
    SELECT c.name, c.base_url, c.instance_id, c.flavor, c.token_url, c.client_id,
           c.scope, c.max_calls, c.per_interval, c.page_size, c.ca_file,
           s.client_secret IS NOT NULL    AS has_client_secret,
           s.subscription_key IS NOT NULL AS has_subscription_key,
           s.bearer_token IS NOT NULL     AS has_bearer_token,
           c.created_at, c.updated_at, c.owner
      FROM ciflow.connection_settings c
      LEFT JOIN ciflow.connection_secrets s ON s.connection = c.name
     WHERE pg_catalog.pg_has_role(c.owner::pg_catalog.oid, 'USAGE')
        OR EXISTS (SELECT 1 FROM ciflow.connection_grants g
                    WHERE g.connection = c.name
                      AND pg_catalog.pg_has_role(g.grantee::pg_catalog.oid, 'USAGE'));

/* Exported C symbols carry the ciflow_ prefix from 0.2 on. */
CREATE OR REPLACE FUNCTION ciflow.create_connection(
    name             text,
    base_url         text,
    instance_id      text     DEFAULT NULL,
    flavor           text     DEFAULT 'customer_insights',
    token_url        text     DEFAULT NULL,
    client_id        text     DEFAULT NULL,
    client_secret    text     DEFAULT NULL,
    scope            text     DEFAULT NULL,
    subscription_key text     DEFAULT NULL,
    bearer_token     text     DEFAULT NULL,
    max_calls        integer  DEFAULT 100,
    per_interval     interval DEFAULT '60 seconds',
    page_size        integer  DEFAULT 100,
    ca_file          text     DEFAULT NULL)
RETURNS void
LANGUAGE C CALLED ON NULL INPUT VOLATILE
AS 'MODULE_PATHNAME', 'ciflow_create_connection';

CREATE OR REPLACE FUNCTION ciflow.alter_connection(
    name             text,
    base_url         text     DEFAULT NULL,
    instance_id      text     DEFAULT NULL,
    flavor           text     DEFAULT NULL,
    token_url        text     DEFAULT NULL,
    client_id        text     DEFAULT NULL,
    client_secret    text     DEFAULT NULL,
    scope            text     DEFAULT NULL,
    subscription_key text     DEFAULT NULL,
    bearer_token     text     DEFAULT NULL,
    max_calls        integer  DEFAULT NULL,
    per_interval     interval DEFAULT NULL,
    page_size        integer  DEFAULT NULL,
    ca_file          text     DEFAULT NULL)
RETURNS void
LANGUAGE C CALLED ON NULL INPUT VOLATILE
AS 'MODULE_PATHNAME', 'ciflow_alter_connection';

CREATE OR REPLACE FUNCTION ciflow.drop_connection(name text, if_exists boolean DEFAULT false)
RETURNS void
LANGUAGE C CALLED ON NULL INPUT VOLATILE
AS 'MODULE_PATHNAME', 'ciflow_drop_connection';

CREATE FUNCTION ciflow.grant_connection(name text, role regrole)
RETURNS void
LANGUAGE C STRICT VOLATILE
AS 'MODULE_PATHNAME', 'ciflow_grant_connection';

CREATE FUNCTION ciflow.revoke_connection(name text, role regrole)
RETURNS void
LANGUAGE C STRICT VOLATILE
AS 'MODULE_PATHNAME', 'ciflow_revoke_connection';

REVOKE ALL ON FUNCTION ciflow.grant_connection(text, regrole) FROM PUBLIC;
REVOKE ALL ON FUNCTION ciflow.revoke_connection(text, regrole) FROM PUBLIC;

CREATE OR REPLACE FUNCTION ciflow.get_entities(connection text)
RETURNS TABLE (name text, qualified_name text, entity_type text, data_source text,
               attributes jsonb, keys jsonb, refreshed_at timestamptz)
LANGUAGE C STRICT VOLATILE
AS 'MODULE_PATHNAME', 'ciflow_get_entities';

CREATE OR REPLACE FUNCTION ciflow.get_items(
    connection text,
    entity     text,
    filter     text    DEFAULT NULL,
    fields     text    DEFAULT NULL,
    orderby    text    DEFAULT NULL,
    top        integer DEFAULT NULL,
    skip       integer DEFAULT NULL,
    search     text    DEFAULT NULL,
    expand     text    DEFAULT NULL)
RETURNS SETOF jsonb
LANGUAGE C CALLED ON NULL INPUT VOLATILE
AS 'MODULE_PATHNAME', 'ciflow_get_items';

CREATE OR REPLACE FUNCTION ciflow.get_item(
    connection text,
    entity     text,
    key_value  text,
    key_name   text DEFAULT 'CustomerId')
RETURNS jsonb
LANGUAGE C CALLED ON NULL INPUT VOLATILE
AS 'MODULE_PATHNAME', 'ciflow_get_item';

/* Sync runs: the difference applied, watermarks, dumped, private. */
ALTER TABLE ciflow.sync_runs
    ADD COLUMN inserted  bigint NOT NULL DEFAULT 0,
    ADD COLUMN updated   bigint NOT NULL DEFAULT 0,
    ADD COLUMN deleted   bigint NOT NULL DEFAULT 0,
    ADD COLUMN watermark jsonb,
    ADD COLUMN staging_relid oid;
SELECT pg_catalog.pg_extension_config_dump('ciflow.sync_runs', '');
SELECT pg_catalog.pg_extension_config_dump('ciflow.sync_runs_id_seq', '');

CREATE FUNCTION ciflow.connection_owned_by(connection text, role name)
RETURNS boolean
LANGUAGE sql STABLE STRICT SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (SELECT 1 FROM ciflow.connection_settings c
                    WHERE c.name OPERATOR(pg_catalog.=) $1
                      AND pg_catalog.pg_has_role($2, c.owner::pg_catalog.oid, 'USAGE'))
$$;
REVOKE ALL ON FUNCTION ciflow.connection_owned_by(text, name) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ciflow.connection_owned_by(text, name) TO PUBLIC;

ALTER TABLE ciflow.sync_runs ENABLE ROW LEVEL SECURITY;
CREATE POLICY sync_runs_visible ON ciflow.sync_runs FOR SELECT
    USING (run_by OPERATOR(pg_catalog.=) current_user
           OR ciflow.connection_owned_by(connection, current_user));

ALTER VIEW ciflow.sync_progress SET (security_invoker = true);

/*
 * ciflow.sync takes publish and adopt.  The signature changes, so the
 * function is made anew; the EXECUTE grants an administrator gave on the
 * 0.1 function are carried over to it.
 */
CREATE TEMP TABLE ciflow_sync_grants ON COMMIT DROP AS
    SELECT a.grantee::regrole::text AS grantee, a.is_grantable
      FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
     WHERE p.oid = 'ciflow.sync(text, text, text, text, text, text)'::regprocedure
       AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0
       AND a.grantee <> p.proowner;

DROP FUNCTION ciflow.sync(text, text, text, text, text, text);
CREATE FUNCTION ciflow.sync(
    connection text,
    entity     text,
    target     text DEFAULT NULL,
    filter     text DEFAULT NULL,
    fields     text DEFAULT NULL,
    mode       text DEFAULT 'full',
    publish    text DEFAULT 'diff',
    adopt      boolean DEFAULT false)
RETURNS ciflow.sync_runs
LANGUAGE C CALLED ON NULL INPUT VOLATILE
AS 'MODULE_PATHNAME', 'ciflow_sync';
REVOKE ALL ON FUNCTION ciflow.sync(text, text, text, text, text, text, text, boolean) FROM PUBLIC;

DO $$
DECLARE
    g record;
BEGIN
    FOR g IN SELECT * FROM ciflow_sync_grants LOOP
        EXECUTE pg_catalog.format(
            'GRANT EXECUTE ON FUNCTION ciflow.sync(text, text, text, text, text, text, text, boolean) TO %s%s',
            g.grantee, CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
END
$$;
DROP TABLE ciflow_sync_grants;

/*
 * ---- Events (issue 8): refresh states, thresholds, the event log ----
 * This block ends both ciflow--0.2.sql and ciflow--0.1--0.2.sql, verbatim.
 * src/monitor.c (poll passes) and src/events.c (the log, NOTIFY, trim) own
 * the behaviour; every write comes from ciflow's C code as the table owner.
 */

/* Whether a role may use a connection: its owner or a grantee (or a member). */
CREATE FUNCTION ciflow.connection_usable_by(connection text, role name)
RETURNS boolean
LANGUAGE sql STABLE STRICT SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (SELECT 1 FROM ciflow.connection_settings c
                    WHERE c.name OPERATOR(pg_catalog.=) $1
                      AND pg_catalog.pg_has_role($2, c.owner::pg_catalog.oid, 'USAGE'))
        OR EXISTS (SELECT 1 FROM ciflow.connection_grants g
                    WHERE g.connection OPERATOR(pg_catalog.=) $1
                      AND pg_catalog.pg_has_role($2, g.grantee::pg_catalog.oid, 'USAGE'))
$$;

CREATE TABLE ciflow.thresholds (
    id                bigserial PRIMARY KEY,
    connection        text NOT NULL
                      REFERENCES ciflow.connection_settings (name) ON DELETE CASCADE,
    kind              text NOT NULL CHECK (kind IN ('segment', 'measure')),
    subject           text NOT NULL,
    above             numeric NOT NULL,
    value_key         text,
    enabled           boolean NOT NULL DEFAULT true,
    last_value        numeric,
    last_evaluated_at timestamptz,
    created_by        name NOT NULL DEFAULT current_user,
    created_at        timestamptz NOT NULL DEFAULT now(),
    CHECK (kind = 'measure' OR value_key IS NULL)
);
CREATE INDEX thresholds_connection ON ciflow.thresholds (connection);

CREATE TABLE ciflow.refresh_states (
    connection   text NOT NULL
                 REFERENCES ciflow.connection_settings (name) ON DELETE CASCADE,
    kind         text NOT NULL
                 CHECK (kind IN ('datasource', 'job', 'segment', 'measure', 'job_baseline', 'status')),
    subject      text NOT NULL,
    name         text,
    state        text,
    value        numeric,
    remote_at    timestamptz,
    observed_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    details      jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (connection, kind, subject)
);

CREATE TABLE ciflow.events (
    id          bigserial PRIMARY KEY,
    connection  text NOT NULL,
    kind        text NOT NULL CHECK (kind IN (
                    'datasource_refresh_failed', 'datasource_refresh_succeeded',
                    'segment_threshold_exceeded', 'measure_threshold_exceeded',
                    'full_refresh_completed', 'unification_refresh_completed',
                    'sync_succeeded', 'sync_failed')),
    subject     text NOT NULL,
    payload     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    dedupe_key  text NOT NULL
);
CREATE UNIQUE INDEX events_dedupe_key ON ciflow.events (dedupe_key);
CREATE INDEX events_created_at ON ciflow.events (created_at);
CREATE INDEX events_connection_kind ON ciflow.events (connection, kind, id);

SELECT pg_catalog.pg_extension_config_dump('ciflow.thresholds', '');
SELECT pg_catalog.pg_extension_config_dump('ciflow.thresholds_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('ciflow.refresh_states', '');
SELECT pg_catalog.pg_extension_config_dump('ciflow.events', '');
SELECT pg_catalog.pg_extension_config_dump('ciflow.events_id_seq', '');

/*
 * A role sees the states, thresholds and events of the connections it may
 * use; the end of a sync only if it ran the sync or owns the connection
 * (as in sync_runs).  Nothing is granted: an administrator grants SELECT.
 */
ALTER TABLE ciflow.thresholds ENABLE ROW LEVEL SECURITY;
CREATE POLICY thresholds_visible ON ciflow.thresholds FOR SELECT
    USING (ciflow.connection_usable_by(connection, current_user));
ALTER TABLE ciflow.refresh_states ENABLE ROW LEVEL SECURITY;
CREATE POLICY refresh_states_visible ON ciflow.refresh_states FOR SELECT
    USING (ciflow.connection_usable_by(connection, current_user));
ALTER TABLE ciflow.events ENABLE ROW LEVEL SECURITY;
CREATE POLICY events_visible ON ciflow.events FOR SELECT
    USING (ciflow.connection_usable_by(connection, current_user)
           AND (kind OPERATOR(pg_catalog.<>) ALL (ARRAY['sync_succeeded', 'sync_failed'])
                OR (payload OPERATOR(pg_catalog.->>) 'run_by') OPERATOR(pg_catalog.=) current_user
                OR ciflow.connection_owned_by(connection, current_user)));

CREATE FUNCTION ciflow.poll(connection text)
RETURNS SETOF ciflow.events
LANGUAGE C STRICT VOLATILE
AS 'MODULE_PATHNAME', 'ciflow_poll';

CREATE FUNCTION ciflow.add_threshold(
    connection text,
    kind       text,
    name       text,
    above      numeric,
    value_key  text DEFAULT NULL)
RETURNS bigint
LANGUAGE C CALLED ON NULL INPUT VOLATILE
AS 'MODULE_PATHNAME', 'ciflow_add_threshold';

CREATE FUNCTION ciflow.drop_threshold(id bigint)
RETURNS void
LANGUAGE C STRICT VOLATILE
AS 'MODULE_PATHNAME', 'ciflow_drop_threshold';

CREATE FUNCTION ciflow.trim_events()
RETURNS bigint
LANGUAGE C STRICT VOLATILE
AS 'MODULE_PATHNAME', 'ciflow_trim_events';

REVOKE ALL ON ciflow.thresholds, ciflow.refresh_states, ciflow.events FROM PUBLIC;
REVOKE ALL ON SEQUENCE ciflow.thresholds_id_seq, ciflow.events_id_seq FROM PUBLIC;
REVOKE ALL ON FUNCTION ciflow.poll(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION ciflow.add_threshold(text, text, text, numeric, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION ciflow.drop_threshold(bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION ciflow.trim_events() FROM PUBLIC;
-- The policies call it as whoever reads the tables.
REVOKE ALL ON FUNCTION ciflow.connection_usable_by(text, name) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ciflow.connection_usable_by(text, name) TO PUBLIC;

/* Every object of ciflow explains itself in \d+ and \df+. */
COMMENT ON TABLE ciflow.connection_settings IS
    'Connections to Customer Insights (or Dataverse, OData): everything but the secrets. Written by ciflow.create_connection and ciflow.alter_connection.';
COMMENT ON TABLE ciflow.connection_secrets IS
    'Secrets of each connection, read only by ciflow''s C code; row-level security without a policy hides them from everyone but superusers.';
COMMENT ON TABLE ciflow.connection_grants IS
    'Roles allowed to use a connection besides its owner (ciflow.grant_connection, ciflow.revoke_connection).';
COMMENT ON VIEW ciflow.connections IS
    'The connections the current role may use, with whether each secret is set (never the secrets).';
COMMENT ON FUNCTION ciflow.create_connection(text, text, text, text, text, text, text, text, text, text, integer, interval, integer, text) IS
    'Creates a connection owned by the current role; secrets are stored apart and never shown.';
COMMENT ON FUNCTION ciflow.alter_connection(text, text, text, text, text, text, text, text, text, text, integer, interval, integer, text) IS
    'Changes the given settings of a connection; secrets not given again do not follow a change of host.';
COMMENT ON FUNCTION ciflow.drop_connection(text, boolean) IS
    'Drops a connection with its secrets, grants, thresholds and refresh states.';
COMMENT ON FUNCTION ciflow.grant_connection(text, regrole) IS
    'Lets a role (and its members) use a connection.';
COMMENT ON FUNCTION ciflow.revoke_connection(text, regrole) IS
    'Takes back ciflow.grant_connection.';
COMMENT ON FUNCTION ciflow.get_entities(text) IS
    'Action: the entities of the connection''s instance (one call to the service).';
COMMENT ON FUNCTION ciflow.get_items(text, text, text, text, text, integer, integer, text, text) IS
    'Action: rows of an entity as jsonb, with OData $filter, $select, $orderby, $top, $skip, $search and $expand (one call).';
COMMENT ON FUNCTION ciflow.get_item(text, text, text, text) IS
    'Action: one row of an entity by key as jsonb, or NULL (one call).';
COMMENT ON TABLE ciflow.sync_runs IS
    'One row per ciflow.sync: status, counters, error and watermark; a role sees its own runs, a connection''s owner all of them.';
COMMENT ON FUNCTION ciflow.connection_owned_by(text, name) IS
    'Whether a role owns (or is a member of the owner of) a connection; used by row-level security policies.';
COMMENT ON VIEW ciflow.sync_progress IS
    'Runs in progress: pages, rows, calls, and whether the run waits for a call slot or a retry.';
COMMENT ON FUNCTION ciflow.sync(text, text, text, text, text, text, text, boolean) IS
    'Copies an entity into a table (full or incremental), in a worker of its own; returns the run. Its end is an event (sync_succeeded, sync_failed).';
COMMENT ON FUNCTION ciflow.connection_usable_by(text, name) IS
    'Whether a role may use a connection (owner or grantee, or a member of either); used by row-level security policies.';
COMMENT ON TABLE ciflow.thresholds IS
    'Segment and measure thresholds: an event fires when an accepted value goes from <= above to > above. last_value is the last accepted value (the baseline when the threshold is added).';
COMMENT ON TABLE ciflow.refresh_states IS
    'The latest known state per connection, kind (datasource, job, segment, measure, job_baseline) and subject: remote_at is the service''s timestamp, observed_at the last time a poll saw it.';
COMMENT ON TABLE ciflow.events IS
    'The durable event log: one row per remote transition (or end of a sync), unique by dedupe_key, with the whole payload. Rows older than ciflow.event_retention are removed by ciflow.trim_events.';
COMMENT ON FUNCTION ciflow.poll(text) IS
    'One monitoring pass of a connection (at most five calls): records states, fires new events (NOTIFY ciflow_events and ciflow_<kind> at commit) and returns them.';
COMMENT ON FUNCTION ciflow.add_threshold(text, text, text, numeric, text) IS
    'Watches a segment''s member count or a scalar measure''s value; returns the threshold''s id. The current value is the baseline.';
COMMENT ON FUNCTION ciflow.drop_threshold(bigint) IS
    'Stops watching a threshold.';
COMMENT ON FUNCTION ciflow.trim_events() IS
    'Deletes events older than ciflow.event_retention (and job states unseen for 30 days) in batches; returns the number of events deleted.';

/*
 * Dataverse and other OData v4 services (issue 10).
 *
 * max_calls NULL means no client-side call limit, for services that enforce
 * their own and answer 429 with Retry-After (Dataverse, most OData servers).
 * edm_type and edm_value show the Edm type map and how a service's JSON value
 * is read into a column of it, exactly as a sync does; describe_entity shows
 * an entity set's shape as $metadata gives it.
 */
ALTER TABLE ciflow.connection_settings ALTER COLUMN max_calls DROP NOT NULL;
COMMENT ON COLUMN ciflow.connection_settings.max_calls IS
    'At most this many calls per per_interval, across all sessions; NULL: no client-side limit';

CREATE FUNCTION ciflow.edm_type(edm_type text)
RETURNS regtype
LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE
AS 'MODULE_PATHNAME', 'ciflow_edm_type';
COMMENT ON FUNCTION ciflow.edm_type(text) IS
    'The column type a sync gives an Edm type (jsonb for complex, collection and enum types)';

CREATE FUNCTION ciflow.edm_value(value jsonb, edm_type text)
RETURNS text
LANGUAGE C STABLE STRICT PARALLEL SAFE
AS 'MODULE_PATHNAME', 'ciflow_edm_value';
COMMENT ON FUNCTION ciflow.edm_value(jsonb, text) IS
    'A service''s JSON value as a sync stores it in a column of the Edm type, as text';

CREATE FUNCTION ciflow.describe_entity(
    connection text,
    entity     text,
    OUT name        text,
    OUT edm_type    text,
    OUT column_type regtype,
    OUT nullable    boolean,
    OUT key_position integer)
RETURNS SETOF record
LANGUAGE C CALLED ON NULL INPUT VOLATILE
AS 'MODULE_PATHNAME', 'ciflow_describe_entity';
COMMENT ON FUNCTION ciflow.describe_entity(text, text) IS
    'An entity set''s properties as the service''s $metadata describes them, with the column types a sync gives them';

-- alter_connection: max_calls => NULL lifts the limit; the default (-1) keeps it.
CREATE OR REPLACE FUNCTION ciflow.alter_connection(
    name             text,
    base_url         text     DEFAULT NULL,
    instance_id      text     DEFAULT NULL,
    flavor           text     DEFAULT NULL,
    token_url        text     DEFAULT NULL,
    client_id        text     DEFAULT NULL,
    client_secret    text     DEFAULT NULL,
    scope            text     DEFAULT NULL,
    subscription_key text     DEFAULT NULL,
    bearer_token     text     DEFAULT NULL,
    max_calls        integer  DEFAULT -1,
    per_interval     interval DEFAULT NULL,
    page_size        integer  DEFAULT NULL,
    ca_file          text     DEFAULT NULL)
RETURNS void
LANGUAGE C CALLED ON NULL INPUT VOLATILE
AS 'MODULE_PATHNAME', 'ciflow_alter_connection';

REVOKE ALL ON FUNCTION ciflow.edm_type(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION ciflow.edm_value(jsonb, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION ciflow.describe_entity(text, text) FROM PUBLIC;

/*
 * ---- Delivering events (issue 13): sinks and the outbox ----
 * This block ends both ciflow--0.2.sql and ciflow--0.1--0.2.sql, verbatim.
 * src/delivery.c owns the behaviour: src/events.c calls it to record one
 * delivery per matching sink in the transaction that records an event, and
 * a delivery pass (ciflow.deliver, later the worker) sends them.
 */
CREATE TABLE ciflow.sink_settings (
    name         text PRIMARY KEY
                 CHECK (name ~ '^[a-z0-9_-]+$' AND octet_length(name) < 64),
    url          text NOT NULL,
    format       text NOT NULL DEFAULT 'json'
                 CHECK (format IN ('json', 'teams', 'slack', 'mail')),
    kinds        text[],
    connection   text,
    mail_from    text,
    mail_to      text[],
    username     text,
    require_tls  boolean NOT NULL DEFAULT false,
    ca_file      text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    owner        regrole NOT NULL,   -- deliveries carry this role's rights
    CHECK ((format = 'mail') = (mail_from IS NOT NULL AND mail_to IS NOT NULL))
);

CREATE TABLE ciflow.sink_secrets (
    sink      text PRIMARY KEY
              REFERENCES ciflow.sink_settings (name) ON DELETE CASCADE,
    secret    text,
    password  text
);
ALTER TABLE ciflow.sink_secrets ENABLE ROW LEVEL SECURITY;
ALTER TABLE ciflow.sink_secrets FORCE ROW LEVEL SECURITY;

/*
 * The outbox.  A pending row is due at next_attempt_at; a pass that claims
 * it counts the attempt and moves next_attempt_at past its timeouts, so a
 * pass that dies mid-send leaves it to be sent again (at least once).
 */
CREATE TABLE ciflow.deliveries (
    id               bigserial PRIMARY KEY,
    event_id         bigint NOT NULL REFERENCES ciflow.events (id) ON DELETE CASCADE,
    sink             text NOT NULL
                     REFERENCES ciflow.sink_settings (name) ON DELETE CASCADE,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    last_status      integer,
    last_error       text,
    next_attempt_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    delivered_at     timestamptz,
    UNIQUE (sink, event_id)
);
CREATE INDEX deliveries_pending ON ciflow.deliveries (sink, event_id) WHERE status = 'pending';
CREATE INDEX deliveries_event ON ciflow.deliveries (event_id);

SELECT pg_catalog.pg_extension_config_dump('ciflow.sink_settings', '');
SELECT pg_catalog.pg_extension_config_dump('ciflow.sink_secrets', '');
SELECT pg_catalog.pg_extension_config_dump('ciflow.deliveries', '');
SELECT pg_catalog.pg_extension_config_dump('ciflow.deliveries_id_seq', '');

/* Whether a role added a sink (or is a member of the role that did). */
CREATE FUNCTION ciflow.sink_owned_by(sink text, role name)
RETURNS boolean
LANGUAGE sql STABLE STRICT SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (SELECT 1 FROM ciflow.sink_settings s
                    WHERE s.name OPERATOR(pg_catalog.=) $1
                      AND pg_catalog.pg_has_role($2, s.owner::pg_catalog.oid, 'USAGE'))
$$;

/* A role sees the deliveries of the sinks it added (or is a member of the adder). */
ALTER TABLE ciflow.deliveries ENABLE ROW LEVEL SECURITY;
CREATE POLICY deliveries_visible ON ciflow.deliveries FOR SELECT
    USING (ciflow.sink_owned_by(sink, current_user));

CREATE VIEW ciflow.sinks AS
    SELECT s.name, s.url, s.format, s.kinds, s.connection, s.mail_from, s.mail_to,
           x.secret IS NOT NULL   AS has_secret,
           x.password IS NOT NULL AS has_password,
           s.created_at
      FROM ciflow.sink_settings s
      LEFT JOIN ciflow.sink_secrets x ON x.sink OPERATOR(pg_catalog.=) s.name
     WHERE pg_catalog.pg_has_role(s.owner::pg_catalog.oid, 'USAGE');

CREATE FUNCTION ciflow.add_sink(
    name        text,
    url         text,
    format      text    DEFAULT 'json',
    kinds       text[]  DEFAULT NULL,
    connection  text    DEFAULT NULL,
    secret      text    DEFAULT NULL,
    mail_from   text    DEFAULT NULL,
    mail_to     text[]  DEFAULT NULL,
    username    text    DEFAULT NULL,
    password    text    DEFAULT NULL,
    require_tls boolean DEFAULT false,
    ca_file     text    DEFAULT NULL)
RETURNS void
LANGUAGE C CALLED ON NULL INPUT VOLATILE
AS 'MODULE_PATHNAME', 'ciflow_add_sink';

CREATE FUNCTION ciflow.drop_sink(name text, if_exists boolean DEFAULT false)
RETURNS void
LANGUAGE C CALLED ON NULL INPUT VOLATILE
AS 'MODULE_PATHNAME', 'ciflow_drop_sink';

CREATE FUNCTION ciflow.retry_delivery(id bigint)
RETURNS void
LANGUAGE C STRICT VOLATILE
AS 'MODULE_PATHNAME', 'ciflow_retry_delivery';

/* A procedure: it commits between claiming, sending and recording. */
CREATE PROCEDURE ciflow.deliver(INOUT attempted integer DEFAULT NULL)
LANGUAGE C
AS 'MODULE_PATHNAME', 'ciflow_deliver';

REVOKE ALL ON ciflow.sink_settings, ciflow.sink_secrets, ciflow.deliveries, ciflow.sinks FROM PUBLIC;
REVOKE ALL ON SEQUENCE ciflow.deliveries_id_seq FROM PUBLIC;
REVOKE ALL ON FUNCTION ciflow.add_sink(text, text, text, text[], text, text, text, text[], text, text, boolean, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION ciflow.drop_sink(text, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION ciflow.retry_delivery(bigint) FROM PUBLIC;
REVOKE ALL ON PROCEDURE ciflow.deliver(integer) FROM PUBLIC;
-- The policy on deliveries calls it as whoever reads the table.
REVOKE ALL ON FUNCTION ciflow.sink_owned_by(text, name) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ciflow.sink_owned_by(text, name) TO PUBLIC;

COMMENT ON TABLE ciflow.sink_settings IS
    'Where events are delivered (ciflow.add_sink): everything but the secrets. Deliveries carry the rights of owner, the role that added the sink.';
COMMENT ON TABLE ciflow.sink_secrets IS
    'Webhook secrets and SMTP passwords of the sinks, read only by ciflow''s C code; row-level security without a policy hides them from everyone but superusers.';
COMMENT ON TABLE ciflow.deliveries IS
    'The outbox: one row per event and matching sink, recorded with the event; status pending, delivered or failed, with every attempt''s outcome. Rows go with their event (ciflow.event_retention) or their sink.';
COMMENT ON FUNCTION ciflow.sink_owned_by(text, name) IS
    'Whether a role added a sink (or is a member of the role that did); used by the row-level security policy of ciflow.deliveries.';
COMMENT ON VIEW ciflow.sinks IS
    'The sinks the current role added, with whether a secret and a password are set (never the secrets).';
COMMENT ON FUNCTION ciflow.add_sink(text, text, text, text[], text, text, text, text[], text, text, boolean, text) IS
    'Adds a sink (json, teams or slack webhook, or mail over SMTP) that receives the matching events recorded from now on.';
COMMENT ON FUNCTION ciflow.drop_sink(text, boolean) IS
    'Drops a sink with its secrets and its deliveries (pending ones are discarded).';
COMMENT ON FUNCTION ciflow.retry_delivery(bigint) IS
    'Queues a failed delivery again, due now, with a fresh count of attempts.';
COMMENT ON PROCEDURE ciflow.deliver(integer) IS
    'One delivery pass: sends the due head delivery of each sink (one at a time per sink, up to 16 at once, each bounded by the timeouts), records each outcome and goes on with that sink''s next delivery; returns how many it attempted (each at most once). CALL it outside a transaction block.';

-- ---------------------------------------------------------------------
-- 0.2 (worker): jobs that the launcher background worker runs.
-- ---------------------------------------------------------------------

/*
 * One row per job.  Written only by ciflow's C code, as the extension's
 * owner; a role sees (through ciflow.jobs) the jobs it owns.  The launcher
 * keeps the run bookkeeping here: the last run, the consecutive failures,
 * when the job next runs, and for on_event jobs the id of the last event
 * of ciflow.events it has acted on.
 */
CREATE TABLE ciflow.job_definitions (
    id                   bigserial PRIMARY KEY,
    kind                 text NOT NULL CHECK (kind IN ('sync', 'watch')),
    connection           text NOT NULL,
    entity               text,
    target_schema        text,
    target_table         text,
    mode                 text NOT NULL DEFAULT 'full' CHECK (mode IN ('full', 'incremental')),
    every                interval CHECK (every > interval '0'),
    cron                 text,
    on_event             text,
    on_subject           text,
    owner                regrole NOT NULL,    -- dumped and restored by name
    enabled              boolean NOT NULL DEFAULT true,
    event_cursor         bigint NOT NULL DEFAULT 0,
    last_run_id          bigint,
    last_status          text CHECK (last_status IN ('running', 'succeeded', 'failed')),
    last_started_at      timestamptz,
    last_finished_at     timestamptz,
    last_error           text,
    run_pid              integer,             -- the process of the run going on
    consecutive_failures integer NOT NULL DEFAULT 0,
    next_run_at          timestamptz,
    created_at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    CHECK (num_nonnulls(every, cron, on_event) = 1),
    CHECK (kind = 'watch' OR entity IS NOT NULL),
    CHECK (kind = 'sync' OR on_event IS NULL)
);
SELECT pg_catalog.pg_extension_config_dump('ciflow.job_definitions', '');
SELECT pg_catalog.pg_extension_config_dump('ciflow.job_definitions_id_seq', '');
ALTER TABLE ciflow.job_definitions ENABLE ROW LEVEL SECURITY;
CREATE POLICY job_definitions_visible ON ciflow.job_definitions FOR SELECT
    USING (pg_catalog.pg_has_role(current_user, owner, 'USAGE'));

-- The launcher's retention trim finds old runs through this index.
CREATE INDEX sync_runs_finished_at ON ciflow.sync_runs (finished_at)
    WHERE status <> 'running';

/*
 * Not security_invoker: a role granted SELECT on the view sees the jobs of
 * the roles whose rights it has (superusers every job), without a grant on
 * the table.
 */
CREATE VIEW ciflow.jobs AS
    SELECT j.id, j.kind, j.connection, j.entity,
           CASE WHEN j.target_table IS NOT NULL
                THEN pg_catalog.quote_ident(j.target_schema) OPERATOR(pg_catalog.||) '.'
                     OPERATOR(pg_catalog.||) pg_catalog.quote_ident(j.target_table) END AS target,
           CASE WHEN j.kind = 'sync' THEN j.mode END AS mode,
           CASE WHEN j.every IS NOT NULL THEN 'every ' OPERATOR(pg_catalog.||) j.every::text
                WHEN j.cron IS NOT NULL THEN j.cron
                ELSE 'on_event ' OPERATOR(pg_catalog.||) j.on_event
                     OPERATOR(pg_catalog.||) coalesce(' (' OPERATOR(pg_catalog.||) j.on_subject
                                                      OPERATOR(pg_catalog.||) ')', '') END AS schedule,
           j.enabled,
           coalesce(r.rolname, 'unknown (OID=' OPERATOR(pg_catalog.||) j.owner::oid::text
                    OPERATOR(pg_catalog.||) ')') AS owner,
           j.last_run_id, j.last_status, j.last_started_at, j.last_finished_at,
           j.consecutive_failures, j.next_run_at, j.last_error, j.event_cursor
      FROM ciflow.job_definitions j
      LEFT JOIN pg_catalog.pg_roles r ON r.oid = j.owner
     WHERE pg_catalog.pg_has_role(current_user, j.owner, 'USAGE')
        OR EXISTS (SELECT 1 FROM pg_catalog.pg_roles s
                    WHERE s.rolname = current_user AND s.rolsuper);

CREATE FUNCTION ciflow.schedule_sync(
    connection text,
    entity     text,
    every      interval DEFAULT NULL,
    cron       text DEFAULT NULL,
    on_event   text DEFAULT NULL,
    subject    text DEFAULT NULL,
    mode       text DEFAULT 'full',
    target     text DEFAULT NULL)
RETURNS bigint
LANGUAGE C CALLED ON NULL INPUT VOLATILE
AS 'MODULE_PATHNAME', 'ciflow_schedule_sync';

CREATE FUNCTION ciflow.watch(
    connection text,
    every      interval DEFAULT NULL,
    cron       text DEFAULT NULL)
RETURNS bigint
LANGUAGE C CALLED ON NULL INPUT VOLATILE
AS 'MODULE_PATHNAME', 'ciflow_watch';

CREATE FUNCTION ciflow.unschedule(job_id bigint)
RETURNS boolean
LANGUAGE C STRICT VOLATILE
AS 'MODULE_PATHNAME', 'ciflow_unschedule';

CREATE FUNCTION ciflow.alter_job(
    job_id  bigint,
    enabled boolean DEFAULT NULL,
    every   interval DEFAULT NULL,
    cron    text DEFAULT NULL)
RETURNS void
LANGUAGE C CALLED ON NULL INPUT VOLATILE
AS 'MODULE_PATHNAME', 'ciflow_alter_job';

CREATE FUNCTION ciflow.worker_status(
    OUT state text, OUT pid integer, OUT database text, OUT started_at timestamptz,
    OUT max_concurrent_jobs integer, OUT running integer, OUT children jsonb,
    OUT last_error text, OUT last_error_at timestamptz)
RETURNS record
LANGUAGE C STRICT VOLATILE
AS 'MODULE_PATHNAME', 'ciflow_worker_status';

/* A sync_progress row is a run whose process still exists. */
CREATE OR REPLACE VIEW ciflow.sync_progress WITH (security_invoker = true) AS
    SELECT r.id AS run_id, r.connection, r.entity, r.target, r.pages, r.rows,
           r.rows_expected, r.api_calls AS calls,
           coalesce(a.wait_event_type = 'Extension', false) AS waiting,
           r.started_at, clock_timestamp() - r.started_at AS elapsed
      FROM ciflow.sync_runs r
      JOIN pg_catalog.pg_stat_activity a
        ON a.pid = r.pid AND a.backend_type = 'ciflow sync'
     WHERE r.status = 'running';

REVOKE ALL ON ciflow.job_definitions, ciflow.jobs FROM PUBLIC;
REVOKE ALL ON SEQUENCE ciflow.job_definitions_id_seq FROM PUBLIC;
REVOKE ALL ON FUNCTION ciflow.schedule_sync(text, text, interval, text, text, text, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION ciflow.watch(text, interval, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION ciflow.unschedule(bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION ciflow.alter_job(bigint, boolean, interval, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION ciflow.worker_status() FROM PUBLIC;

COMMENT ON TABLE ciflow.job_definitions IS
    'Scheduled syncs and watches run by the launcher (read ciflow.jobs; written by ciflow''s functions only)';
COMMENT ON INDEX ciflow.sync_runs_finished_at IS
    'Finds the runs older than ciflow.run_retention for the launcher''s batched trim';
COMMENT ON POLICY job_definitions_visible ON ciflow.job_definitions IS
    'A role sees the jobs of the roles whose rights it has';
COMMENT ON VIEW ciflow.jobs IS
    'What runs when: each job''s schedule, owner, last run and next run';
COMMENT ON FUNCTION ciflow.schedule_sync(text, text, interval, text, text, text, text, text) IS
    'Schedules a sync of an entity (every, cron or on_event); returns the job id';
COMMENT ON FUNCTION ciflow.watch(text, interval, text) IS
    'Schedules monitoring passes (ciflow.poll) of a connection; returns the job id';
COMMENT ON FUNCTION ciflow.unschedule(bigint) IS
    'Removes a job; true if it existed';
COMMENT ON FUNCTION ciflow.alter_job(bigint, boolean, interval, text) IS
    'Pauses, resumes or reschedules a job';
COMMENT ON FUNCTION ciflow.worker_status() IS
    'The launcher''s state, its running children and its last error';

-- ---------------------------------------------------------------------
-- 0.2 (keys): what ciflow remembers of each entity's metadata.
-- This block ends both ciflow--0.2.sql and ciflow--0.1--0.2.sql, verbatim.
-- ---------------------------------------------------------------------

/*
 * A cache, written only by ciflow's C code (src/entitykeys.c) as the
 * extension's owner: every metadata read (a sync's, describe_entity's,
 * get_entities' on Customer Insights, get_item's own on a miss) leaves the
 * entity's key and the Edm types of its properties here, so that get_item
 * writes its key's literal by type in one call.  Not dumped: a restored
 * database learns it again from the service.
 */
CREATE TABLE ciflow.entity_keys (
    connection      text NOT NULL
                    REFERENCES ciflow.connection_settings (name) ON DELETE CASCADE,
    entity          text NOT NULL,
    key_names       text[] NOT NULL,
    key_types       text[] NOT NULL,
    property_types  jsonb NOT NULL,
    fetched_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (connection, entity),
    CHECK (cardinality(key_names) = cardinality(key_types)),
    CHECK (jsonb_typeof(property_types) = 'object')
);

-- A role granted SELECT sees the entities of the connections it may use.
ALTER TABLE ciflow.entity_keys ENABLE ROW LEVEL SECURITY;
CREATE POLICY entity_keys_visible ON ciflow.entity_keys FOR SELECT
    USING (ciflow.connection_usable_by(connection, current_user));

REVOKE ALL ON ciflow.entity_keys FROM PUBLIC;

COMMENT ON TABLE ciflow.entity_keys IS
    'Cache of each entity''s key and property types, as the last metadata ciflow read said (fetched_at); get_item writes its key by these types. Written by ciflow only; rows go with their connection or a change of its service.';
COMMENT ON POLICY entity_keys_visible ON ciflow.entity_keys IS
    'A role sees the cached metadata of the connections it may use';
COMMENT ON FUNCTION ciflow.get_item(text, text, text, text) IS
    'Action: one row of an entity by key as jsonb, or NULL; the key is written by its Edm type. One call, two the first time ciflow meets the entity (its metadata gives the key''s type).';
