-- Change data capture for Debezium (pgoutput). Requires wal_level=logical on the server.
-- Run as a superuser once per database; the role's password is set by the deployment, not here.

-- The backfill reads [start, end) ranges on event_ts and splits them by id.
CREATE INDEX IF NOT EXISTS engagement_events_event_ts_idx ON engagement_events (event_ts);

-- Publish only the tables the pipeline consumes.
CREATE PUBLICATION engagement_cdc FOR TABLE content, engagement_events;
