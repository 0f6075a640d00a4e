"""Scoring captions (BLEU, METEOR, ROUGE-L, CIDEr), comparison tables and evaluation reports."""
