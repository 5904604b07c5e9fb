"""ratelimit-policyd: a sender rate-limit policy daemon for Postfix."""

__version__ = "0.1.0"
