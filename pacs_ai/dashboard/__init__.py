"""The admin dashboard served on the metrics port: see :mod:`pacs_ai.dashboard.app`."""

from pacs_ai.dashboard.app import dashboard_app

__all__ = ["dashboard_app"]
