"""Identity and trust for fedge: the federation CA, certificates, and TLS contexts."""
