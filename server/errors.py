"""Refusals with a stable code: the API answers each with its status and ``{"error", "detail"}``."""

from __future__ import annotations


class Rejected(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
