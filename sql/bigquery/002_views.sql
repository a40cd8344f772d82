-- Views users query. ${PROJECT} and ${DATASET} as in 001_tables.sql.

-- One row per event id: the first copy written wins. Copies beyond the pipeline's de-duplication
-- horizon (a restart re-reading Kafka, a backfill overlapping streamed data) disappear here.
CREATE OR REPLACE VIEW `${PROJECT}.${DATASET}.enriched_events_unique` AS
SELECT * EXCEPT (copy_rank)
FROM (
    SELECT *, ROW_NUMBER() OVER (PARTITION BY event_id ORDER BY processed_at) AS copy_rank
    FROM `${PROJECT}.${DATASET}.enriched_events`
)
WHERE copy_rank = 1;

-- The current value of each window: its newest pane. Panes accumulate, so the newest is complete as
-- of its emission; a restarted job that replays a window re-emits it in full, with a later emitted_at.
CREATE OR REPLACE VIEW `${PROJECT}.${DATASET}.window_aggregates_current` AS
SELECT * EXCEPT (pane_rank)
FROM (
    SELECT *,
        ROW_NUMBER() OVER (
            PARTITION BY window_start, content_id, content_missing
            ORDER BY emitted_at DESC, pane_index DESC
        ) AS pane_rank
    FROM `${PROJECT}.${DATASET}.window_aggregates`
)
WHERE pane_rank = 1;

-- Hourly and daily engagement per content, from the de-duplicated events: exact by construction and
-- including events that arrived after a window's allowed lateness.
CREATE OR REPLACE VIEW `${PROJECT}.${DATASET}.engagement_hourly` AS
SELECT
    TIMESTAMP_TRUNC(event_ts, HOUR) AS hour,
    content_id,
    ANY_VALUE(title) AS title,
    ANY_VALUE(slug) AS slug,
    ANY_VALUE(content_type) AS content_type,
    LOGICAL_OR(content_missing) AS content_missing,
    COUNT(*) AS event_count,
    COUNTIF(event_type = 'play') AS play_count,
    COUNTIF(event_type = 'pause') AS pause_count,
    COUNTIF(event_type = 'finish') AS finish_count,
    COUNTIF(event_type = 'click') AS click_count,
    COALESCE(SUM(engagement_seconds), 0) AS engagement_seconds_sum,
    COUNT(DISTINCT user_id) AS distinct_users
FROM `${PROJECT}.${DATASET}.enriched_events_unique`
GROUP BY hour, content_id;

CREATE OR REPLACE VIEW `${PROJECT}.${DATASET}.engagement_daily` AS
SELECT
    DATE(event_ts) AS day,
    content_id,
    ANY_VALUE(title) AS title,
    ANY_VALUE(slug) AS slug,
    ANY_VALUE(content_type) AS content_type,
    LOGICAL_OR(content_missing) AS content_missing,
    COUNT(*) AS event_count,
    COUNTIF(event_type = 'play') AS play_count,
    COUNTIF(event_type = 'pause') AS pause_count,
    COUNTIF(event_type = 'finish') AS finish_count,
    COUNTIF(event_type = 'click') AS click_count,
    COALESCE(SUM(engagement_seconds), 0) AS engagement_seconds_sum,
    COUNT(DISTINCT user_id) AS distinct_users
FROM `${PROJECT}.${DATASET}.enriched_events_unique`
GROUP BY day, content_id;
