"""Adapters to other libraries' protocols; each module needs its own optional extra."""
