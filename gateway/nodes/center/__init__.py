"""The issuance center's parts, one idea each; the node itself is gateway/nodes/issuance.py."""
