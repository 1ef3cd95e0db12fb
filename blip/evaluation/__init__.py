"""Judging reports: caption metrics and the report labeler (findings, side, subtype)."""
