"""Stateless client functions (train, evaluate), the task registry and the warm runtime that hosts them.

Nothing here imports flwr or the server: a cold start should cost little more than ``import torch``.
"""
