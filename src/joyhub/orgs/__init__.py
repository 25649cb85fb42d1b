"""Teams (API.md §13): organizations that share one subscription, with roles, invitations,
per-member token limits, organization API keys and usage by member."""
