"""The HTML report of a study folder."""

from alternas.report.html import build_report

__all__ = ["build_report"]
