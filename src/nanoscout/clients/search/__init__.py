"""Automated stage search: strategies, the search loop, navigator lists."""
