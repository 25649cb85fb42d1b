"""Notifications and signed webhooks (API.md §11): events, endpoints, the dispatcher, quota emails."""
