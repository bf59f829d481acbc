"""fedge: federated learning across edge devices, the serverless way."""

__version__ = "0.1.0"
