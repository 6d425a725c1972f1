"""Postback security (placeholder until the security module lands)."""


class Unauthorized(Exception):
    """A postback without the right token or signature (401)."""
