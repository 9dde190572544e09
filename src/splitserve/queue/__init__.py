"""splitserve.queue: the messaging layer over NATS JetStream.

- `subjects`: stream, subject, consumer and bucket names; token validation.
- `broker`: `NatsServer`, a `nats-server -js` child process (tests, `splitserve up`).
- `connection`: `connect()` with reconnect forever and a connected flag.
- `streams`: idempotent creation of the prefill stream, consumers and KV buckets.
- `work_queue`: `publish_job`, `JobConsumer`, `JobDelivery` (ack/nak/term/in_progress).
- `registry`: `WorkerRegistry` over `splitserve-workers`.
- `policy`: `PolicyStore` over `splitserve-policy`.
- `stats`: `publish_stats`, `StatsSubscription`.
- `messages`: encode/decode of PrefillJob, KVReady, WorkerStats.

Nothing here imports engine code; daemons wire it together.
"""
