"""Datasets: acquisition, loading, validation and the query language."""
