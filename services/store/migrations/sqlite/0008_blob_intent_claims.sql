-- A sweeper's claim on a blob intent is its own (an id and when it was taken): two sweepers (replicas) never hold
-- one intent at once, and a sweeper whose claim was taken over, or whose intent was replaced after it finished,
-- deletes nothing of another's. A claim older than the store's CLAIM_LIFETIME belongs to a sweep that died.
ALTER TABLE blob_intents ADD COLUMN claim_id TEXT;
ALTER TABLE blob_intents ADD COLUMN claim_time INTEGER;
