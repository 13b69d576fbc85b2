"""campaign: bulk SMS campaigns from PostgreSQL to the IMIconnect / Webex Connect API."""

__version__ = "0.1.0"
