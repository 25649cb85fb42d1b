"""tools domain."""
