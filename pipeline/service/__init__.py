"""What the service keeps and enforces: keys, limits, durable jobs and their runner, webhooks, request bodies."""
