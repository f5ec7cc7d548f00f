"""Quantized expert weights: the arithmetic every implementation shares (:mod:`.fp8`)."""
