"""The edge agent that device owners install: enrollment, MQTT, capacity probe, placement (to come)."""
