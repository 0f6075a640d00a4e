"""captioning: an image-captioning pipeline from data to service.

The library is plain Python and torch. Prefect, MLflow and BentoML are imported
only inside the functions that need them, so it runs anywhere torch does.
"""

__version__ = "0.1.0"
