"""Retrieval evaluation: metrics and small exact retrieval over an in-memory corpus."""
