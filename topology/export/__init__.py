"""Exports of a topology to other engines: Kubernetes manifests (`k8s`), their NetworkPolicies
compiled from the same reachability matrix as the app checks and nftables (`netpol`), and a
compose file for plain containers on one host (`compose`). Pure data building: files are
written by `topology/cli/export.py`.
"""
