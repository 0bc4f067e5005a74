"""Triton kernels and their launchers, installed as ``vqfast.kernels``.

Only ``vqfast.functional`` imports from here, and only when the dispatcher picks Triton.
"""
