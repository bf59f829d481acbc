"""The edge agent that device owners install: enrollment, MQTT, capacity probe, placement, one round."""
