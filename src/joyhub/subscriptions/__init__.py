"""subscriptions domain."""
