"""Stage: the greedy channel search (AutoSlim), its scoring and its sharding over processes."""
