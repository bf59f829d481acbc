"""Simulated federations: the run, its fleet of placing devices, device profiles, plots (above all parts)."""
