"""What the BentoML services in service.py use: their settings (`config`), checks of uploads and
options, authentication, per-client limits, the calls from the API to the model service, the
model source, error answers and Prometheus metrics. Nothing here imports BentoML when imported."""
