"""Roost: a clustered MQTT broker for Kubernetes."""

__version__ = "0.1.0"
