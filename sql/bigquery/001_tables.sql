-- BigQuery tables written by the pipeline through the Storage Write API.
-- ${PROJECT} and ${DATASET} are substituted by scripts/bigquery-ddl (or by hand) before running.
--
-- Exactly-once as users query it: the Storage Write API's committed/pending streams keep a retried
-- bundle from writing twice, the pipeline de-duplicates by event id within its horizon, and the views
-- in 002_views.sql keep one row per event id for anything beyond (restarts, overlapping backfills).

CREATE TABLE IF NOT EXISTS `${PROJECT}.${DATASET}.enriched_events` (
    event_id            INT64      NOT NULL OPTIONS (description = 'engagement_events.id: the identity of an event'),
    content_id          STRING              OPTIONS (description = 'UUID of the content; NULL when the event had none'),
    user_id             STRING,
    event_type          STRING              OPTIONS (description = 'play, pause, finish, click or NULL'),
    event_ts            TIMESTAMP  NOT NULL,
    duration_ms         INT64,
    device              STRING,
    raw_payload         STRING              OPTIONS (description = 'JSONB raw_payload as canonical JSON text (sorted keys)'),
    engagement_seconds  NUMERIC             OPTIONS (description = 'duration_ms / 1000, 3 places; NULL if duration is NULL or negative'),
    engagement_pct      NUMERIC             OPTIONS (description = 'engagement_seconds / length_seconds as a fraction, 2 places half away from zero'),
    content_type        STRING,
    length_seconds      INT64,
    title               STRING,
    slug                STRING,
    content_missing     BOOL       NOT NULL OPTIONS (description = 'true when content_id was NULL or unknown at processing time'),
    processed_at        TIMESTAMP  NOT NULL OPTIONS (description = 'when the pipeline wrote the row; the oldest copy of an id wins in views')
)
PARTITION BY DATE(event_ts)
CLUSTER BY content_id
OPTIONS (description = 'One row per engagement event, enriched with content metadata and engagement metrics.');

CREATE TABLE IF NOT EXISTS `${PROJECT}.${DATASET}.window_aggregates` (
    window_start            TIMESTAMP NOT NULL,
    window_end              TIMESTAMP NOT NULL,
    content_id              STRING,
    content_missing         BOOL      NOT NULL,
    title                   STRING,
    slug                    STRING,
    content_type            STRING,
    event_count             INT64     NOT NULL,
    play_count              INT64     NOT NULL,
    pause_count             INT64     NOT NULL,
    finish_count            INT64     NOT NULL,
    click_count             INT64     NOT NULL,
    engagement_seconds_sum  NUMERIC   NOT NULL,
    distinct_users          INT64     NOT NULL,
    pane_timing             STRING    NOT NULL OPTIONS (description = 'EARLY, ON_TIME or LATE'),
    pane_index              INT64     NOT NULL,
    emitted_at              TIMESTAMP NOT NULL
)
PARTITION BY DATE(window_start)
CLUSTER BY content_id
OPTIONS (description = 'Per-content fixed windows, each row the full value so far: streaming writes at most one pane per window and content per 10 s and the final one; the backfill writes final panes. Query window_aggregates_current.');

CREATE TABLE IF NOT EXISTS `${PROJECT}.${DATASET}.dead_letters` (
    stage           STRING    NOT NULL OPTIONS (description = 'decode, enrich, bigquery, redis or http'),
    reason          STRING    NOT NULL,
    payload_text    STRING             OPTIONS (description = 'the payload as UTF-8 text, undecodable bytes replaced'),
    payload_bytes   BYTES              OPTIONS (description = 'the payload exactly as received'),
    source_kind     STRING    NOT NULL OPTIONS (description = 'kafka, postgres, or aggregate for records the pipeline derived'),
    source_topic    STRING,
    source_partition INT64,
    source_offset   INT64,
    source_table    STRING,
    source_row_id   INT64,
    event_id        INT64,
    failed_at       TIMESTAMP NOT NULL
)
PARTITION BY DATE(failed_at)
OPTIONS (description = 'Every record the pipeline could not process or deliver, with the stage and the reason.');

CREATE TABLE IF NOT EXISTS `${PROJECT}.${DATASET}.http_intents` (
    idempotency_key STRING    NOT NULL OPTIONS (description = 'the Idempotency-Key the batch is sent with'),
    event_ids       STRING    NOT NULL OPTIONS (description = 'the event ids of the batch, ascending, comma-separated: what the key hashes'),
    body            STRING    NOT NULL OPTIONS (description = 'the request body exactly as sent'),
    event_count     INT64     NOT NULL,
    recorded_at     TIMESTAMP NOT NULL OPTIONS (description = 'when the intent was recorded, before the first POST of the batch')
)
PARTITION BY DATE(recorded_at)
OPTIONS (
    partition_expiration_days = 2,
    description = 'Write-ahead log of the HTTP sink: every batch, recorded before it is posted. A resumed job re-sends the batches of its overlap from here, with their keys, and skips their events (docs/http-sink.md). Rows of a retried bundle repeat; readers keep one per key.'
);
