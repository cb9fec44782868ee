SET synchronous_commit = off;
INSERT INTO relay_outbox (message_id, event_id, kind, customer_key, event_type, body, occurred_at, created_at, state, attempts, delivered_at, updated_at)
SELECT 'd' || g, 'e' || g, CASE WHEN g % 2 = 0 THEN 'identify' ELSE 'track' END, 'old_' || (g / 20), 'page.view',
       jsonb_build_object('type', CASE WHEN g % 2 = 0 THEN 'identify' ELSE 'track' END, 'userId', 'old_' || (g / 20), 'event', 'page.view', 'messageId', 'd' || g, 'properties', '{}'::jsonb, 'traits', jsonb_build_object('email', 'x@example.com')),
       now() - interval '10 days', now() - interval '10 days', 'delivered', 1, now() - interval '10 days', now() - interval '10 days'
FROM generate_series(1, 5000000) g;
INSERT INTO relay_outbox (message_id, event_id, kind, customer_key, event_type, body, occurred_at)
SELECT 'p' || g, 'pe' || g, CASE WHEN g % 2 = 0 THEN 'identify' ELSE 'track' END, 'cus_' || (g % 100000), 'page.view',
       jsonb_build_object('type', CASE WHEN g % 2 = 0 THEN 'identify' ELSE 'track' END, 'userId', 'cus_' || (g % 100000), 'event', 'page.view', 'messageId', 'p' || g, 'properties', '{}'::jsonb, 'traits', jsonb_build_object('email', 'x@example.com'))
       , now()
FROM generate_series(1, 1000000) g;
VACUUM ANALYZE relay_outbox;
