"""Outgoing email: a `console` backend for development and an `smtp` backend (aiosmtplib).

Sending never happens on the request's critical path: routes hand the message to
`send_in_background`, which runs after the response has been sent (FastAPI BackgroundTasks).
A mail-server failure is logged — the exception's class and SMTP code only, never the message
body, the credentials or the server's reply text — and never fails or delays the request.

A message names the secrets it carries (`OutgoingEmail.secrets`: the reset token); the console
backend writes the message with each of them replaced by `[redacted]`, in every environment,
so a log never holds a working reset link. Production refuses the console backend altogether
(`Settings`: EMAIL_BACKEND).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Protocol

import aiosmtplib
from fastapi import BackgroundTasks

from joyhub.core.config import Settings

log = logging.getLogger("joyhub.email")

SMTP_TIMEOUT_SECONDS = 15.0
IMPLICIT_TLS_PORT = 465


REDACTED = "[redacted]"


@dataclass(frozen=True)
class OutgoingEmail:
    to: str
    subject: str
    body: str = field(repr=False)  # may carry the secrets below
    kind: str = "notification"  # for logs: "welcome", "password_reset", ...
    secrets: tuple[str, ...] = field(default=(), repr=False)  # never written to a log

    def redacted_body(self) -> str:
        """The body with every secret it carries replaced by `[redacted]` (longest first, so a
        whole link goes, not only the token inside it)."""
        body = self.body
        for secret in sorted(self.secrets, key=len, reverse=True):
            if secret:
                body = body.replace(secret, REDACTED)
        return body


class EmailSender(Protocol):
    async def send(self, message: OutgoingEmail) -> None: ...


class ConsoleEmailSender:
    """Development backend: writes the message to the log, its secrets redacted.

    A reset link in a log is a working credential for whoever reads the log (a log shipper, a
    support engineer, a backup), so the token never appears: the line says that the email was
    sent, to whom, and what it said with `[redacted]` in place of the token. To follow a reset
    link in development, use `EMAIL_BACKEND=smtp` with a local catcher (README, "Security").
    """

    async def send(self, message: OutgoingEmail) -> None:
        log.info(
            "email (console backend)\nTo: %s\nSubject: %s\n\n%s",
            message.to,
            message.subject,
            message.redacted_body(),
            extra={"email_kind": message.kind, "recipient": message.to},
        )


class SmtpEmailSender:
    """SMTP via aiosmtplib: SMTP_HOST/SMTP_PORT, STARTTLS when SMTP_STARTTLS is true (implicit
    TLS on port 465), and SMTP_USERNAME/SMTP_PASSWORD when a username is set."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def _build(self, message: OutgoingEmail) -> EmailMessage:
        mail = EmailMessage()
        mail["From"] = self._settings.smtp_from
        mail["To"] = message.to
        mail["Subject"] = message.subject
        mail.set_content(message.body)
        return mail

    async def send(self, message: OutgoingEmail) -> None:
        s = self._settings
        implicit_tls = s.smtp_port == IMPLICIT_TLS_PORT
        await aiosmtplib.send(
            self._build(message),
            hostname=s.smtp_host,
            port=s.smtp_port,
            username=s.smtp_username or None,
            password=s.smtp_password if s.smtp_username else None,
            use_tls=implicit_tls,
            start_tls=False if implicit_tls else s.smtp_starttls,
            timeout=SMTP_TIMEOUT_SECONDS,
        )


def sender_for(settings: Settings) -> EmailSender:
    if settings.email_backend == "smtp":
        return SmtpEmailSender(settings)
    return ConsoleEmailSender()


async def deliver(sender: EmailSender, message: OutgoingEmail) -> bool:
    """Send one message; log a failure (without secrets) instead of raising. True when sent."""
    try:
        await sender.send(message)
    except Exception as exc:  # any failure of the mail path must stay out of the request
        log.warning(
            "email delivery failed",
            extra={
                "email_kind": message.kind,
                "recipient_domain": message.to.rpartition("@")[2],
                "error": type(exc).__name__,
                "smtp_code": getattr(exc, "code", None),
            },
        )
        return False
    log.info("email sent", extra={"email_kind": message.kind})
    return True


def send_in_background(background: BackgroundTasks, settings: Settings, message: OutgoingEmail) -> None:
    """Queue the message to be sent after the response (a failure is logged, never raised)."""
    background.add_task(deliver, sender_for(settings), message)
