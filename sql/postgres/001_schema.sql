-- Source tables, exactly as fixed by the data contract (shared/SPEC.md §1).
CREATE TABLE content (
    id              UUID PRIMARY KEY,
    slug            TEXT UNIQUE NOT NULL,
    title           TEXT NOT NULL,
    content_type    TEXT CHECK (content_type IN ('podcast', 'newsletter', 'video')),
    length_seconds  INTEGER,                -- may be NULL
    publish_ts      TIMESTAMPTZ NOT NULL
);

CREATE TABLE engagement_events (
    id           BIGSERIAL PRIMARY KEY,
    content_id   UUID REFERENCES content(id),
    user_id      UUID,
    event_type   TEXT CHECK (event_type IN ('play', 'pause', 'finish', 'click')),
    event_ts     TIMESTAMPTZ NOT NULL,
    duration_ms  INTEGER,                   -- NULL for events without duration
    device       TEXT,                      -- e.g. "ios", "web-safari"
    raw_payload  JSONB                      -- anything extra the client sends
);
