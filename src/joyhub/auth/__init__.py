"""Identity: registration, login, sessions, password reset, and the principal dependencies."""
