"""Captioning images with a trained model package: loading it, decoding, reranking.

Imports no MLflow: the service and the evaluation caption through here.
"""
