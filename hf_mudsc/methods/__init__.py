"""Merge methods: one registry entry per method (what it needs and how it solves)."""
