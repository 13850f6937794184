"""Parsl execution (runner, sites)."""
