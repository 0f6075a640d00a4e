"""What tests and benchmarks both use: a tiny trained model on synthetic data (`trained`), the real
service started on a free port (`serving`), and the one-hypothesis-at-a-time beam search that the
batched one is checked and timed against (`reference`). Tests and benchmarks import these, never
each other."""
